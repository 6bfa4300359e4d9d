"""Tests of twins_tf.serving and its binary, twins_tf.export: the SavedModel serves what
the Keras model infers.

Each test reloads the SavedModel with `tf.saved_model.load` (no Keras involved) and compares
its serving signature with the Keras model's inference output (`training=False`: Adaptive
wing, moving statistics), and the probabilities with a numpy softmax of the served logits.
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from twins_tf import export, serving
from twins_tf.layers import set_twin_mode, twin_layers
from twins_tf.models import build_resnet


def _randomise_adaptive_wing(model, seed=0):
    """Moves every Adaptive wing away from the Frozen one (as training would)."""
    rng = np.random.default_rng(seed)
    for layer in twin_layers(model):
        n = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
        layer.moving_mean.assign(rng.normal(0, 0.3, n).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))


def _serve(path, images):
    served = tf.saved_model.load(path)
    signature = served.signatures["serving_default"]
    (_, inputs) = signature.structured_input_signature
    outputs = signature(images=tf.constant(images))
    return inputs, {k: v.numpy() for k, v in outputs.items()}


def _softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)


def test_twin_resnet_export_serves_the_adaptive_inference(tmp_path):
    model = build_resnet("resnet18", 5, twin=True, input_shape=(16, 16, 3), upsample=2)
    _randomise_adaptive_wing(model)
    images = np.random.default_rng(1).random((6, 16, 16, 3)).astype("float32")
    expected = model(images, training=False).numpy()
    set_twin_mode(model, "frozen")
    frozen = model(images, training=False).numpy()
    set_twin_mode(model, "twin")
    assert np.abs(frozen - expected).max() > 1e-2  # the wings really differ

    plain = serving.export_saved_model(model, str(tmp_path / "sm"), image_size=16)
    assert not twin_layers(plain)
    inputs, out = _serve(str(tmp_path / "sm"), images)
    assert inputs["images"].shape.as_list() == [None, 16, 16, 3]
    assert inputs["images"].dtype == tf.float32
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["probabilities"], _softmax(out["logits"]), atol=1e-6)


def test_plain_model_export_and_size_check(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-1, 1, 4).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2, 4).astype("float32"))
    images = np.random.default_rng(2).random((5, 8, 8, 3)).astype("float32")
    serving.export_saved_model(model, str(tmp_path / "sm"), image_size=8)
    _, out = _serve(str(tmp_path / "sm"), images)
    np.testing.assert_allclose(out["logits"], model(images, training=False).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="image_size=16 does not match the model's input 8x8"):
        serving.export_saved_model(model, str(tmp_path / "other"), image_size=16)


def _write_run(model_dir, model, settings):
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(settings, f)
    model.save_weights(os.path.join(model_dir, "best.weights.h5"))


def _flag_values(*argv):
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", *argv])
    return values


RUN_SETTINGS = {
    "arch": "resnet18",
    "num_classes": 3,
    "image_size": 16,
    "upsample": 1,
    "twin": True,
    "dataset": "digits_5_9",
    "method": "twins_at",
}


def test_export_binary_from_a_run_directory(tmp_path):
    model = build_resnet("resnet18", 3, twin=True, input_shape=(16, 16, 3))
    _randomise_adaptive_wing(model, seed=3)
    run = str(tmp_path / "run")
    _write_run(run, model, RUN_SETTINGS)
    output = str(tmp_path / "exported")
    result = subprocess.run(
        [sys.executable, "-m", "twins_tf.export", f"--model_dir={run}", f"--output={output}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "images float32 [N, 16, 16, 3] in [0, 1]" in result.stdout
    images = np.random.default_rng(4).random((4, 16, 16, 3)).astype("float32")
    _, out = _serve(output, images)
    np.testing.assert_allclose(
        out["logits"], model(images, training=False).numpy(), atol=1e-4, rtol=1e-4
    )
    # A second export to the same place is refused; nothing is overwritten.
    before = os.path.getmtime(os.path.join(output, "saved_model.pb"))
    with pytest.raises(SystemExit, match="exists and is not empty; refusing to overwrite"):
        export.main(["export"], _flag_values(f"--model_dir={run}", f"--output={output}"))
    assert os.path.getmtime(os.path.join(output, "saved_model.pb")) == before


def test_export_binary_errors(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="holds no config.json"):
        export.main(["export"], _flag_values(f"--model_dir={run}", f"--output={tmp_path / 'a'}"))
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(RUN_SETTINGS, f)
    with pytest.raises(SystemExit, match="No weights file .*best.weights.h5"):
        export.main(["export"], _flag_values(f"--model_dir={run}", f"--output={tmp_path / 'b'}"))
    other = build_resnet("resnet18", 7, twin=True, input_shape=(16, 16, 3))
    wrong = os.path.join(run, "other.weights.h5")
    other.save_weights(wrong)
    with pytest.raises(SystemExit, match="does not fit the run's resnet18"):
        export.main(
            ["export"],
            _flag_values(f"--model_dir={run}", f"--weights={wrong}", f"--output={tmp_path / 'c'}"),
        )
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"arch": "resnet18"}, f)
    with pytest.raises(SystemExit, match="lacks num_classes, image_size, upsample, twin"):
        export.main(["export"], _flag_values(f"--model_dir={run}", f"--output={tmp_path / 'd'}"))


def test_export_refuses_weights_holding_a_nan(tmp_path):
    model = build_resnet("resnet18", 3, twin=True, input_shape=(16, 16, 3))
    layer = [l for l in twin_layers(model)][2]
    layer.frozen_variance.assign(np.full(layer.frozen_variance.shape, np.inf, "float32"))
    run = str(tmp_path / "run")
    _write_run(run, model, RUN_SETTINGS)
    with pytest.raises(
        SystemExit,
        match=(
            r"error: \S+/best.weights.h5 holds non-finite weights \(first: "
            rf"\S*{layer.name}/frozen_variance\): the training that wrote it diverged"
        ),
    ):
        export.main(["export"], _flag_values(f"--model_dir={run}", f"--output={tmp_path / 'out'}"))
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def served_32(tmp_path_factory):
    """The serving signature of an exported 32x32 twin ResNet-18, reloaded without Keras."""
    model = build_resnet("resnet18", 4, twin=True, input_shape=(32, 32, 3))
    path = str(tmp_path_factory.mktemp("served") / "sm")
    serving.export_saved_model(model, path, image_size=32)
    return model, tf.saved_model.load(path).signatures["serving_default"]


def test_serving_refuses_0_255_pixels_and_another_image_size(served_32):
    """The documented behaviour: a clear error, not a silent clamp or a silent other size."""
    model, serve = served_32
    images = np.random.default_rng(5).random((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        serve(images=tf.constant(images))["logits"],
        model(images, training=False).numpy(),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"twins_tf serving: pixel values must be in \[0, 1\]; some are above 1 "
        r"\(divide 0-255 images by 255",
    ):
        serve(images=tf.constant(images * 255))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"twins_tf serving: images must have shape \(batch, 32, 32, 3\)",
    ):
        serve(images=tf.constant(images[:, :16, :16]))


@pytest.mark.parametrize(
    "values, accepted",
    [
        ((0.0, 1.0), True),
        ((-serving.RANGE_TOLERANCE, 1.0 + serving.RANGE_TOLERANCE), True),  # float rounding
        ((-0.01, 0.5), False),  # e.g. mean/std-normalised input
        ((0.0, 1.01), False),
        ((0.0, np.nan), False),
    ],
)
def test_serving_range_bounds(served_32, values, accepted):
    _, serve = served_32
    images = np.full((1, 32, 32, 3), 0.5, "float32")
    images[0, 0, 0, :2] = values
    if accepted:
        assert np.all(np.isfinite(serve(images=tf.constant(images))["logits"].numpy()))
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="twins_tf serving: pixel"):
            serve(images=tf.constant(images))


def _serving_error(serve, images):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        serve(images=tf.constant(images))
    return error.value.message


def _raw_status_message(serve, images, monkeypatch):
    """The error status as TensorFlow's runtime returns it (what a TF Serving client reads),
    before the Python runtime writes its `Graph execution error:` header above it, without
    the `{{function_node ...}}` tags that mark the functions the error passed through (read
    off with TensorFlow's own parser of those tags)."""
    from tensorflow.python.eager.polymorphic_function import atomic_function
    from tensorflow.python.framework import error_interpolation

    monkeypatch.setattr(
        atomic_function.InterpolateRuntimeError, "__exit__", lambda self, *exc: False
    )
    return error_interpolation.parse_message(_serving_error(serve, images))[0].strip()


BAD_INPUTS = {  # what a client sent -> the start of the message it must get
    "another size": (
        np.zeros((1, 16, 16, 3), "float32"),
        "images must have shape (batch, 32, 32, 3)",
    ),
    "another rank": (np.zeros((32, 32, 3), "float32"), "images must have shape"),
    "NaN": (np.full((1, 32, 32, 3), np.nan, "float32"), "pixel values must be finite"),
    "infinity": (np.full((1, 32, 32, 3), np.inf, "float32"), "pixel values must be finite"),
    "0-255": (
        np.full((1, 32, 32, 3), 200.0, "float32"),
        "pixel values must be in [0, 1]; some are above 1 (divide 0-255 images by 255)",
    ),
    "normalised": (
        np.full((1, 32, 32, 3), -1.5, "float32"),
        "pixel values must be in [0, 1]; some are below 0 (do not mean/std-normalise",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_serving_errors_start_with_what_to_fix(served_32, case, monkeypatch):
    """The message says what is wrong, starting a line of its own: TensorFlow's Python
    runtime writes `Graph execution error:` and the node above any error raised in a graph
    (always), so our text is the first line of the message proper; and the runtime's own
    status, what a TF Serving client reads, starts with it."""
    _, serve = served_32
    images, expected = BAD_INPUTS[case]
    message = _serving_error(serve, images)
    lines = message.splitlines()
    ours = [line for line in lines if line.startswith(serving.SERVING_ERROR)]
    assert len(ours) == 1 and ours[0].startswith(f"{serving.SERVING_ERROR} {expected}"), message
    # above it, only TensorFlow's header: no other text of an error
    assert lines[0] == "Graph execution error:", message
    assert all(
        line == "" or line.startswith(("Detected at node twins_tf_serving_", "<stack", "  "))
        for line in lines[1 : lines.index(ours[0])]
    ), message
    raw = _raw_status_message(serve, images, monkeypatch)
    assert raw.startswith(f"{serving.SERVING_ERROR} {expected}"), raw


def test_nan_pixels_are_not_called_out_of_range(served_32):
    _, serve = served_32
    images = np.full((1, 32, 32, 3), 0.5, "float32")
    images[0, 3, 4, 1] = np.nan
    message = _serving_error(serve, images)
    assert "NaN or infinite" in message and "[0, 1]; some are" not in message


def test_an_empty_batch_gets_an_empty_answer(served_32):
    model, serve = served_32
    out = serve(images=tf.zeros((0, 32, 32, 3)))
    classes = model.output_shape[-1]
    assert out["logits"].shape == (0, classes) and out["probabilities"].shape == (0, classes)
    assert out["logits"].dtype == tf.float32


def test_the_served_graph_of_a_twin_model_names_no_twin(tmp_path):
    """The untwinned network is a plain one: its nodes are not named after the twin model."""
    model = build_resnet("resnet18", 3, twin=True, input_shape=(16, 16, 3))
    assert model.name == "resnet18_twin"
    plain = serving.export_saved_model(model, str(tmp_path / "sm"), image_size=16)
    assert plain.name == "resnet18"
    graph = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"].graph
    definition = graph.as_graph_def()
    names = [n.name for n in definition.node] + [
        n.name for f in definition.library.function for n in f.node_def
    ]
    assert any(re.search(r"(^|/)resnet18(_\d+)?/", name) for name in names)
    assert not [name for name in names if "twin" in name and "twins_tf_serving" not in name]


def test_export_errors_carry_the_binary_name(tmp_path):
    """`export: error: ...` as train/evaluate/compare/convert print, one line, exit status 1."""
    run = str(tmp_path / "run")
    model = build_resnet("resnet18", 3, twin=True, input_shape=(16, 16, 3))
    _write_run(run, model, RUN_SETTINGS)
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (f"--model_dir={tmp_path / 'nothing'}", f"--output={tmp_path / 'a'}"),
        (
            f"--model_dir={run}",
            f"--weights={tmp_path / 'missing.weights.h5'}",
            f"--output={tmp_path / 'b'}",
        ),
        (f"--model_dir={run}", f"--output={tmp_path / 'full'}"),
        (f"--model_dir={run}",),
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exit_info:
            export.main(["export"], _flag_values(*argv))
        message = exit_info.value.code
        assert isinstance(message, str) and message.startswith("export: error: "), message
        assert "\n" not in message
