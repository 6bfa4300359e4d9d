"""Methods x seeds on one task: ordinary runs, their evaluation, a table with intervals, plots.

One run of one seed on a few hundred test images separates nothing: the same `make demo`
command gave tables up to 14 points apart on two machines of one kind, and the ranking of two
methods flipped.  `compare` therefore trains every method with every seed, each as an ordinary
`train` run in its own model_dir (resumable; a finished run is reused, not retrained), evaluates
each on the same test examples and reports:

* per method and metric, the mean and the sample standard deviation over seeds;
* per method against a baseline, the **paired** difference (seed s of the method against
  seed s of the baseline: the same data order, augmentation and attack starts) with a 95 %
  Student-t interval, `scipy.stats.ttest_rel(...).confidence_interval()`.  A t interval rather
  than a bootstrap because there are only a handful of seeds: a bootstrap over 3 pairs has 10
  distinct resamples and an interval that is far too narrow.  With one seed there is no
  interval, and the table says so;
* plots (matplotlib, PNG) of the per-epoch training and validation accuracies (mean line and
  min-max band over seeds), of the two wings' training accuracy for twin methods (the paper's
  argument is about them), and of final clean against robust accuracy, all embedded in one
  `report.html` that opens offline;
* a model card per run (RobustBench's fields, plus method, seed, source and a settings hash).

A row is a method or a *variant* of one, `METHOD+KEY=VALUE...` (`at+init=robust_linear_probe`,
`autolora+lora_rank=8`): the method with some train settings changed, checked through `Settings`
like the flags.  A row `wise(VARIANT)` is, per seed, the weight-space interpolation
(`twins_tf.interpolation.interpolate_runs`, WiSE-FT) between that variant's init sub-run
(`<run>/init`, the linear probe) and its final weights, at the alpha that is best on
validation; it is evaluated on the same test examples as every row and paired with the
baseline like every row.

The binary is `python -m twins_tf.compare`; this module holds the logic.
"""

import base64
import dataclasses
import hashlib
import html
import io
import json
import os
import re

import numpy as np

from twins_tf.training import init_stage
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import EXECUTION_KEYS, LOCATION_KEYS, TRAIN, Settings, SetupError

# Metrics of the evaluation table: report key -> label.
CLEAN = "clean"
REPORT_DIR = "report"
RUNS_DIR = "runs"
EVALUATION_FILE = "compare_evaluation.json"
AUTOATTACK = "autoattack"
AUTOATTACK_FILE = "compare_autoattack.json"
CONFIDENCE = 0.95
# Per-epoch curves of metrics.csv: column -> title.
CURVES = {
    "clean_acc": "train clean accuracy",
    "adv_acc": "train PGD accuracy",
    "val_clean_acc": "validation clean accuracy",
    "val_adv_acc": "validation PGD accuracy",
}
WING_CURVES = {"frozen_acc": "Frozen wing", "adaptive_acc": "Adaptive wing"}
# Variants: METHOD+KEY=VALUE...; the train settings compare itself sets per run are no KEY.
VARIANT_SEPARATOR = "+"
PER_RUN_KEYS = ("method", "seed", "model_dir")
# A list-valued KEY separates its items with this (a comma separates --methods entries).
LIST_ITEM_SEPARATOR = ":"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")
RANDOM_INIT = "random"  # --init of a run without an init sub-run to interpolate from


@dataclasses.dataclass
class RunResult:
    """One (method, seed) run: where it lives, its per-epoch metrics and its evaluation."""

    method: str
    seed: int
    model_dir: str
    settings: dict
    metrics: list
    evaluation: dict
    # wise(...) rows: {"alpha", "endpoints", "validation"} of the interpolation; else None.
    interpolation: dict = None

    def accuracy(self, attack):
        result = self.evaluation["results"].get(attack)
        return None if result is None else result["accuracy"]


# --- rows: methods, variants, interpolations -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """A method with some train settings changed: `METHOD+KEY=VALUE...` of `--methods`.

    `overrides` holds (key, value as spelled) sorted by key, so `at+b=1+a=2` and `at+a=2+b=1`
    are one variant; a plain method has none.
    """

    method: str
    overrides: tuple = ()

    @property
    def name(self):
        """The canonical spelling: the table's row label."""
        return VARIANT_SEPARATOR.join([self.method, *(f"{k}={v}" for k, v in self.overrides)])

    @property
    def dir_name(self):
        """The spelling as a directory name: `=` becomes `-`; other characters outside
        [A-Za-z0-9._+-] (a `/` in `attack_eps=8/255`) become `_`, and then a hash of the
        spelling keeps two spellings apart.  A plain method is its own name (`at`), so run
        dirs of earlier comparisons are reused."""
        name = self.name.replace("=", "-")
        safe = _SAFE_NAME.sub("_", name)
        if safe != name:
            safe += "-" + hashlib.sha256(self.name.encode()).hexdigest()[:8]
        return safe


def variant_keys():
    """The KEYs a variant may set: every `train` flag but those compare sets per run."""
    from absl import flags

    from twins_tf.training.flags import define_flags

    names = define_flags(flags.FlagValues(), TRAIN)
    return [n for n in names if n not in PER_RUN_KEYS]


def parse_variant(spelling):
    """`METHOD[+KEY=VALUE...]` as a `Variant` (keys checked; values are checked against a
    run's settings by `variant_settings`).

    Raises:
      SetupError: an empty part, a part without `=`, a repeated or unknown key.
    """
    method, *parts = spelling.strip().split(VARIANT_SEPARATOR)
    if not method:
        raise SetupError(
            f"--methods entry {spelling!r} names no method: write METHOD or "
            "METHOD+KEY=VALUE..., e.g. at+init=robust_linear_probe."
        )
    overrides = {}
    for part in parts:
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise SetupError(
                f"--methods entry {spelling!r}: {part!r} is not KEY=VALUE "
                "(e.g. at+init=robust_linear_probe)."
            )
        keys = variant_keys()
        if key not in keys:
            per_run = " (compare sets it per run)" if key in PER_RUN_KEYS else ""
            raise SetupError(
                f"--methods entry {spelling!r}: {key!r} is no variant key"
                f"{per_run}; KEY is a train flag: {', '.join(keys)}."
            )
        if key in overrides:
            raise SetupError(f"--methods entry {spelling!r} sets {key} twice.")
        overrides[key] = value
    return Variant(method, tuple(sorted(overrides.items())))


def _override_values(variant):
    """The variant's VALUEs parsed as the train flags parse them (8/255, true, 10:20)."""
    from absl import flags

    from twins_tf.training.flags import define_flags, settings_from_flags

    if not variant.overrides:
        return {}
    flag_values = flags.FlagValues()
    define_flags(flag_values, TRAIN)
    args = []
    for key, value in variant.overrides:
        if isinstance(flag_values[key].parser, flags.ListParser):
            value = value.replace(LIST_ITEM_SEPARATOR, ",")
        args.append(f"--{key}={value}")
    try:
        flag_values([TRAIN, *args])
    except flags.Error as error:
        message = str(error).splitlines()[0]
        raise SetupError(f"--methods entry {variant.name!r}: {message}") from None
    parsed = settings_from_flags(flag_values, TRAIN)
    return {key: parsed[key] for key, _ in variant.overrides}


def variant_settings(variant, base_settings, *, model_dir, seed):
    """The settings dict of one run of `variant`: `base_settings` with the variant's values,
    method, seed and model_dir, checked through `Settings`.

    Raises:
      SetupError: a value the train flag refuses, or settings `Settings` refuses (prefixed
        with the variant's spelling).
    """
    if isinstance(base_settings, Settings):
        base_settings = base_settings.to_dict()
    values = dict(
        base_settings,
        **_override_values(variant),
        method=variant.method,
        seed=seed,
        model_dir=model_dir,
    )
    try:
        Settings.from_dict(values)
    except SetupError as error:
        if not variant.overrides:
            raise
        raise SetupError(f"--methods entry {variant.name!r}: {error}") from None
    return values


def wise_name(variant):
    """The row label of the interpolation row of `variant`."""
    return f"wise({variant.name})"


def wise_dir_name(variant):
    return f"wise-{variant.dir_name}"


def row_dir_name(row):
    """The directory name of a row label (a variant's spelling or `wise(...)`): what its
    runs' and model cards' names start with."""
    if row.startswith("wise(") and row.endswith(")"):
        return wise_dir_name(parse_variant(row[len("wise(") : -1]))
    return parse_variant(row).dir_name


def run_dir(output_dir, method, seed):
    """`output_dir/runs/<name>_seed<seed>`: `method` is a `Variant` (its `dir_name`) or a
    directory name such as a plain method's."""
    name = method.dir_name if isinstance(method, Variant) else method
    return os.path.join(os.path.abspath(output_dir), RUNS_DIR, f"{name}_seed{seed}")


def settings_hash(settings):
    """sha256 of the settings that define what a run learns (not where it lives or runs)."""
    ignored = LOCATION_KEYS + EXECUTION_KEYS
    kept = {k: v for k, v in sorted(settings.items()) if k not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _train_one(settings, verbose):
    from twins_tf.training import loop

    loop.run(settings, verbose=verbose)


def _evaluate_one(model_dir, evaluation_args, log, file_name=EVALUATION_FILE):
    """Evaluates a finished run; reuses the stored report while the best weights are older."""
    from absl import flags

    from twins_tf import evaluate

    path = os.path.join(model_dir, file_name)
    weights = os.path.join(model_dir, run_files.BEST_WEIGHTS)
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(weights):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("compare_args") == list(evaluation_args):
            return stored
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate", f"--model_dir={model_dir}", f"--output={path}", *evaluation_args])
    report = evaluate.evaluate(evaluate.settings_from_flags(flag_values), log=log, progress=False)
    report["compare_args"] = list(evaluation_args)
    run_files.write_json(path, report)
    return report


def _interpolate_one(model_dir_a, model_dir_b, output_dir, interpolation_args, verbose):
    """`interpolate_runs(model_dir_a, model_dir_b, output_dir)`; it returns its stored result
    for the same request (the same end points' weights, grid and selection), and compare owns
    `output_dir`, so a request that changed (an end point retrained) replaces the old one.

    Returns:
      {"alpha": the chosen alpha, "validation": the per-alpha rows, "endpoints": [a, b],
       "validation_examples", "select"}.
    """
    from twins_tf import interpolation

    result = interpolation.interpolate_runs(
        model_dir_a, model_dir_b, output_dir, **interpolation_args, verbose=verbose, overwrite=True
    )
    return {
        "alpha": float(result.best_alpha),
        "select": result.select,
        "validation": [dataclasses.asdict(row) for row in result.rows],
        "validation_examples": result.validation_examples,
        "endpoints": [model_dir_a, model_dir_b],
    }


def _result(name, seed, model_dir, evaluation_args, autoattack_args, log, interpolation=None):
    """The `RunResult` of a finished run dir: its evaluation(s), metrics and config."""
    from twins_tf.training import run_callbacks

    evaluation = _evaluate_one(model_dir, evaluation_args, log)
    if autoattack_args:
        extra = _evaluate_one(model_dir, autoattack_args, log, AUTOATTACK_FILE)
        evaluation = dict(
            evaluation,
            results={**evaluation["results"], **extra["results"]},
            autoattack_examples=extra["examples"],
        )
    metrics_path = os.path.join(model_dir, run_files.METRICS_FILE)
    metrics = run_callbacks.read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    return RunResult(
        name, seed, model_dir, run_files.read_config(model_dir), metrics, evaluation, interpolation
    )


def plan_rows(base_settings, methods, seeds, output_dir, interpolate=()):
    """Checks the whole grid before any work: every run's settings and every interpolation.

    Returns:
      ({variant: {seed: settings dict}}, [variants to interpolate]), variants in order.

    Raises:
      SetupError: a bad `--methods` entry, a repeated row, an `--interpolate` variant that is
        not among the methods or has init=random.
    """
    variants = [parse_variant(m) for m in methods]
    if len({v.name for v in variants}) != len(variants) or len(set(seeds)) != len(seeds):
        raise SetupError("--methods and --seeds must not repeat an entry.")
    plan = {
        v: {
            seed: variant_settings(
                v, base_settings, model_dir=run_dir(output_dir, v, seed), seed=seed
            )
            for seed in seeds
        }
        for v in variants
    }
    for runs in plan.values():  # an init stage's sub-run settings, checked now too
        first = Settings.from_dict(runs[seeds[0]])
        if first.init != RANDOM_INIT:
            init_stage.init_settings(first)
    interpolated = []
    for spelling in interpolate:
        variant = parse_variant(spelling)
        if variant not in plan:
            raise SetupError(
                f"--interpolate={spelling} is not among --methods: add it there "
                "(its runs are the interpolation's end points)."
            )
        if variant in interpolated:
            raise SetupError(f"--interpolate={spelling} is given twice.")
        checked = Settings.from_dict(plan[variant][seeds[0]])
        if checked.init == RANDOM_INIT:
            raise SetupError(
                f"--interpolate={spelling}: that variant has init=random, so its "
                "runs have no init sub-run to interpolate from; interpolate a "
                "variant with +init=linear_probe or +init=robust_linear_probe."
            )
        if checked.validation == "none":  # interpolate_runs' own refusal, before any training
            raise SetupError(
                f"--interpolate={spelling}: that variant trains with "
                "--validation=none, so no validation split is held out to choose "
                "alpha on; add +validation=carve to the variant."
            )
        interpolated.append(variant)
    return plan, interpolated


def run_grid(
    base_settings,
    methods,
    seeds,
    output_dir,
    *,
    evaluation_args,
    autoattack_args=None,
    interpolate=(),
    interpolation_args=None,
    log=print,
    verbose=0,
):
    """Trains (or reuses) and evaluates every (row, seed); returns their `RunResult`s.

    Args:
      base_settings: `train` settings (`training.flags.settings_from_flags(..., "train")`
        or a `Settings`); each run overrides `method`, `seed` and `model_dir`, and a
        variant its KEYs.
      methods: `--methods` entries, `METHOD[+KEY=VALUE...]`.
      seeds: what to run.
      output_dir: runs go to `output_dir/runs/<row dir name>_seed<seed>`.
      evaluation_args: `evaluate` flags for every run, e.g. `["--attacks=clean,pgd10"]`.
      autoattack_args: when given, a second evaluation with these flags (AutoAttack on fewer
        examples, say) whose results join the first's.
      interpolate: variants (among `methods`, with an init stage) whose `wise(...)` rows to
        add: per seed, `interpolate_runs(<run>/init, <run>)`, evaluated like every run.
      interpolation_args: keyword arguments of `interpolate_runs` (alphas, select, ...).
    """
    plan, interpolated = plan_rows(base_settings, methods, seeds, output_dir, interpolate)
    results = []
    for variant, runs in plan.items():
        for seed, settings in runs.items():
            log(f"compare: {variant.name}, seed {seed}: {settings['model_dir']}")
            _train_one(settings, verbose)
            results.append(
                _result(
                    variant.name, seed, settings["model_dir"], evaluation_args, autoattack_args, log
                )
            )
    for variant in interpolated:
        for seed in seeds:
            source = plan[variant][seed]["model_dir"]
            model_dir = run_dir(output_dir, wise_dir_name(variant), seed)
            log(f"compare: {wise_name(variant)}, seed {seed}: {model_dir}")
            chosen = _interpolate_one(
                os.path.join(source, init_stage.INIT_DIR),
                source,
                model_dir,
                dict(interpolation_args or {}),
                verbose,
            )
            results.append(
                _result(
                    wise_name(variant),
                    seed,
                    model_dir,
                    evaluation_args,
                    autoattack_args,
                    log,
                    interpolation=chosen,
                )
            )
    return results


# --- statistics ------------------------------------------------------------------------------
def mean_and_sd(values):
    """(mean, sample standard deviation); the sd is None for a single value."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), sd


def paired_difference(values, baseline_values, confidence=CONFIDENCE):
    """Mean of `values - baseline_values` (paired by position) and its Student-t interval.

    Returns:
      (mean difference, low, high); low and high are None with fewer than two pairs.
    """
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    baseline_values = np.asarray(baseline_values, dtype=np.float64)
    if values.shape != baseline_values.shape:
        raise ValueError(
            f"paired values need the same seeds: {values.shape} vs {baseline_values.shape}"
        )
    difference = float(np.mean(values - baseline_values))
    if len(values) < 2:
        return difference, None, None
    if np.all(values - baseline_values == values[0] - baseline_values[0]):
        return difference, difference, difference  # no spread: scipy would return NaN
    interval = stats.ttest_rel(values, baseline_values).confidence_interval(confidence)
    return difference, float(interval.low), float(interval.high)


def summarise(results, attacks, baseline):
    """The comparison table as a dict (what `report.json` holds).

    Returns:
      {"methods": {method: {attack: {"mean", "sd", "values", "seeds"}}},
       "differences": {method: {attack: {"mean", "low", "high", "seeds"}}} against `baseline`,
       "alphas": {wise row: {seed: the alpha chosen on validation}},
       "baseline", "confidence", "interval": description}.
    """
    methods = list(dict.fromkeys(r.method for r in results))
    by_method = {
        m: sorted((r for r in results if r.method == m), key=lambda r: r.seed) for m in methods
    }
    table = {}
    for method, runs in by_method.items():
        table[method] = {}
        for attack in attacks:
            values = [r.accuracy(attack) for r in runs]
            mean, sd = mean_and_sd(values)
            table[method][attack] = {
                "mean": mean,
                "sd": sd,
                "values": values,
                "seeds": [r.seed for r in runs],
            }
    differences = {}
    if baseline in by_method:
        for method in methods:
            if method == baseline:
                continue
            differences[method] = {}
            for attack in attacks:
                seeds = sorted(
                    set(table[method][attack]["seeds"]) & set(table[baseline][attack]["seeds"])
                )
                ours = [
                    table[method][attack]["values"][table[method][attack]["seeds"].index(s)]
                    for s in seeds
                ]
                theirs = [
                    table[baseline][attack]["values"][table[baseline][attack]["seeds"].index(s)]
                    for s in seeds
                ]
                mean, low, high = paired_difference(ours, theirs)
                differences[method][attack] = {
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "seeds": seeds,
                }
    alphas = {
        method: {str(r.seed): r.interpolation["alpha"] for r in runs}
        for method, runs in by_method.items()
        if runs[0].interpolation is not None
    }
    return {
        "methods": table,
        "differences": differences,
        "alphas": alphas,
        "baseline": baseline,
        "confidence": CONFIDENCE,
        "interval": "paired Student-t over seeds (scipy.stats.ttest_rel)",
    }


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_table(summary, attacks):
    """The printed table: mean +- sd per method, then paired differences with intervals."""
    width = 28
    labels = [
        *summary["methods"],
        *(f"{m} - {summary['baseline']}" for m in summary["differences"]),
    ]
    first = max(16, *(len(label) + 2 for label in labels))
    lines = [f"{'method':<{first}}" + "".join(f"{a:>{width}}" for a in attacks)]
    for method, row in summary["methods"].items():
        cells = []
        for attack in attacks:
            cell = row[attack]
            sd = "" if cell["sd"] is None else f" +- {100 * cell['sd']:.2f}"
            cells.append(f"{_percent(cell['mean']) + sd:>{width}}")
        n = len(row[attacks[0]]["values"])
        lines.append(f"{method:<{first}}" + "".join(cells) + f"   ({n} seed{'s' if n > 1 else ''})")
    confidence = int(round(100 * summary["confidence"]))
    for method, row in summary["differences"].items():
        cells = []
        for attack in attacks:
            d = row[attack]
            interval = (
                "no interval (1 seed)"
                if d["low"] is None
                else f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
            )
            cells.append(f"{100 * d['mean']:+.2f} {interval}".rjust(width))
        lines.append(f"{method + ' - ' + summary['baseline']:<{first}}" + "".join(cells))
    if summary["differences"]:
        lines.append(
            f"differences: percentage points, paired by seed, {confidence} % "
            "Student-t interval; an interval that contains 0 separates nothing."
        )
    for method, by_seed in summary.get("alphas", {}).items():
        chosen = ", ".join(f"seed {seed}: {alpha:g}" for seed, alpha in by_seed.items())
        lines.append(
            f"{method}: alpha chosen on validation (0: the init sub-run, 1: the "
            f"fine-tuned run): {chosen}"
        )
    return "\n".join(lines)


# --- model cards -----------------------------------------------------------------------------
def model_card(result):
    """RobustBench's model-card fields for one run, plus how to reproduce it."""
    s = result.settings
    return {
        "clean_acc": result.accuracy(CLEAN),
        "autoattack_acc": result.accuracy(AUTOATTACK),
        "pgd_acc": {
            k: v["accuracy"] for k, v in result.evaluation["results"].items() if k.startswith("pgd")
        },
        "eps": result.evaluation["epsilon"],
        "norm": "Linf",
        "architecture": s["arch"],
        "dataset": s["dataset"],
        "number_forward_passes": 1,
        "evaluation_examples": result.evaluation["examples"],
        "autoattack_examples": result.evaluation.get("autoattack_examples"),
        "evaluation_split": result.evaluation["split"],
        "method": s.get("method"),
        "row": result.method,
        "seed": result.seed,
        "pretrained": s.get("pretrained"),
        "settings_hash": settings_hash(s),
        "model_dir": result.model_dir,
        "interpolation": (
            None
            if result.interpolation is None
            else {k: result.interpolation[k] for k in ("alpha", "endpoints")}
        ),
    }


# --- plots and report ------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen; PNG only
    from matplotlib import pyplot

    return pyplot


def _curves_by_method(results, column):
    """{method: (epochs, array seeds x epochs)} of a metrics.csv column, where present."""
    curves = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        rows = [[row.get(column) for row in r.metrics] for r in runs]
        if not rows or any(not row or any(not isinstance(v, float) for v in row) for row in rows):
            continue
        length = min(len(row) for row in rows)
        curves[method] = (np.arange(1, length + 1), np.array([row[:length] for row in rows]))
    return curves


def _band_plot(axis, curves, title):
    for method, (epochs, values) in curves.items():
        (line,) = axis.plot(epochs, 100 * values.mean(axis=0), marker="o", label=method)
        if len(values) > 1:
            axis.fill_between(
                epochs,
                100 * values.min(axis=0),
                100 * values.max(axis=0),
                color=line.get_color(),
                alpha=0.2,
            )
    from matplotlib.ticker import MaxNLocator

    if not curves:
        axis.text(
            0.5,
            0.5,
            "not recorded by these runs",
            ha="center",
            va="center",
            transform=axis.transAxes,
            color="grey",
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize="small")


def plot_curves(results):
    """Figure: per-epoch training and validation accuracy, mean and min-max band over seeds."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(2, 2, figsize=(10, 7))
    for axis, (column, title) in zip(axes.flat, CURVES.items()):
        _band_plot(axis, _curves_by_method(results, column), title)
    figure.tight_layout()
    return figure


def plot_wings(results):
    """Figure: each twin row's Frozen and Adaptive wing training accuracy; None if none.

    Twin rows are those trained with a twin method (a variant of one too); an interpolation
    row trains nothing and has no wings' curves."""
    twin_methods = [
        m
        for m in dict.fromkeys(
            r.method for r in results if r.settings.get("twin") and r.interpolation is None
        )
    ]
    if not twin_methods:
        return None
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(
        1, len(twin_methods), figsize=(5 * len(twin_methods), 3.8), squeeze=False
    )
    for axis, method in zip(axes.flat, twin_methods):
        runs = [r for r in results if r.method == method]
        curves = {
            label: _curves_by_method(runs, column).get(method)
            for column, label in WING_CURVES.items()
        }
        _band_plot(
            axis,
            {k: v for k, v in curves.items() if v is not None},
            f"{method}: training accuracy per wing",
        )
    figure.tight_layout()
    return figure


def plot_scatter(results, robust_attack):
    """Figure: final clean against robust test accuracy, one point per run."""
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(5.5, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        axis.scatter(
            [100 * r.accuracy(CLEAN) for r in runs],
            [100 * r.accuracy(robust_attack) for r in runs],
            label=method,
            s=40,
        )
    axis.set_xlabel("clean accuracy (%)")
    axis.set_ylabel(f"{robust_attack} accuracy (%)")
    axis.set_title("test accuracy, one point per seed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _png(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return data


def write_report(results, attacks, baseline, report_dir, *, title="twins_tf comparison"):
    """Writes report.json, report.txt, the PNGs, report.html and model_cards/; returns the summary.

    The HTML embeds the PNGs as data URIs, so the single file opens offline and can be mailed.
    """
    os.makedirs(os.path.join(report_dir, "model_cards"), exist_ok=True)
    summary = summarise(results, attacks, baseline)
    table = format_table(summary, attacks)
    run_files.write_json(os.path.join(report_dir, "report.json"), summary)
    with open(os.path.join(report_dir, "report.txt"), "w") as f:
        f.write(table + "\n")
    cards = {}
    for result in results:
        card = model_card(result)
        cards[f"{result.method}_seed{result.seed}"] = card
        run_files.write_json(
            os.path.join(
                report_dir, "model_cards", f"{row_dir_name(result.method)}_seed{result.seed}.json"
            ),
            card,
        )
    robust = next((a for a in attacks if a != CLEAN), None)
    figures = {
        "curves.png": ("Per-epoch accuracy (mean, band: min-max over seeds)", plot_curves(results))
    }
    wings = plot_wings(results)
    if wings is not None:
        figures["wings.png"] = ("Training accuracy of each wing (twin methods)", wings)
    if robust is not None and CLEAN in attacks:
        figures["scatter.png"] = (
            "Clean against robust test accuracy",
            plot_scatter(results, robust),
        )
    images = []
    for name, (caption, figure) in figures.items():
        data = _png(figure, os.path.join(report_dir, name))
        images.append(
            f"<h2>{html.escape(caption)}</h2>\n<img alt='{name}' "
            f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        )
    card_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_percent(c['clean_acc'])}</td>"
        f"<td>{_percent(c['autoattack_acc'])}</td><td>{html.escape(str(c['settings_hash'][:12]))}"
        f"</td></tr>"
        for k, c in cards.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title></head><body><h1>{html.escape(title)}</h1>\n"
        f"<pre>{html.escape(table)}</pre>\n"
        + "\n".join(images)
        + "\n<h2>Model cards</h2><table border='1'><tr><th>run</th><th>clean %</th>"
        f"<th>AutoAttack %</th><th>settings</th></tr>{card_rows}</table></body></html>\n"
    )
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(page)
    return summary, table


def compare(
    base_settings,
    *,
    methods,
    seeds,
    baseline,
    output_dir,
    attacks=("clean", "pgd10"),
    max_examples=None,
    batch_size=128,
    autoattack_examples=0,
    interpolate=(),
    interpolation_args=None,
    report_dir=None,
    title="twins_tf comparison",
    log=print,
    verbose=0,
):
    """Runs the grid, evaluates every run, writes the report; returns (summary, table).

    Args:
      base_settings: `train` settings shared by every run.
      methods, seeds: the grid (`methods`: `METHOD[+KEY=VALUE...]` entries); `baseline` (one
        of `methods`) is what differences are against.
      attacks: `evaluate` attacks on `max_examples` test examples (None: all).
      autoattack_examples: > 0 also runs standard AutoAttack on that many test examples.
      interpolate: variants of `methods` whose `wise(...)` rows to add (see `run_grid`), with
        `interpolation_args` for `interpolate_runs` (alphas, select, validation_examples).
      report_dir: where the report goes (default `output_dir/report`).

    Raises:
      SetupError: before anything is trained, for a bad entry of `methods`, `interpolate` or
        `baseline`.
    """
    names = [parse_variant(m).name for m in methods]
    if parse_variant(baseline).name not in names:
        raise SetupError(
            f"--baseline={baseline} is not among --methods="
            f"{','.join(methods)}: add it or pick one of them."
        )
    plan_rows(base_settings, methods, seeds, output_dir, interpolate)  # every check, no work
    evaluation_args = [f"--attacks={','.join(attacks)}", f"--batch_size={batch_size}"]
    if max_examples:
        evaluation_args.append(f"--max_examples={max_examples}")
    autoattack_args = None
    if autoattack_examples:
        autoattack_args = [
            f"--attacks={AUTOATTACK}",
            f"--max_examples={autoattack_examples}",
            f"--batch_size={batch_size}",
        ]
    results = run_grid(
        base_settings,
        methods,
        seeds,
        output_dir,
        evaluation_args=evaluation_args,
        autoattack_args=autoattack_args,
        interpolate=interpolate,
        interpolation_args=interpolation_args,
        log=log,
        verbose=verbose,
    )
    reported = list(attacks) + ([AUTOATTACK] if autoattack_examples else [])
    return write_report(
        results,
        reported,
        parse_variant(baseline).name,
        report_dir or os.path.join(output_dir, REPORT_DIR),
        title=title,
    )
