"""Runs beyond one device: uneven last batches, the replica count of a run, and the --init probe
of a two-worker job on loopback.

The single-device run is the reference: where the math says a distributed run computes the
same thing (an evaluation in inference mode; a 2-worker job and a 2-replica MirroredStrategy
run, which split every batch alike), the results must agree to float rounding.
"""

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from binaries_testlib import (
    FINETUNE_ARGS,
    SOURCE_ARGS,
    binary_command,
    multi_worker_job,
    read_weights,
    settings,
    source_run,
)

from twins_tf import data as data_lib
from twins_tf.attacks.pgd import PGD
from twins_tf.models.resnet import build_resnet
from twins_tf.trainer import AdversarialTrainer
from twins_tf.training import distribute, loop, runs, trainer_setup
from twins_tf.training import model_dir as run_files
from twins_tf.training.run_callbacks import read_metrics
from twins_tf.training.settings import Settings, SetupError


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return source_run(tmp_path_factory) / run_files.BEST_WEIGHTS


def _trainer(weights, strategy):
    with strategy.scope():
        model = build_resnet("resnet18", 5, twin=False, input_shape=(16, 16, 3))
        model.set_weights(weights)
        trainer = AdversarialTrainer(model, method="at", attack=PGD(8 / 255, 4 / 255, 1))
        trainer.compile(keras.optimizers.SGD(0.01))
    return trainer


def test_an_uneven_last_batch_counts_every_example_once():
    """7 examples in batches of 4 on 2 replicas: the last batch gives one replica 1 example
    and the other none.  The metrics are the means over the 7 examples, as on one device
    (Keras alone would average the replicas' means, and the empty replica's network would
    fail on TensorFlow's oneDNN convolution of zero rows)."""
    rng = np.random.default_rng(0)
    images = rng.random((7, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 5, 7)
    keras.utils.set_random_seed(1)
    weights = build_resnet("resnet18", 5, twin=False, input_shape=(16, 16, 3)).get_weights()
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    one = _trainer(weights, tf.distribute.get_strategy())
    two = _trainer(weights, distribute.get_strategy("mirrored"))
    reference = one.evaluate(batches, verbose=0, return_dict=True)
    mirrored = two.evaluate(batches, verbose=0, return_dict=True)
    # Accuracies count examples: equal.  Losses: the same 7 per-example values summed in
    # another order (float32, a few ulps).
    for name in ("clean_acc", "adv_acc"):
        assert mirrored[name] == reference[name], name
    for name in ("clean_loss", "adv_loss"):
        np.testing.assert_allclose(mirrored[name], reference[name], rtol=1e-6, err_msg=name)
    logits = one(images).numpy()
    counted = np.mean(np.argmax(logits, axis=1) == labels)  # the reference's own check
    assert reference["clean_acc"] == pytest.approx(counted)
    assert one(np.zeros((0, 16, 16, 3), np.float32)).shape == (0, 5)
    assert one.test_on_batch(images[:0], labels[:0], return_dict=True)["clean_acc"] == 0.0


def _finetune(pretrained, model_dir, *extra):
    return settings(
        "train", [*FINETUNE_ARGS, f"--pretrained={pretrained}", f"--model_dir={model_dir}", *extra]
    )


def _snapshot(model_dir):
    return {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")}


def test_a_twin_run_keeps_its_replica_count_a_plain_run_may_change_it(
    tmp_path_factory, tmp_path, pretrained, capsys
):
    """A TWINS-AT run started on 1 replica and continued on 2 is refused in one line, nothing
    written; the finished PGD-AT source run (plain BN) extended on 2 continues, with a note."""
    twin_dir = tmp_path / "twin"  # a run killed in its first epoch: its config.json only
    twin = Settings.from_dict(_finetune(pretrained, twin_dir))
    run_files.write_config(twin_dir, twin.replace(replicas=1, num_classes=5))
    before = _snapshot(twin_dir)
    with pytest.raises(SetupError) as error:
        loop.run(_finetune(pretrained, twin_dir, "--strategy=mirrored"), verbose=0)
    message = str(error.value)
    assert "\n" not in message
    assert "trained on 1 replica(s), and this process has 2" in message
    assert "Adaptive wing's statistics" in message
    assert _snapshot(twin_dir) == before

    plain_dir = tmp_path / "plain"
    shutil.copytree(source_run(tmp_path_factory), plain_dir)
    capsys.readouterr()
    summary = loop.run(
        settings(
            "pretrain",
            [*SOURCE_ARGS, f"--model_dir={plain_dir}", "--epochs=3", "--strategy=mirrored"],
        ),
        verbose=0,
    )
    out = capsys.readouterr().out
    assert "trained on 1 replica(s) and continues on 2" in out
    assert "resuming after epoch 2" in out
    assert summary["trained_epochs"] == 3


@pytest.mark.slow  # two worker processes through an init stage and a main run: ~2 min
def test_two_workers_run_the_init_probe_and_an_uneven_validation_like_one_process(
    tmp_path, pretrained
):
    """`train --strategy=multi_worker --init=robust_linear_probe` with 33 validation images
    in batches of 8: the probe and the main run share the process's strategy (one set of
    collectives, issued in the same order on both workers), the last validation batch leaves
    one worker no image, and the job ends with the weights of the same run on a 2-replica
    MirroredStrategy, with validation metrics equal to one device's on its final weights."""
    extra = [
        "--method=at",
        "--epochs=1",
        "--batch_size=8",
        "--max_validation_examples=33",
        "--init=robust_linear_probe",
        "--init_epochs=1",
        "--init_lr=0.01",
    ]
    model_dir = tmp_path / "multi_worker"
    args = [*FINETUNE_ARGS, f"--pretrained={pretrained}", f"--model_dir={model_dir}", *extra]
    job = multi_worker_job(binary_command("train", [*args, "--strategy=multi_worker"]))
    for returncode, out, err in job:
        assert returncode == 0, err[-3000:]
        assert out.count("2 replica(s)") == 2  # the probe and the main run
    assert (model_dir / "init" / "summary.json").is_file()
    assert (model_dir / "summary.json").is_file()

    mirrored_dir = tmp_path / "mirrored"
    loop.run(
        _finetune(pretrained, mirrored_dir, *extra, "--strategy=mirrored"),
        verbose=0,
    )
    # The same replicas' batches, the same reductions in another runtime: float rounding
    # (the bound of the two-worker weights test).
    a = read_weights(model_dir / "last.weights.h5")
    b = read_weights(mirrored_dir / "last.weights.h5")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)

    s = run_files.read_settings(model_dir)
    spec = data_lib.get_dataset_spec(s.dataset, image_size=s.image_size, upsample=s.upsample)
    splits = data_lib.load_splits(spec, validation=s.validation)
    _, validation = trainer_setup.pipelines(s.replace(strategy="default"), spec, splits, 0)
    model = runs.load_run(model_dir, "last")
    one_device = trainer_setup.make_trainer(model, s, 1).evaluate(
        validation, verbose=0, return_dict=True
    )
    logged = read_metrics(model_dir / run_files.METRICS_FILE)[-1]
    # Accuracies: 33 examples, each classified by the same weights in inference mode; the
    # losses: the same per-example values summed in another order.
    for name in ("clean_acc", "adv_acc"):
        assert logged[f"val_{name}"] == pytest.approx(one_device[name], abs=1e-6), name
    for name in ("clean_loss", "adv_loss"):
        np.testing.assert_allclose(logged[f"val_{name}"], one_device[name], rtol=1e-5)
