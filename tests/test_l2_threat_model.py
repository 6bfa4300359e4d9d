"""The L2 threat model end to end: `--attack_norm=l2` in training, evaluation, compare's
report and model cards, interpolation, and the refusals of radii wrong for their norm.

References are independent of the code under test: the training attack's iterates are checked
against the L2 ball and the [0, 1] box with numpy, and AutoAttack through `evaluate` against
the library's own `AutoAttack(..., norm="l2")` on the same examples (a cheap budget, as the
other binary tests use).
"""

import json

import numpy as np
import pytest
import quick_autoattack
from binaries_testlib import (
    SOURCE_ARGS,
    evaluate_settings,
    evaluated_examples,
    file_snapshot,
    settings,
    source_run,
)

from twins_tf import evaluation, interpolation
from twins_tf.attacks import autoattack
from twins_tf.comparison import cards
from twins_tf.comparison import report as compare_report
from twins_tf.comparison.rows import RunResult, settings_hash
from twins_tf.training import loop
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import Settings, SetupError

L2_EPS, L2_STEP = 0.5, 0.25
# The tiny runs' 16-pixel RGB images: the L2 diagonal of their [0, 1] box is sqrt(768) = 27.7.
IMAGE_SHAPE = (16, 16, 3)
L2_ARGS = ["--attack_norm=l2", f"--attack_eps={L2_EPS}", f"--attack_step={L2_STEP}"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The cached tiny L-inf PGD-AT run (digits 0-4, 16 px)."""
    return source_run(tmp_path_factory)


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    """A one-epoch tiny `pretrain` run trained against L2 PGD (eps 0.5)."""
    model_dir = tmp_path_factory.mktemp("l2") / "run"
    args = [*SOURCE_ARGS, *L2_ARGS, "--epochs=1", f"--model_dir={model_dir}"]
    loop.run(settings("pretrain", args), verbose=0)
    return model_dir


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(autoattack, "AutoAttack", quick_autoattack.QuickAutoAttack)


def _l2_norms(delta):
    return np.sqrt(np.sum(np.square(delta.astype(np.float64)), axis=(1, 2, 3)))


# --- training: the attack the trainer runs --------------------------------------------------
def test_every_iterate_of_the_l2_training_attack_is_in_the_l2_ball_and_the_image_box(tmp_path):
    """`make_trainer`'s PGD for an L2 run, observed iterate by iterate: PGD with `steps=j` and
    the same start seed is the j-th iterate of the k-step attack (its last one is the trainer's
    own output), each checked per example with numpy."""
    import tensorflow as tf

    from twins_tf.attacks.pgd import PGD
    from twins_tf.models.registry import build_model
    from twins_tf.training.trainer_setup import make_trainer

    steps = 6
    s = Settings.from_dict(
        settings(
            "pretrain",
            [
                *SOURCE_ARGS,
                *L2_ARGS,
                f"--attack_steps={steps}",
                f"--model_dir={tmp_path / 'run'}",
            ],
        )
    )
    model = build_model("resnet18", 5, input_shape=IMAGE_SHAPE)
    trainer = make_trainer(model, s, steps_per_epoch=1)
    attack = trainer.attack
    assert (attack.norm, attack.epsilon, attack.random_start) == ("l2", L2_EPS, True)
    assert trainer.eval_attack.norm == "l2"

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, *IMAGE_SHAPE)).astype(np.float32)
    x[:, :4] = 0.0  # saturated rows: the [0, 1] clip is exercised, not only the L2 projection
    x[:, -4:] = 1.0
    y = rng.integers(0, 5, size=8).astype(np.int32)
    seed = tf.constant([3, 11], tf.int64)
    config = attack.get_config()
    iterates = [
        PGD(**{**config, "steps": j})(model, x, y, seed=seed).numpy() for j in range(steps + 1)
    ]
    np.testing.assert_array_equal(iterates[-1], attack(model, x, y, seed=seed).numpy())
    tolerance = L2_EPS * 1e-5  # float32 rounding of the rescale in the projection
    for j, x_adv in enumerate(iterates):
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, f"iterate {j} leaves [0, 1]"
        norms = _l2_norms(x_adv - x)
        assert (norms <= L2_EPS + tolerance).all(), f"iterate {j}: L2 norms {norms}"
    # the steps reach the sphere (so the projection was needed) and every step moves
    assert _l2_norms(iterates[-1] - x).max() > 0.9 * L2_EPS
    assert all(np.abs(a - b).max() > 0 for a, b in zip(iterates, iterates[1:]))


def test_an_l2_run_records_its_norm_and_is_another_run_than_the_linf_one(l2_run):
    config = json.loads((l2_run / run_files.CONFIG_FILE).read_text())
    assert (config["attack_norm"], config["attack_eps"], config["attack_step"]) == (
        "l2",
        L2_EPS,
        L2_STEP,
    )
    summary = run_files.read_summary(l2_run)
    assert summary["attack"] == {
        "norm": "l2",
        "epsilon": L2_EPS,
        "step_size": L2_STEP,
        "steps": 1,
    }
    # the same numbers at L-inf are a different run: refused in its model_dir, another hash
    linf = dict(config, attack_norm="linf")
    with pytest.raises(SetupError, match="attack_norm: 'l2' in the run, 'linf' now"):
        run_files.check_model_dir(str(l2_run), linf)
    assert settings_hash(linf) != settings_hash(config)


# --- evaluation ---------------------------------------------------------------------------------
@pytest.mark.slow  # about 45 s: two AutoAttack runs, each tracing its four sub-attacks
def test_evaluate_autoattack_l2_equals_the_library_call_per_example(source, quick, tmp_path):
    """`evaluate --attack_norm=l2` on an L-inf run: AutoAttack's per-example outcome is the
    library's `AutoAttack(eps, norm="l2")` on the same examples and batch."""
    from twins_tf.evaluation import inputs

    examples, batch, epsilon = 10, 10, 2.0
    output = tmp_path / "report.json"
    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={source}",
                "--attacks=autoattack",
                "--attack_norm=l2",
                f"--attack_eps={epsilon}",
                f"--max_examples={examples}",
                f"--batch_size={batch}",
                f"--output={output}",
            ]
        ),
        progress=False,
        log=lambda *_: None,
    )
    model = inputs.load_model(inputs.resolve({"model_dir": str(source)}))
    images, labels = evaluated_examples(source, examples)
    # the library call (with the tests' lowered budget: QuickAutoAttack, as evaluate runs here)
    reference = quick_autoattack.QuickAutoAttack(epsilon, norm="l2").run(
        model, (images, labels), batch_size=batch, keep_adversarial=False, verbose=0
    )
    entry = report["results"]["autoattack"]
    assert (report["norm"], report["epsilon"]) == ("l2", epsilon)
    assert (entry["norm"], entry["epsilon"]) == ("l2", epsilon)
    np.testing.assert_array_equal(entry["broken_by"], reference.broken_by)
    assert entry["accuracy"] == float(reference.robust_accuracy)
    # the radius does decide: some points are robust, some broken (not a trivial outcome)
    assert -1 in entry["broken_by"] and any(code >= 1 for code in entry["broken_by"])
    assert json.loads(output.read_text())["norm"] == "l2"
    assert "L2 eps 2" in evaluation.format_table(report)


def test_l2_and_linf_evaluations_of_one_run_at_one_number_write_separate_reports(source, tmp_path):
    """Both in the run's directory, with every other setting equal (so only the norm in the
    name keeps them apart); each PGD accuracy is the library's PGD in that norm on the same
    examples."""
    import shutil

    from twins_tf.attacks.pgd import PGD
    from twins_tf.evaluation import inputs

    run = tmp_path / "run"
    run.mkdir()
    for name in (run_files.BEST_WEIGHTS, run_files.SUMMARY_FILE, run_files.CONFIG_FILE):
        shutil.copy(source / name, run / name)
    examples, radius = 14, 0.5
    common = [f"--model_dir={run}", "--attacks=clean,pgd1", f"--max_examples={examples}"]
    common += [f"--attack_eps={radius}", f"--attack_step={radius}"]
    paths, reports = {}, {}
    for norm in ("l2", "linf"):
        (paths[norm],) = evaluation.evaluate_radii(
            evaluate_settings([*common, f"--attack_norm={norm}"]), log=lambda *_: None
        ).paths
        reports[norm] = json.loads(open(paths[norm]).read())
    assert paths["l2"] != paths["linf"]
    assert f"/evaluation_test_l2_eps{radius:g}_" in paths["l2"]
    assert f"/evaluation_test_linf_eps{radius:g}_" in paths["linf"]
    assert paths["l2"][-len("12345678.json") :] == paths["linf"][-len("12345678.json") :]
    model = inputs.load_model(inputs.resolve({"model_dir": str(run)}))
    images, labels = evaluated_examples(run, examples)
    for norm, report in reports.items():
        assert (report["norm"], report["epsilon"]) == (norm, radius)
        assert (report["results"]["pgd1"]["norm"], report["results"]["pgd1"]["step_size"]) == (
            norm,
            radius,
        )
        x_adv = PGD(radius, radius, 1, norm=norm)(model, images, labels)
        correct = np.argmax(model.predict(x_adv, verbose=0), axis=-1) == labels
        assert report["results"]["pgd1"]["accuracy"] == correct.mean(), norm


def test_evaluating_an_l2_run_takes_its_norm_and_its_card_and_table_carry_it(l2_run):
    (path,) = evaluation.evaluate_radii(
        evaluate_settings([f"--model_dir={l2_run}", "--attacks=clean,pgd1", "--max_examples=8"]),
        log=lambda *_: None,
    ).paths
    report = json.loads(open(path).read())
    assert f"/evaluation_test_l2_eps{L2_EPS:g}_" in path
    assert (report["norm"], report["epsilon"]) == ("l2", L2_EPS)
    assert report["results"]["pgd1"]["step_size"] == L2_STEP  # the run's L2 step
    config = run_files.read_config(l2_run)
    result = RunResult("at", 7, str(l2_run), config, [], report)
    card = cards.model_card(result)
    assert cards.card_path(result).split("/")[:3] == ["model_cards", "digits_0_4", "L2"]
    assert card["eps"] == "0.5" and card[cards.EXTRA_KEY]["norm"] == "l2"
    # an L-inf run beside it: the table names each row's threat model
    linf = RunResult(
        "at+attack_norm=linf",
        7,
        str(l2_run),
        dict(config, attack_norm="linf"),
        [],
        dict(result.evaluation, norm="linf", epsilon=8 / 255),
    )
    assert cards.card_path(linf).split("/")[2] == "Linf"
    models = compare_report.threat_models([result, linf])
    assert models == {"at": "L2 eps 0.5", "at+attack_norm=linf": "L-inf eps 8/255"}
    assert compare_report.threat_model_lines({"at": "L2 eps 0.5"}) == ["threat model: L2 eps 0.5"]


# --- refusals: one line, before anything is written ----------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (["--attack_norm=l1"], r"^--attack_norm must be one of linf, l2, got 'l1'\.$"),
        (["--attack_eps=3.0"], r"--attack_eps=3 is outside \[0, 1\].*--attack_norm=l2"),
        (["--attack_norm=l2", "--attack_eps=30"], r"--attack_eps=30 is longer than the diag"),
        (["--attack_norm=l2", "--attack_step=-0.5"], r"--attack_step=-0.5 is negative"),
    ],
)
def test_train_refuses_a_bad_norm_or_a_radius_wrong_for_its_norm(tmp_path, args, match):
    model_dir = tmp_path / "run"
    with pytest.raises(SetupError, match=match) as error:
        loop.run(settings("pretrain", [*SOURCE_ARGS, f"--model_dir={model_dir}", *args]))
    assert "\n" not in str(error.value)
    assert not model_dir.exists() and not list(tmp_path.iterdir())


def test_an_l2_radius_of_3_is_a_legal_run():
    s = Settings(
        binary="pretrain", dataset="cifar10", model_dir="/x", attack_norm="L2", attack_eps=3.0
    )
    assert (s.attack_norm, s.attack_eps) == ("l2", 3.0)
    with pytest.raises(SetupError, match="outside"):
        Settings(binary="pretrain", dataset="cifar10", model_dir="/x", attack_eps=3.0)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--attack_norm=l1"], r"^--attack_norm must be one of linf, l2, got 'l1'\.$"),
        (["--attack_eps=3.0"], r"the radius 3.0 is outside \(0, 1\].*--attack_norm=l2"),
        (
            ["--attack_norm=l2", "--attack_eps=30", "--attack_step=0.1"],
            r"--attack_eps=30: the L2 radius=30 is longer than the diagonal .* \(27\.71 for \(16, ",
        ),
        # the run trained at L-inf: its radius and step are not L2 ones
        (["--attack_norm=l2"], r"--attack_norm=l2: the run's attack_eps is an L-inf one"),
        (["--attack_norm=l2", "--attack_eps=0.5"], r"pass --attack_step in L2 units"),
    ],
)
def test_evaluate_refuses_a_bad_norm_or_radius_before_writing(source, args, match):
    before = file_snapshot(source)
    with pytest.raises(SetupError, match=match) as error:
        evaluation.evaluate(  # cheap attacks: were it not refused, it would end soon
            evaluate_settings(
                [f"--model_dir={source}", "--attacks=clean,pgd1", "--max_examples=4", *args]
            )
        )
    assert "\n" not in str(error.value)
    assert file_snapshot(source) == before


def test_interpolate_refuses_a_bad_norm_and_a_norm_without_its_radius(source, tmp_path):
    out = tmp_path / "wise"
    for kwargs, match in (
        (dict(attack_norm="l1"), "attack_norm must be one of linf, l2, got 'l1'"),
        (dict(attack_norm="l2"), "the runs' attack_eps is an L-inf one"),
        (dict(attack_eps=3.0), r"attack_eps=3 is outside \[0, 1\]"),
    ):
        with pytest.raises(SetupError, match=match):
            interpolation.interpolate_runs(source, source, out, **kwargs)
    assert not out.exists()


# --- the shipped L2 flagfiles -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_l2_flagfiles_are_their_dataset_s_recipe_with_the_l2_threat_model(name):
    from binaries_testlib import REPO_ROOT

    def run(flagfile):
        args = [f"--flagfile={flagfile}", "--model_dir=/unused", "--pretrained=/src.weights.h5"]
        return Settings.from_dict(settings("train", args)).to_dict()

    l2 = run(REPO_ROOT / "flags" / "l2" / f"{name}.flags")
    linf = run(REPO_ROOT / "flags" / f"{name}.flags")
    attack = ("attack_norm", "attack_eps", "attack_step", "attack_steps")
    assert [l2[k] for k in attack] == ["l2", 0.5, 0.125, 10]
    assert {k: v for k, v in l2.items() if k not in attack} == {
        k: v for k, v in linf.items() if k not in attack
    }
