"""--precision: what `train --precision` and `evaluate --precision` compute in.

Training: `bfloat16` runs the training attack in the model's mixed_bfloat16 policy, while
`mixed_bfloat16` keeps it in float32 (the step in bfloat16 either way).  That is read off the
dtype a convolution of the model receives while the train step is traced, split into the
calls made by the attack and the others: nothing the code under test reports about itself.

Evaluation: the reference is the library's own PGD called directly on a model built under the
mixed_bfloat16 policy (`twins_tf.attacks.PGD(compute_dtype=None)`), not the evaluate code
path; the float32 numbers are checked against float32 PGD the same way.  The tiny model's
counts can coincide in the two precisions, so the dtype a convolution receives during the
evaluation is checked as well.
"""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from binaries_testlib import (
    FINETUNE_ARGS,
    evaluate_settings,
    evaluated_examples,
    model_of_run,
    settings,
    source_run,
)

from twins_tf import evaluation
from twins_tf.training import init_stage
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import Settings, SetupError

EXAMPLES = 64


@pytest.fixture
def float32_policy():
    """Every test leaves the global dtype policy as it found it (float32)."""
    yield
    keras.config.set_dtype_policy("float32")


# --- training ----------------------------------------------------------------------------------
def _dtypes_seen_in_a_train_step(precision, model_dir):
    """{("attack" or "step", dtype name)} the first convolution's input has while one AT train
    step of a tiny ResNet-18, prepared as a run prepares it, is traced and run."""
    from twins_tf.training import loop
    from twins_tf.training.trainer_setup import make_trainer

    s = Settings(
        dataset="digits_0_4",
        arch="resnet18",
        image_size=16,
        method="at",
        batch_size=8,
        attack_steps=1,
        epochs=1,
        model_dir=str(model_dir),
        precision=precision,
    )
    prepared = loop.prepare(s)  # sets the dtype policy and builds the model in it
    model = prepared.model
    trainer = make_trainer(model, prepared.settings, steps_per_epoch=1)
    conv = model.get_layer("conv1")
    seen, where = set(), ["step"]
    conv_call, attack_call = conv.call, trainer.attack._attack

    def spy_conv(inputs, *args, **kwargs):  # Layer.__call__ has cast inputs to compute dtype
        seen.add((where[0], keras.backend.standardize_dtype(inputs.dtype)))
        return conv_call(inputs, *args, **kwargs)

    def spy_attack(*args, **kwargs):
        where[0] = "attack"
        try:
            return attack_call(*args, **kwargs)
        finally:
            where[0] = "step"

    conv.call, trainer.attack._attack = spy_conv, spy_attack
    x = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype("float32")
    trainer.train_on_batch(x, np.arange(8) % 5)
    return seen


@pytest.mark.parametrize(
    "precision, attack, step",
    [
        ("bfloat16", "bfloat16", "bfloat16"),
        ("mixed_bfloat16", "float32", "bfloat16"),
        ("float32", "float32", "float32"),
    ],
)
def test_the_training_attack_computes_in_the_dtype_of_the_precision(
    precision, attack, step, tmp_path, float32_policy
):
    seen = _dtypes_seen_in_a_train_step(precision, tmp_path / "run")
    assert seen == {("attack", attack), ("step", step)}


def test_bad_precision_values_and_the_old_flag_are_refused(tmp_path):
    with pytest.raises(SetupError) as error:
        Settings(dataset="digits_0_4", model_dir=str(tmp_path), precision="bf16")
    assert str(error.value) == (
        "--precision='bf16' is not one of float32, bfloat16, mixed_bfloat16, mixed_float16."
    )
    with pytest.raises(
        flags.IllegalFlagValueError, match="float32|bfloat16|mixed_bfloat16|mixed_float16"
    ):
        settings("train", [*FINETUNE_ARGS, "--precision=float16"])
    with pytest.raises(flags.UnrecognizedFlagError, match="mixed_precision"):
        settings("train", [*FINETUNE_ARGS, "--mixed_precision=mixed_bfloat16"])


def test_the_init_probe_trains_in_the_precision_of_its_main_run(tmp_path):
    main = Settings(
        dataset="digits_5_9",
        model_dir=str(tmp_path),
        init="robust_linear_probe",
        allow_random_init=True,
        precision="bfloat16",
    )
    probe = init_stage.init_settings(main)
    assert (probe.precision, probe.dtype_policy, probe.attack_compute_dtype) == (
        "bfloat16",
        "mixed_bfloat16",
        None,
    )


# --- evaluation --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_copy(tmp_path_factory):
    """A copy of the session's tiny PGD-AT run, so the reports written here do not mix with
    those other test modules look for in the shared run."""
    source = source_run(tmp_path_factory)
    copy = tmp_path_factory.mktemp("precision") / "run"
    copy.mkdir()
    for name in (run_files.CONFIG_FILE, run_files.SUMMARY_FILE, run_files.BEST_WEIGHTS):
        shutil.copy(source / name, copy / name)
    return copy


def _library_accuracies(model_dir, policy, compute_dtype, steps):
    """(clean, PGD-`steps`) correct counts of the run's weights on the evaluated examples,
    with the model built under `policy` and `twins_tf.attacks.PGD` called directly (in one
    traced function, as evaluate's counter runs it: graph-mode kernels on both sides)."""
    from twins_tf.attacks.pgd import PGD

    images, labels = evaluated_examples(model_dir, EXAMPLES)
    keras.config.set_dtype_policy(policy)
    try:
        config, model = model_of_run(model_dir)
    finally:
        keras.config.set_dtype_policy("float32")
    pgd = PGD(
        config["attack_eps"], config["attack_step"], steps, seed=0, compute_dtype=compute_dtype
    )

    @tf.function
    def predictions(x, y):
        x_adv = pgd(model, x, y)
        return [tf.argmax(model(v, training=False), -1, output_type=tf.int32) for v in (x, x_adv)]

    clean, robust = predictions(tf.constant(images), tf.constant(labels.astype("int32")))
    return int(np.sum(clean.numpy() == labels)), int(np.sum(robust.numpy() == labels))


def _evaluate(model_dir, *extra):
    """evaluate's report, and the dtypes the model's first convolution received meanwhile
    (clean and PGD alike: a PGD left in float32 under bfloat16 would add float32)."""
    from twins_tf.evaluation import inputs

    seen, load_model = set(), inputs.load_model

    def spied_model(settings):
        model = load_model(settings)
        conv = model.get_layer("conv1")
        conv_call = conv.call

        def spy_conv(x, *args, **kwargs):
            seen.add(keras.backend.standardize_dtype(x.dtype))
            return conv_call(x, *args, **kwargs)

        conv.call = spy_conv
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inputs, "load_model", spied_model)
        report = evaluation.evaluate(
            evaluate_settings(
                [f"--model_dir={model_dir}", "--attacks=clean,pgd3", f"--max_examples={EXAMPLES}"]
                + list(extra)
            ),
            log=lambda _: None,
        )
    return report, seen


def test_evaluate_in_bfloat16_is_the_library_pgd_under_mixed_bfloat16(run_copy, float32_policy):
    bf16, bf16_dtypes = _evaluate(run_copy, "--precision=bfloat16")
    fp32, fp32_dtypes = _evaluate(run_copy)
    assert keras.config.dtype_policy().name == "float32"  # put back
    assert (bf16_dtypes, fp32_dtypes) == ({"bfloat16"}, {"float32"})
    for report, policy, compute_dtype in (
        (bf16, "mixed_bfloat16", None),
        (fp32, "float32", "float32"),
    ):
        got = (report["results"]["clean"]["correct"], report["results"]["pgd3"]["correct"])
        assert got == _library_accuracies(run_copy, policy, compute_dtype, 3), policy
    assert (bf16["precision"], fp32["precision"]) == ("bfloat16", "float32")
    # each has its own report file in the run, recording its precision
    reports = {
        json.loads(path.read_text())["precision"]: path.name
        for path in run_copy.glob("evaluation_test_linf_eps*.json")
    }
    assert sorted(reports) == ["bfloat16", "float32"] and len(set(reports.values())) == 2
    assert "in bfloat16" in evaluation.format_table(bf16)
    assert "bfloat16" not in evaluation.format_table(fp32)


@pytest.mark.parametrize(
    "attacks",
    [[], ["--attacks=pgd5,autoattack"]],  # [] : the default --attacks include autoattack
)
def test_evaluate_refuses_bfloat16_autoattack(run_copy, attacks):
    with pytest.raises(SetupError) as error:
        evaluation.evaluate(
            evaluate_settings(
                [f"--model_dir={run_copy}", "--precision=bfloat16", "--max_examples=4", *attacks]
            ),
            progress=False,
        )
    assert str(error.value) == (
        "--precision=bfloat16 runs clean and PGD in bfloat16 but AutoAttack only in "
        "float32: drop autoattack from --attacks (e.g. --attacks=clean,pgd10) or evaluate "
        "it in a float32 run."
    )


def test_evaluate_refuses_an_unknown_precision_from_the_library(run_copy):
    with pytest.raises(SetupError) as error:
        evaluation.evaluate({"model_dir": str(run_copy), "precision": "mixed_bfloat16"})
    assert str(error.value) == "--precision='mixed_bfloat16' is not one of float32, bfloat16."
