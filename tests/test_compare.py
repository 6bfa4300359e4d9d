"""`twins_tf.comparison` / `python -m twins_tf.compare`: statistics, report, the grid of runs.

The statistics are checked against hand computations with NumPy and Student-t quantiles from a
printed table (not scipy, which the code under test uses); the grid against the runs'
config.json and an evaluation the test runs itself through `evaluate`.
"""

import base64
import dataclasses
import json
import re
import statistics

import numpy as np
import pytest
from binaries_testlib import (
    FINETUNE_ARGS,
    TINY,
    evaluate_settings,
    run_binary,
    settings,
    source_run,
)

from twins_tf import comparison
from twins_tf.evaluation import evaluate
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError

# Two-sided 95 % Student-t quantiles t(0.975, df), from a statistics table.
T_975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263}


def _reference_interval(a, b):
    d = np.asarray(a, float) - np.asarray(b, float)
    half = T_975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


@pytest.mark.parametrize(
    "a, b",
    [
        ([0.61, 0.58, 0.66], [0.55, 0.57, 0.60]),
        ([0.2, 0.9], [0.3, 0.1]),
        ([0.5, 0.52, 0.47, 0.55], [0.5, 0.49, 0.5, 0.51]),
    ],
)
def test_paired_difference_is_the_student_t_interval(a, b):
    mean, low, high = comparison.paired_difference(a, b)
    np.testing.assert_allclose((mean, low, high), _reference_interval(a, b), rtol=1e-9)


def test_paired_difference_without_spread_or_with_one_seed():
    assert comparison.paired_difference([0.6, 0.7], [0.5, 0.6]) == (
        pytest.approx(0.1),
        None,
        None,
    )
    assert comparison.paired_difference([0.6], [0.5]) == (pytest.approx(0.1), None, None)
    with pytest.raises(ValueError, match="same seeds"):
        comparison.paired_difference([0.6, 0.7], [0.5])


def test_mean_and_sd_are_the_sample_statistics():
    values = [0.61, 0.58, 0.66, 0.7]
    mean, sd = comparison.mean_and_sd(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert sd == pytest.approx(statistics.stdev(values))
    assert comparison.mean_and_sd([0.5]) == (0.5, None)


def _fake(method, seed, clean, pgd, epochs=3):
    metrics = [
        {
            "epoch": e + 1,
            "loss": 2.0 - 0.1 * e,
            "clean_loss": 1.5 - 0.1 * e,
            "clean_acc": 0.1 * e + clean / 2,
            "adv_loss": 2.5 - 0.1 * e,
            "adv_acc": 0.05 * e,
            "val_clean_loss": 1.6 - 0.1 * e,
            "val_clean_acc": 0.1 * e,
            "val_adv_loss": 2.6 - 0.1 * e,
            "val_adv_acc": 0.04 * e,
            **(
                {"frozen_adv_acc": 0.03 * e, "adaptive_adv_acc": 0.06 * e}
                if method.startswith("twins")
                else {}
            ),
        }
        for e in range(epochs)
    ]
    evaluation = {
        "results": {"clean": {"accuracy": clean}, "pgd10": {"accuracy": pgd}},
        "epsilon": 8 / 255,
        "examples": 100,
        "split": "test",
    }
    config = {
        "arch": "resnet18",
        "dataset": "digits_5_9",
        "pretrained": "/src.weights.h5",
        "method": method.split("+")[0],  # a variant's runs have its method
        "seed": seed,
        "model_dir": f"/runs/{method}_{seed}",
        "epochs": epochs,
        "lr": 0.01,
        "lr_decay_epochs": [2],
        "weight_decay": 1e-3,
        "twin": method.startswith("twins"),
    }
    return comparison.RunResult(method, seed, f"/runs/{method}_{seed}", config, metrics, evaluation)


def test_summary_pairs_runs_by_seed_whatever_their_order():
    results = [
        _fake("at", 0, 0.70, 0.40),
        _fake("at", 1, 0.72, 0.45),
        _fake("at", 2, 0.69, 0.41),
        _fake("twins_at", 2, 0.74, 0.43),
        _fake("twins_at", 0, 0.75, 0.44),
        _fake("twins_at", 1, 0.71, 0.47),
    ]
    summary = comparison.summarise(results, ["clean", "pgd10"], "at")
    at_clean = summary["methods"]["at"]["clean"]
    assert at_clean["mean"] == pytest.approx(np.mean([0.70, 0.72, 0.69]))
    assert at_clean["sd"] == pytest.approx(np.std([0.70, 0.72, 0.69], ddof=1))
    difference = summary["differences"]["twins_at"]["pgd10"]
    expected = _reference_interval([0.44, 0.47, 0.43], [0.40, 0.45, 0.41])  # seeds 0, 1, 2
    np.testing.assert_allclose(
        (difference["mean"], difference["low"], difference["high"]), expected, rtol=1e-9
    )
    table = comparison.format_table(summary, ["clean", "pgd10"])
    assert re.search(r"twins_at - at\s+\+3\.00 \[", table)
    assert "Student-t" in table


def _fake_autolora(seed, lr_scales, epochs=12):
    """An AutoLoRa row's run on the paper's schedule whose rate was halved where `lr_scales`
    (metrics.csv's autolora_lr_scale after each epoch) drops; fewer rows than `epochs`: the
    lr floor stopped it."""
    result = _fake("autolora+lora_rank=8", seed, 0.7, 0.4, epochs=len(lr_scales))
    for row, scale in zip(result.metrics, lr_scales):
        row["autolora_lr_scale"] = scale
    settings = dict(result.settings, lr=0.01, weight_decay=1e-4, lr_decay_epochs=[], epochs=epochs)
    return dataclasses.replace(result, settings=settings)


def test_the_table_shows_the_schedule_each_row_ran():
    """The fixed schedule of every trained row, whether it is the method's published one
    (AutoLoRa: lr 0.01, weight decay 1e-4, no step decay), and per seed the epochs after
    which AutoLoRa halved its rate (the paper's checks fall after epochs 5, 9, 13, ...)."""
    results = [_fake("at", s, 0.7, 0.4) for s in (0, 1)] + [
        _fake_autolora(0, [1.0] * 4 + [0.5] * 4 + [0.25]),
        _fake_autolora(1, [1.0] * 12),
    ]
    summary = comparison.summarise(results, ["clean", "pgd10"], "at")
    table = comparison.format_table(summary, ["clean", "pgd10"])
    assert "  at: lr 0.01, weight decay 0.001, x0.1 at epochs 2\n" in table
    assert (
        "  autolora+lora_rank=8: lr 0.01, weight decay 0.0001, no step decay (the method's "
        "published schedule)\n" in table
    )
    assert (
        "  autolora+lora_rank=8: lr halved on val_adv_acc after epochs: seed 0: 5, 9 (stopped "
        "at the lr floor after epoch 9); seed 1: never\n" in table + "\n"
    )
    ran = summary["schedules"]["autolora+lora_rank=8"]
    assert ran["schedule"]["as_published"] is True
    assert ran["automated"]["0"]["halved_after_epochs"] == [5, 9]
    assert ran["automated"]["1"]["stopped_early"] is False
    assert summary["schedules"]["at"]["automated"] is None
    chosen = dataclasses.replace(
        results[2], settings=dict(results[2].settings, lr_decay_epochs=[30, 50])
    )
    table = comparison.format_table(comparison.summarise([chosen], ["clean"], "x"), ["clean"])
    assert (
        "x0.1 at epochs 30, 50 (chosen for the run: not the method's published schedule)" in table
    )


def test_curves_plot_one_meaning_per_name_and_read_earlier_runs_by_theirs():
    """A run written before the training clean_acc/adv_acc meant the inference forward for
    every method (TRADES-style runs had the training forward's) is left out of those curves;
    columns renamed with their meaning unchanged (the wings', val_loss) are read."""
    from twins_tf.comparison import report

    earlier = {
        "epoch": 1,
        "loss": 2.0,
        "clean_acc": 0.5,
        "adv_acc": 0.3,
        "val_loss": 1.1,
        "val_clean_acc": 0.4,
        "val_adv_acc": 0.2,
        "frozen_acc": 0.1,
        "adaptive_acc": 0.2,
    }
    assert [report.metric_value(earlier, c) for c in ("clean_acc", "adv_acc")] == [None, None]
    assert report.metric_value(earlier, "val_clean_acc") == 0.4
    assert report.metric_value(earlier, "val_clean_loss") == 1.1
    assert report.metric_value(earlier, "frozen_adv_acc") == 0.1
    old = dataclasses.replace(_fake("twins_trades", 0, 0.7, 0.4, epochs=1), metrics=[earlier])
    now = _fake("twins_at", 0, 0.7, 0.4, epochs=1)
    assert list(report._curves_by_method([old, now], "clean_acc")) == ["twins_at"]
    assert list(report._curves_by_method([old, now], "adaptive_adv_acc")) == [
        "twins_trades",
        "twins_at",
    ]


def test_report_has_the_table_embedded_plots_and_model_cards(tmp_path):
    results = [
        _fake(m, s, 0.7 + 0.01 * s, 0.4 + 0.02 * s) for m in ("at", "twins_at") for s in (0, 1)
    ]
    summary, table = comparison.write_report(results, ["clean", "pgd10"], "at", tmp_path)
    page = (tmp_path / "report.html").read_text()
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pngs) == 3  # curves, wings (twin methods), scatter
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "twins_at - at" in page and (tmp_path / "report.txt").read_text().strip() == table
    json.loads((tmp_path / "report.json").read_text())
    card = json.loads(
        (tmp_path / "model_cards" / "digits_5_9" / "Linf" / "twins_at_seed1.json").read_text()
    )
    assert card["clean_acc"] == "71.0" and card["autoattack_acc"] == ""  # not measured
    assert card["architecture"] == "ResNet-18" and card["eps"] == "8/255"
    extra = card["twins_tf"]
    for key in ("method", "seed", "pretrained", "settings_hash", "norm", "accuracy"):
        assert key in extra
    assert extra["accuracy"]["clean"] == pytest.approx(0.71)
    assert extra["not_measured"] == ["autoattack_acc"]


def test_settings_hash_ignores_locations_but_not_what_is_learnt():
    a = {"lr": 0.01, "model_dir": "/a", "data_dir": "/x", "method": "at"}
    assert comparison.settings_hash(a) == comparison.settings_hash(dict(a, model_dir="/b"))
    assert comparison.settings_hash(a) != comparison.settings_hash(dict(a, lr=0.02))
    assert comparison.settings_hash(a) != comparison.settings_hash(dict(a, epochs=60))


def test_grid_trains_evaluates_and_reuses_finished_runs(tmp_path_factory, tmp_path):
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    base = settings("train", [*FINETUNE_ARGS, "--epochs=1", f"--pretrained={pretrained}"])
    grid = dict(
        methods=["at", "twins_at"],
        seeds=[0, 1],
        baseline="at",
        output_dir=tmp_path,
        attacks=["clean", "pgd2"],
        max_examples=32,
        batch_size=32,
    )
    summary, table = comparison.compare(base, **grid, log=lambda *_: None)
    for method in ("at", "twins_at"):
        for seed in (0, 1):
            run = tmp_path / "runs" / f"{method}_seed{seed}"
            config = run_files.read_config(run)
            assert (config["method"], config["seed"]) == (method, seed)
            stored = json.loads((run / comparison.EVALUATION_FILE).read_text())
            cell = summary["methods"][method]["pgd2"]
            assert (
                cell["values"][cell["seeds"].index(seed)] == stored["results"]["pgd2"]["accuracy"]
            )
            assert stored["examples"] == 32
    assert (tmp_path / "report" / "report.html").is_file()
    own = evaluate(
        evaluate_settings(
            [
                f"--model_dir={tmp_path / 'runs' / 'twins_at_seed1'}",
                "--attacks=clean,pgd2",
                "--max_examples=32",
                f"--output={tmp_path / 'own.json'}",
            ]
        ),
        log=lambda _: None,
    )
    for attack in ("clean", "pgd2"):
        cell = summary["methods"]["twins_at"][attack]
        assert cell["values"][cell["seeds"].index(1)] == own["results"][attack]["accuracy"]
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.weights.h5")}
    logged = []
    again, _ = comparison.compare(base, **grid, log=logged.append)
    assert again["methods"] == summary["methods"]
    assert {p: p.stat().st_mtime for p in before} == before  # nothing retrained


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method=at"], "--method is set per run by compare; use --methods"),
        (["--methods=at,twins_at", "--baseline=trades"], "--baseline=trades is not among"),
        (["--seeds=0,x"], "--seeds must be integers"),
        (["--methods=at,at+bogus=1"], "'bogus' is no variant key; KEY is a train flag: dataset, "),
    ],
)
def test_binary_refuses_bad_flags_in_one_line(tmp_path, args, message):
    result = run_binary("compare", ["--dataset=digits_5_9", f"--output_dir={tmp_path}", *args])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("compare: error: ") and message in last, result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_binary_needs_an_output_dir():
    """(With a shipped flagfile, which sets --method: only a typed --method is refused.)"""
    result = run_binary("compare", ["--flagfile=flags/cifar10.flags"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("compare: error: --output_dir is")


# --- variants and interpolation rows ---------------------------------------------------------
def _base(tmp_path, *extra):
    return settings(
        "train",
        [
            "--dataset=digits_5_9",
            *TINY,
            "--epochs=1",
            f"--pretrained={tmp_path / 'src.weights.h5'}",
            *extra,
        ],
    )


def test_a_variant_is_named_by_its_canonical_spelling():
    plain = comparison.parse_variant("at")
    assert (plain.name, plain.dir_name, plain.overrides) == ("at", "at", ())
    variant = comparison.parse_variant("twins_at+lambda_twins=0.5+beta=3")
    assert variant == comparison.parse_variant("twins_at+beta=3+lambda_twins=0.5")
    assert variant.name == "twins_at+beta=3+lambda_twins=0.5"
    assert variant.dir_name == "twins_at+beta-3+lambda_twins-0.5"
    fraction = comparison.parse_variant("at+attack_eps=8/255")
    assert re.fullmatch(r"at\+attack_eps-8_255-[0-9a-f]{8}", fraction.dir_name)
    assert fraction.dir_name != comparison.parse_variant("at+attack_eps=8_255").dir_name
    assert comparison.run_dir("/out", plain, 2) == "/out/runs/at_seed2"
    assert (
        comparison.run_dir("/out", variant, 0) == "/out/runs/twins_at+beta-3+lambda_twins-0.5_seed0"
    )


def test_a_variant_takes_values_as_the_train_flags_parse_them(tmp_path):
    base = _base(tmp_path)
    variant = comparison.parse_variant("at+attack_eps=4/255+lr_decay_epochs=3:5+epochs=2")
    values = comparison.variant_settings(variant, base, model_dir=str(tmp_path / "r"), seed=3)
    # The reference: the same run spelt as train flags.
    expected = settings(
        "train",
        [
            "--dataset=digits_5_9",
            *TINY,
            "--epochs=2",
            f"--pretrained={tmp_path / 'src.weights.h5'}",
            "--method=at",
            "--attack_eps=4/255",
            "--lr_decay_epochs=3,5",
            "--seed=3",
            f"--model_dir={tmp_path / 'r'}",
        ],
    )
    assert values == expected
    assert values["attack_eps"] == pytest.approx(4 / 255)


@pytest.mark.parametrize(
    "spelling, message",
    [
        ("at+nonsense=3", "'nonsense' is no variant key; KEY is a train flag: "),
        ("at+seed=3", "'seed' is no variant key (compare sets it per run)"),
        ("at+epochs", "'epochs' is not KEY=VALUE"),
        ("at+epochs=2+epochs=3", "sets epochs twice"),
        ("+epochs=2", "names no method"),
        ("at+epochs=x", "--methods entry 'at+epochs=x': "),
        ("at+epochs=0", "--methods entry 'at+epochs=0': --epochs must be at least 1."),
        ("nomethod+epochs=2", "Unknown --method='nomethod'"),
    ],
)
def test_bad_variants_are_refused_in_one_line_before_any_work(tmp_path, spelling, message):
    with pytest.raises(SetupError) as error:
        comparison.compare(
            _base(tmp_path), methods=["at", spelling], seeds=[0], baseline="at", output_dir=tmp_path
        )
    assert message in str(error.value) and "\n" not in str(error.value)
    if "KEY is a train flag" in message:
        assert "lambda_twins, l2sp_alpha" in str(error.value)  # the valid keys are named
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "methods, interpolate, message",
    [
        (["at"], ["at+epochs=2"], "--interpolate=at+epochs=2 is not among --methods"),
        (["at", "at+epochs=2"], ["at+epochs=2"], "that variant has init=random"),
        (["at"], ["at"], "that variant has init=random"),
    ],
)
def test_interpolation_rows_need_a_variant_with_an_init_stage(
    tmp_path, methods, interpolate, message
):
    with pytest.raises(SetupError, match=re.escape(message)):
        comparison.compare(
            _base(tmp_path),
            methods=methods,
            seeds=[0],
            baseline="at",
            output_dir=tmp_path,
            interpolate=interpolate,
        )
    assert not (tmp_path / "runs").exists()


def test_interpolation_rows_need_a_held_out_validation_split(tmp_path):
    variant = "at+init=robust_linear_probe"
    with pytest.raises(SetupError, match="trains with --validation=none"):
        comparison.compare(
            _base(tmp_path, "--validation=none"),
            methods=["at", variant],
            seeds=[0],
            baseline="at",
            output_dir=tmp_path,
            interpolate=[variant],
        )
    assert not (tmp_path / "runs").exists()
    comparison.plan_rows(
        _base(tmp_path, "--validation=none"),  # the variant may carve
        ["at", variant + "+validation=carve"],
        [0],
        tmp_path,
        [variant + "+validation=carve"],
    )


def test_variants_of_one_spelling_are_one_row(tmp_path):
    with pytest.raises(SetupError, match="must not repeat"):
        comparison.compare(
            _base(tmp_path),
            methods=["at+beta=1+epochs=2", "at+epochs=2+beta=1"],
            seeds=[0],
            baseline="at+beta=1+epochs=2",
            output_dir=tmp_path,
        )


def _fake_wise(variant, seed, clean, pgd, alpha):
    result = _fake(variant, seed, clean, pgd)
    return dataclasses.replace(
        result,
        method=f"wise({variant})",
        metrics=[],
        interpolation={"alpha": alpha, "endpoints": ["/a/init", "/a"], "validation": []},
    )


def test_report_of_variants_and_interpolation_rows(tmp_path):
    variant = "twins_at+init=robust_linear_probe"
    values = {
        "at": [(0.70, 0.40), (0.72, 0.45), (0.69, 0.41)],
        variant: [(0.74, 0.43), (0.75, 0.44), (0.71, 0.47)],
        f"wise({variant})": [(0.76, 0.46), (0.70, 0.42), (0.73, 0.50)],
    }
    results = [_fake("at", s, *values["at"][s]) for s in range(3)]
    results += [_fake(variant, s, *values[variant][s]) for s in range(3)]
    results += [
        _fake_wise(variant, s, *values[f"wise({variant})"][s], alpha=0.25 * s) for s in (2, 0, 1)
    ]
    summary, table = comparison.write_report(results, ["clean", "pgd10"], "at", tmp_path)
    difference = summary["differences"][f"wise({variant})"]["pgd10"]
    expected = _reference_interval([0.46, 0.42, 0.50], [0.40, 0.45, 0.41])
    np.testing.assert_allclose(
        (difference["mean"], difference["low"], difference["high"]), expected, rtol=1e-9
    )
    assert summary["alphas"] == {f"wise({variant})": {"0": 0.0, "1": 0.25, "2": 0.5}}
    assert f"wise({variant}): alpha chosen on validation" in table
    assert "seed 0: 0, seed 1: 0.25, seed 2: 0.5" in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.endswith("seeds)")}
    assert f"wise({variant})" in rows and variant in rows
    header = table.splitlines()[0]  # columns stay aligned under the long labels
    assert all(rows[row].index("   (3 seeds)") == len(header) for row in values)
    assert re.search(rf"wise\({re.escape(variant)}\) - at\s+\+2\.67 \[.*\] +\+4\.00 \[", table)
    card = json.loads(
        (
            tmp_path
            / "model_cards"
            / "digits_5_9"
            / "Linf"
            / "wise-twins_at+init-robust_linear_probe_seed1.json"
        ).read_text()
    )
    assert card["twins_tf"]["interpolation"] == {"alpha": 0.25, "endpoints": ["/a/init", "/a"]}
    assert card["twins_tf"]["row"] == f"wise({variant})" and card["clean_acc"] == "70.0"
    page = (tmp_path / "report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 3


def test_the_wing_plot_has_the_twin_rows_only(tmp_path):
    variant = "twins_at+init=robust_linear_probe"
    results = [
        _fake("at", 0, 0.7, 0.4),
        _fake(variant, 0, 0.7, 0.4),
        _fake_wise(variant, 0, 0.7, 0.4, 0.5),
    ]
    figure = comparison.plot_wings(results)
    assert [axis.get_title() for axis in figure.axes] == [
        f"{variant}: PGD accuracy per wing (training forward)"
    ]
    assert comparison.plot_wings(results[:1]) is None


@pytest.mark.slow  # ~4 min: 2 rows x 2 seeds, each variant run with its init sub-run, and
# the interpolation of each: the size of a real grid's bookkeeping, at tiny data
def test_grid_with_a_variant_and_its_interpolation_row(tmp_path_factory, tmp_path):
    """A grid of a method and a variant with an init stage, and the variant's wise(...) row."""
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    base = settings("train", [*FINETUNE_ARGS, "--epochs=1", f"--pretrained={pretrained}"])
    # AT, not TWINS-AT: a probed head on the tiny two-epoch source makes its Frozen wing diverge.
    variant = "at+init=robust_linear_probe+init_epochs=1"
    wise = f"wise({variant})"
    grid = dict(
        methods=["at", variant],
        seeds=[0, 1],
        baseline="at",
        output_dir=tmp_path,
        attacks=["clean", "pgd2"],
        max_examples=32,
        batch_size=32,
        interpolate=[variant],
        interpolation_args={"alphas": [0.0, 0.5, 1.0], "validation_examples": 16},
    )
    summary, table = comparison.compare(base, **grid, log=lambda *_: None)
    dirs = {
        "at": "at",
        variant: "at+init-robust_linear_probe+init_epochs-1",
        wise: "wise-at+init-robust_linear_probe+init_epochs-1",
    }
    for seed in (0, 1):
        run = tmp_path / "runs" / f"{dirs['at']}_seed{seed}"
        config = run_files.read_config(run)
        assert (config["method"], config["seed"], config["init"]) == ("at", seed, "random")
        run = tmp_path / "runs" / f"{dirs[variant]}_seed{seed}"
        config = run_files.read_config(run)
        assert (config["method"], config["seed"]) == ("at", seed)
        assert (config["init"], config["init_epochs"]) == ("robust_linear_probe", 1)
        interpolation = json.loads(
            (tmp_path / "runs" / f"{dirs[wise]}_seed{seed}" / "interpolation.json").read_text()
        )
        # The row interpolates this very run's init sub-run (alpha 0) and final weights (1).
        assert interpolation["request"]["run_a"]["model_dir"] == str(run / "init")
        assert interpolation["request"]["run_b"]["model_dir"] == str(run)
        assert summary["alphas"][wise][str(seed)] == interpolation["best_alpha"]
        assert f"seed {seed}: {interpolation['best_alpha']:g}" in table
        for row in (variant, "at", wise):
            stored = json.loads(
                (
                    tmp_path / "runs" / f"{dirs[row]}_seed{seed}" / comparison.EVALUATION_FILE
                ).read_text()
            )
            cell = summary["methods"][row]["pgd2"]
            assert (
                cell["values"][cell["seeds"].index(seed)] == stored["results"]["pgd2"]["accuracy"]
            )
            assert stored["examples"] == 32 and stored["split"] == "test"
    assert (tmp_path / "report" / "report.html").is_file()
    card = json.loads(
        (
            tmp_path / "report" / "model_cards" / "digits_5_9" / "Linf" / f"{dirs[wise]}_seed1.json"
        ).read_text()
    )
    assert card["twins_tf"]["interpolation"]["endpoints"][0].endswith("_seed1/init")
    own = {}
    for seed in (0, 1):  # the wise rows evaluated here, through evaluate, not compare
        report = evaluate(
            evaluate_settings(
                [
                    f"--model_dir={tmp_path / 'runs' / f'{dirs[wise]}_seed{seed}'}",
                    "--attacks=clean,pgd2",
                    "--max_examples=32",
                    f"--output={tmp_path / 'own.json'}",
                ]
            ),
            log=lambda _: None,
        )
        own[seed] = {a: report["results"][a]["accuracy"] for a in ("clean", "pgd2")}
    for attack in ("clean", "pgd2"):
        cell = summary["methods"][wise][attack]
        assert cell["values"] == [own[s][attack] for s in cell["seeds"]]
        baseline = [
            json.loads(
                (tmp_path / "runs" / f"at_seed{s}" / comparison.EVALUATION_FILE).read_text()
            )["results"][attack]["accuracy"]
            for s in (0, 1)
        ]
        difference = summary["differences"][wise][attack]
        expected = _reference_interval([own[s][attack] for s in (0, 1)], baseline)
        np.testing.assert_allclose(
            (difference["mean"], difference["low"], difference["high"]),
            expected,
            rtol=1e-9,
            atol=1e-12,
        )
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.weights.h5")}
    assert any("/init/" in str(p) for p in before) and any("wise-" in str(p) for p in before)
    again, _ = comparison.compare(base, **grid, log=lambda *_: None)
    assert again["methods"] == summary["methods"] and again["alphas"] == summary["alphas"]
    assert {p: p.stat().st_mtime for p in before} == before  # nothing retrained


def test_the_interpolate_flags_become_interpolate_runs_arguments():
    from twins_tf import compare

    assert compare.interpolation_args(["0", "0.25", "1"], "clean", 40) == {
        "alphas": [0.0, 0.25, 1.0],
        "select": "clean",
        "validation_examples": 40,
    }
    assert compare.interpolation_args(None, "robust", None) == {"select": "robust"}
    with pytest.raises(SetupError, match="--interpolate_alphas must be numbers"):
        compare.interpolation_args(["0", "half"], "robust", None)
