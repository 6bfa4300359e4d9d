"""`twins_tf.load_run`: a run directory back to its model, checked against Keras's own loader.

The reference is the independent way a user could load a run before `load_run` existed:
`build_resnet` with the settings read from config.json by hand and Keras's
`model.load_weights` on the run's weights file (no twins_tf loading code).
"""

import json
import shutil

import numpy as np
import pytest
from binaries_testlib import finetune_run, source_run

import twins_tf
from twins_tf.layers import twin_layers
from twins_tf.models.resnet import build_resnet
from twins_tf.training import model_dir as run_files


def _keras_loaded(model_dir, weights_file):
    config = json.loads((model_dir / "config.json").read_text())
    size = config["image_size"]
    model = build_resnet(
        config["arch"],
        config["num_classes"],
        twin=config["twin"],
        input_shape=(size, size, 3),
        upsample=config["upsample"],
    )
    model.load_weights(model_dir / weights_file)
    return model, size


@pytest.mark.parametrize("which", ["source", "finetune"])
@pytest.mark.parametrize(
    "weights, weights_file", [("best", run_files.BEST_WEIGHTS), ("last", run_files.LAST_WEIGHTS)]
)
def test_load_run_gives_the_run_model_with_its_weights(
    tmp_path_factory, which, weights, weights_file
):
    model_dir = (source_run if which == "source" else finetune_run)(tmp_path_factory)
    reference, size = _keras_loaded(model_dir, weights_file)
    model = twins_tf.load_run(model_dir, weights=weights)
    assert bool(twin_layers(model)) == (which == "finetune")  # twin as the run trained it
    images = np.random.default_rng(0).random((4, size, size, 3)).astype("float32")
    np.testing.assert_allclose(
        model(images, training=False).numpy(),
        reference(images, training=False).numpy(),
        atol=1e-5,
        rtol=1e-5,
    )
    # and a path names a weights file as well
    by_path = twins_tf.load_run(model_dir, weights=model_dir / weights_file)
    np.testing.assert_array_equal(
        by_path(images, training=False).numpy(), model(images, training=False).numpy()
    )


def test_best_and_last_are_the_files_they_name(tmp_path_factory, tmp_path):
    """A run whose last epoch is not its best: `weights=` picks the file (the tiny runs' two
    files are equal, their last epoch being their best, so this run's last file is made here)."""
    source = source_run(tmp_path_factory)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    for name in ("config.json", run_files.BEST_WEIGHTS):
        shutil.copy(source / name, model_dir / name)
    later, size = _keras_loaded(source, run_files.BEST_WEIGHTS)
    rng = np.random.default_rng(1)
    for variable in later.trainable_weights:
        variable.assign(variable.numpy() * rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    later.save_weights(model_dir / run_files.LAST_WEIGHTS)

    images = np.random.default_rng(2).random((4, size, size, 3)).astype("float32")
    for weights, weights_file in (
        ("best", run_files.BEST_WEIGHTS),
        ("last", run_files.LAST_WEIGHTS),
    ):
        reference, _ = _keras_loaded(model_dir, weights_file)
        np.testing.assert_allclose(
            twins_tf.load_run(model_dir, weights=weights)(images, training=False).numpy(),
            reference(images, training=False).numpy(),
            atol=1e-5,
            rtol=1e-5,
        )
    best = twins_tf.load_run(model_dir)(images, training=False).numpy()
    assert np.abs(best - later(images, training=False).numpy()).max() > 1e-2  # files differ


def test_a_missing_run_directory_is_one_clear_line(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"nowhere holds no config.json \(no such "
        r"directory\): pass the --model_dir of a train or pretrain run",
    ) as error:
        twins_tf.load_run(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="holds no config.json: pass the --model_dir"):
        twins_tf.load_run(tmp_path)


def test_a_run_without_weights_is_one_clear_line(tmp_path_factory, tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    shutil.copy(source_run(tmp_path_factory) / "config.json", model_dir / "config.json")
    for weights in ("best", "last"):
        with pytest.raises(
            FileNotFoundError,
            match=(
                rf"No weights file {model_dir}/{weights}.weights.h5: the run has not finished "
                r"an epoch yet; weights= takes \"best\", \"last\" or a .weights.h5 path"
            ),
        ) as error:
            twins_tf.load_run(model_dir, weights=weights)
        assert "\n" not in str(error.value)


def test_config_without_the_model_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"arch": "resnet18", "twin": True}))
    with pytest.raises(
        ValueError,
        match="config.json lacks num_classes, image_size, upsample; "
        "was it written by twins_tf.train",
    ):
        twins_tf.load_run(tmp_path)


def test_weights_of_the_other_bn_kind_are_refused(tmp_path_factory, tmp_path):
    """load_pretrained converts plain <-> twin for fine-tuning; a run's model must not be
    converted, or export ships another network (same arch and head, other BN) without a word."""
    model_dir = finetune_run(tmp_path_factory)  # a twin run
    twin_model, _ = _keras_loaded(model_dir, run_files.BEST_WEIGHTS)
    plain_file = tmp_path / "plain.weights.h5"
    twins_tf.untwin(twin_model).save_weights(plain_file)
    with pytest.raises(
        ValueError, match="holds plain-BN weights but the run in .* trained a twin-BN network"
    ) as error:
        twins_tf.load_run(model_dir, weights=plain_file)
    assert "\n" not in str(error.value)
