"""twins_tf's ConvNeXts against timm: logits, the key layout, loading, LoRA and serialisation.

Reference: timm 1.0.31 in its own virtualenv (tests/timm_reference.py).  Our arch -> timm:

    convnext_tiny / small / base / large    timm convnext_tiny / small / base / large
    convnext_<size>_convstem                timm convnext_<size> with its `stem` replaced by
                                            Singh et al. 2023's ConvStem (`convstem_logits`,
                                            written from the layout of nmndeep/revisiting-at)

timm redraws every parameter at a scale where it matters (`timm_reference.randomise`): weights
N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.2^2), biases and LayerScale gammas N(0, 0.2^2),
instead of timm's LayerScale init 1e-6 that would hide every block behind it.  Both models see
the same [0, 1] images, timm after `(x - mean) / std` with the arch's mean/std, ours raw.
"""

import re

import keras
import numpy as np
import pytest
import timm_testlib
import torch

from twins_tf import lora
from twins_tf.models import convnext, registry
from twins_tf.weights import (
    convert_checkpoint,
    layouts,
    load_pretrained,
    read_checkpoint,
    read_torch_checkpoint,
    torch_names,
)
from twins_tf.weights.errors import CheckpointError

SIZE = 64  # the smallest multiple of 32 where the last stage's map is more than 1x1
CLASSES = 5
# float32 through ~20-40 residual blocks of LayerNorm-ed, 4x-wide MLPs: each op is exact to
# ~1e-7 relative, accumulated over a few hundred ops; the bar of the family brief.
RELATIVE = 1e-4
DEFAULT = ("convnext_tiny", "convnext_tiny_convstem")
SLOW = tuple(arch for arch in convnext.ARCHITECTURES if arch not in DEFAULT)


def _images(n=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, size, size, 3)).astype("float32")


def timm_answer(directory, arch, images):
    """timm's logits and state dict for `arch` on `images` (see the module docstring)."""
    np.save(directory / "images.npy", images)
    mean, std = convnext.input_normalization(arch)
    request = dict(
        model=convnext.TIMM_NAMES[arch],
        kwargs={"num_classes": CLASSES},
        seed=0,
        images=str(directory / "images.npy"),
        mean=list(mean),
        std=list(std),
    )
    stem = convnext.ARCHITECTURES[arch][2]
    if stem == "patch":
        return timm_testlib.run(directory, "logits", **request)
    return timm_testlib.run(directory, "convstem_logits", stem=[list(s) for s in stem], **request)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """timm's answers for the default archs, shared by the tests below (one timm run each)."""
    images = _images()
    return {
        arch: (images, timm_answer(tmp_path_factory.mktemp(arch), arch, images)) for arch in DEFAULT
    }


def _check_parity(arch, images, answer):
    model = registry.build_model(arch, CLASSES, input_shape=images.shape[1:])
    assert layouts.arch_from_state_dict(answer["state"]) == arch
    torch_names.load_torch_state_dict(model, answer["state"], head=True)
    ours = np.asarray(model(images, training=False))
    reference = answer["logits"]
    scale = np.abs(reference).max()
    assert scale > 0.1  # the logits are not vanishing, so the bar below means something
    np.testing.assert_allclose(ours, reference, rtol=0, atol=RELATIVE * scale)


@pytest.mark.parametrize("arch", DEFAULT)
def test_logits_equal_timm(arch, answers):
    _check_parity(arch, *answers[arch])


@pytest.mark.parametrize("arch", DEFAULT)
def test_every_layer_norm_has_timms_epsilon(arch, answers):
    """Checked apart from the logits: with activations of unit scale, LayerNorm's epsilon
    (1e-6 vs 1e-5) moves them by ~1e-6 relative, below the logits' bar."""
    model = registry.build_model(arch, CLASSES, input_shape=(32, 32, 3))
    answer = answers[arch][1]
    timm_eps = {key[len("eps/") :]: float(v) for key, v in answer.items() if key.startswith("eps/")}
    ours = {
        layer.name.replace("_", "."): layer.epsilon
        for layer in model.layers
        if isinstance(layer, keras.layers.LayerNormalization)
    }
    assert ours == timm_eps


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)
def test_logits_equal_timm_large_archs(arch, tmp_path):
    images = _images()
    _check_parity(arch, images, timm_answer(tmp_path, arch, images))


def test_twin_is_refused_and_no_convnext_has_batch_norm():
    """No ConvNeXt has BN (the ConvStem's norms are LayerNorms), so twin=True is refused."""
    for arch in convnext.ARCHITECTURES:
        assert not registry.has_batch_norm(arch)
    with pytest.raises(
        ValueError, match=re.escape(registry.twin_methods_need_batch_norm("convnext_tiny"))
    ):
        registry.build_model("convnext_tiny", CLASSES, twin=True, input_shape=(32, 32, 3))
    for arch in DEFAULT:
        model = registry.build_model(arch, CLASSES, input_shape=(32, 32, 3))
        kinds = {type(layer).__name__ for layer in model.layers}
        assert not any("BatchNormalization" in kind for kind in kinds), kinds


def test_input_sizes_must_be_multiples_of_32():
    with pytest.raises(ValueError, match=r"= 48: use 32 or 64 pixels"):
        registry.build_model("convnext_tiny", CLASSES, input_shape=(48, 48, 3))
    with pytest.raises(ValueError, match=r"16 x upsample 1 = 16: use 32 pixels"):
        registry.build_model("convnext_tiny", CLASSES, input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match=r"use 8 or 16 pixels"):
        registry.build_model("convnext_tiny_convstem", CLASSES, input_shape=(12, 12, 3), upsample=4)
    model = registry.build_model("convnext_tiny", CLASSES, input_shape=(16, 16, 3), upsample=2)
    assert model(_images(size=16)).shape == (2, CLASSES)
    model = registry.build_model("convnext_tiny", CLASSES, input_shape=(None, None, 3))
    assert model(_images(size=32)).shape == (2, CLASSES)


def test_loading_refuses_another_archs_checkpoint_and_a_fresh_head_ignores_the_checkpoints(
    answers,
):
    images, convstem = answers["convnext_tiny_convstem"]
    patch_model = registry.build_model("convnext_tiny", CLASSES, input_shape=(32, 32, 3))
    with pytest.raises(CheckpointError, match="holds a convnext_tiny_convstem"):
        torch_names.load_torch_state_dict(patch_model, convstem["state"])
    model = registry.build_model("convnext_tiny_convstem", 3, input_shape=(SIZE, SIZE, 3))
    with pytest.raises(CheckpointError, match="head has 5 classes but the model's head_fc has 3"):
        torch_names.load_torch_state_dict(model, convstem["state"], head=True)
    fresh = [np.asarray(v) for v in model.get_layer("head_fc").weights]
    loaded = torch_names.load_torch_state_dict(model, convstem["state"])
    assert "head.norm.weight" in loaded and "head.fc.weight" not in loaded
    for before, variable in zip(fresh, model.get_layer("head_fc").weights):
        np.testing.assert_array_equal(before, np.asarray(variable))
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("head_norm").gamma), convstem["state"]["head.norm.weight"]
    )


def test_reading_keeps_timm_keys_and_strips_the_singh_prefix(tmp_path, answers):
    """A timm state dict reads back unchanged, from a plain .pth and from Singh et al.'s
    DataParallel + attack-wrapper layout (`module.base_model.<timm key>`)."""
    state = answers["convnext_tiny_convstem"][1]["state"]
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, plain)
    torch.save({f"module.base_model.{k}": torch.from_numpy(v) for k, v in state.items()}, wrapped)
    for path in (plain, wrapped):
        read = read_torch_checkpoint(path)
        assert sorted(read) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(read[key], value)
    assert read_checkpoint(wrapped).metadata["arch"] == "convnext_tiny_convstem"


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_convert_then_load_pretrained_gives_timms_logits(tmp_path, answers, suffix):
    """A timm state dict through `convert` (the binary's work) and `load_pretrained` (what
    `train --pretrained` runs); another size of the same family is one line naming a key."""
    from safetensors.numpy import save_file

    images, answer = answers["convnext_tiny"]
    state = {k: np.ascontiguousarray(v) for k, v in answer["state"].items()}
    path = tmp_path / f"timm{suffix}"
    if suffix == ".npz":
        np.savez(path, **state)
    else:
        save_file(state, str(path))
    output = tmp_path / "converted.weights.h5"
    summary = convert_checkpoint(path, "convnext_tiny", output)
    assert summary["arch"] == "convnext_tiny" and summary["num_classes"] == CLASSES
    assert summary["head_from_checkpoint"]
    model = registry.build_model("convnext_tiny", CLASSES, input_shape=images.shape[1:])
    load_pretrained(model, output, head=True)
    reference = answer["logits"]
    np.testing.assert_allclose(
        np.asarray(model(images, training=False)),
        reference,
        rtol=0,
        atol=RELATIVE * np.abs(reference).max(),
    )
    other = tmp_path / "small.weights.h5"
    with pytest.raises(CheckpointError, match="does not fit convnext_small") as error:
        convert_checkpoint(path, "convnext_small", other)
    assert "\n" not in str(error.value) and "holds a convnext_tiny" in str(error.value)
    assert not other.exists()


def _randomise_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    for branch in lora.lora_branches(model):
        branch.lora_b.assign(0.05 * rng.normal(size=branch.lora_b.shape).astype("float32"))


@pytest.mark.parametrize("arch", DEFAULT)
def test_autolora_adapts_the_blocks_linear_layers_and_merges(arch, answers):
    """The branches sit on every block's mlp_fc1/fc2 only (not the depthwise convs, the stem,
    the downsampling convs or the head), and the natural forward equals the merged model.
    timm's randomised weights make every block matter (fresh LayerScales of 1e-6 would not)."""
    model = registry.build_model(arch, CLASSES, input_shape=(32, 32, 3))
    torch_names.load_torch_state_dict(model, answers[arch][1]["state"], head=True)
    wrapped = lora.add_lora(model, 2)
    depths = convnext.ARCHITECTURES[arch][0]
    expected = {
        f"stages_{stage}_blocks_{block}_mlp_{fc}"
        for stage, depth in enumerate(depths)
        for block in range(depth)
        for fc in ("fc1", "fc2")
    }
    assert {branch.target for branch in lora.lora_branches(wrapped)} == expected
    _randomise_lora(wrapped)
    x = _images(size=32)
    plain = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(np.asarray(wrapped(x, training=False)), plain)
    with lora.natural_branch():
        natural = np.asarray(wrapped(x, training=False))
    merged = np.asarray(lora.merge_lora(wrapped)(x, training=False))
    scale = np.abs(natural).max()
    assert np.abs(natural - plain).max() > 1e-2 * scale  # the branches change the output
    np.testing.assert_allclose(merged, natural, rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(lora.main_branch(wrapped)(x)), plain)


def test_add_lora_refuses_a_depthwise_conv_with_a_clear_error():
    model = registry.build_model("convnext_tiny", CLASSES, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="stages_0_blocks_0_conv_dw is a DepthwiseConv2D"):
        lora.add_lora(model, 2, targets=[model.get_layer("stages_0_blocks_0_conv_dw")])


def test_json_and_weights_files_round_trip(tmp_path, answers):
    """On the ConvStem model, which has every kind of layer the family has but the 4x4 stem."""
    arch = "convnext_tiny_convstem"
    images, answer = answers[arch]
    model = registry.build_model(arch, CLASSES, input_shape=images.shape[1:])
    torch_names.load_torch_state_dict(model, answer["state"], head=True)
    expected = np.asarray(model(images, training=False))

    rebuilt = keras.models.model_from_json(model.to_json())
    assert rebuilt.name == arch
    assert [type(layer) for layer in rebuilt.layers] == [type(layer) for layer in model.layers]
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    rebuilt.load_weights(path)
    np.testing.assert_array_equal(np.asarray(rebuilt(images, training=False)), expected)

    fresh = registry.build_model(arch, CLASSES, input_shape=images.shape[1:])
    fresh.load_weights(path)
    np.testing.assert_array_equal(np.asarray(fresh(images, training=False)), expected)


def test_mixed_precision_keeps_the_head_in_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = registry.build_model("convnext_tiny_convstem", CLASSES, input_shape=(32, 32, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("stages_0_blocks_0_mlp_fc1").compute_dtype == "float16"
    assert model.get_layer("head_norm").compute_dtype == "float32"
    logits = model(_images(size=32), training=False)
    assert logits.dtype == "float32" and np.isfinite(np.asarray(logits)).all()
