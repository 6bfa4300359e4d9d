"""The statistics of a comparison: mean and spread over seeds, paired differences, the table.

One run of one seed on a few hundred test images separates nothing: the same command gave
tables up to 14 points apart on two machines of one kind, and the ranking of two methods
flipped.  So every number here is over seeds:

* per row and metric, the mean and the sample standard deviation over seeds;
* per row against a baseline, the **paired** difference (seed s of the row against seed s of
  the baseline: the same data order, augmentation and attack starts) with a 95 % Student-t
  interval, `scipy.stats.ttest_rel(...).confidence_interval()`.  A t interval rather than a
  bootstrap because there are only a handful of seeds: a bootstrap over 3 pairs has 10 distinct
  resamples and an interval that is far too narrow.  With one seed there is no interval, and
  the table says so.  Nor is there one when every paired difference is the same: the t
  formula would give a zero-width interval that reads as "separated", while the likelier
  cause is a test set too coarse for the seeds to differ (on n examples an accuracy moves in
  steps of 1/n: 6.25 points on 16).  The table says so, with that resolution, rather than
  print such an interval or widen it by some rule of its own.
"""

import numpy as np

CONFIDENCE = 0.95


def mean_and_sd(values):
    """(mean, sample standard deviation); the sd is None for a single value."""
    values = np.asarray(values, dtype=np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), sd


def paired_difference(values, baseline_values, confidence=CONFIDENCE):
    """Mean of `values - baseline_values` (paired by position) and its Student-t interval.

    Returns:
      (mean difference, low, high); low and high are None with fewer than two pairs, or when
      every difference is the same (no spread: see `degenerate_interval` for why).
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
    if _no_spread(values - baseline_values):
        return difference, None, None  # a zero-width interval would read as "separated"
    interval = stats.ttest_rel(values, baseline_values).confidence_interval(confidence)
    return difference, float(interval.low), float(interval.high)


# Paired differences closer than this are one value: accuracies are fractions k/n, and the
# same step reached from two pairs (0.07 - 0.08, 0.93 - 0.94) differs only by float rounding.
SAME_DIFFERENCE = 1e-9


def _no_spread(differences):
    return len(differences) > 1 and float(np.ptp(differences)) <= SAME_DIFFERENCE


def degenerate_interval(values, baseline_values, examples):
    """Why the paired differences of `values` and `baseline_values` give no interval although
    there are several seeds, or None when they give one.

    Identical differences have no spread, so the t interval would have zero width.  That says
    nothing of the methods when accuracies are as coarse as they are on few test examples: on
    `examples` = n an accuracy is a multiple of 1/n, and a few seeds easily land on the same
    steps.  The reason states the resolution; no interval is made up in its place.
    """
    differences = np.asarray(values, np.float64) - np.asarray(baseline_values, np.float64)
    if not _no_spread(differences):
        return None
    seeds = len(differences)
    resolution = (
        f"with {examples} test examples an accuracy moves in steps of {100 / examples:.4g} "
        "points (1/n), which"
        if examples
        else "which"
    )
    return (
        f"the {seeds} paired differences are all {100 * differences[0]:+.2f} points: no "
        f"spread, so no interval (its width would be 0); {resolution} may be too coarse for "
        f"{seeds} seeds to differ: use more seeds or more test examples."
    )


def _examples(runs, attack):
    """The fewest examples `attack` was evaluated on among `runs` (None when not recorded)."""
    counts = []
    for run in runs:
        result = run.evaluation["results"].get(attack) or {}
        count = result.get("examples")
        if count is None:
            count = run.evaluation.get(
                "autoattack_examples" if attack == "autoattack" else "examples"
            )
        if count:
            counts.append(int(count))
    return min(counts) if counts else None


def summarise(results, attacks, baseline):
    """The comparison table as a dict (what `report.json` holds).

    Returns:
      {"methods": {method: {attack: {"mean", "sd", "values", "seeds"}}},
       "differences": {method: {attack: {"mean", "low", "high", "seeds", "examples" (the
         fewest test examples of the pair's runs), "resolution" (1 / examples), "degenerate"
         (why there is no interval despite several seeds, or None)}}} against `baseline`,
       "alphas": {wise row: {seed: the alpha chosen on validation}},
       "schedules": {trained row: {"schedule": `training.schedule.run_schedule` of its runs
         but the automated part, "automated": {seed: that part} or None for a fixed rate}},
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
                paired = [r for r in by_method[method] + by_method[baseline] if r.seed in seeds]
                examples = _examples(paired, attack)
                differences[method][attack] = {
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "seeds": seeds,
                    "examples": examples,
                    "resolution": None if not examples else 1.0 / examples,
                    "degenerate": degenerate_interval(ours, theirs, examples),
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
        "schedules": _schedules(by_method),
        "baseline": baseline,
        "confidence": CONFIDENCE,
        "interval": "paired Student-t over seeds (scipy.stats.ttest_rel)",
    }


def _schedules(by_method):
    """The schedule each trained row ran (interpolation rows train nothing): its fixed part,
    the same for every seed, and per seed the automated part where there is one."""
    from twins_tf.training.schedule import run_schedule

    schedules = {}
    for method, runs in by_method.items():
        recorded = {"method", "lr", "weight_decay"} <= set(runs[0].settings)
        if runs[0].interpolation is not None or not recorded:
            continue
        ran = {str(r.seed): run_schedule(r.settings, r.metrics) for r in runs}
        automated = {seed: schedule.pop("automated") for seed, schedule in ran.items()}
        schedules[method] = {
            "schedule": next(iter(ran.values())),
            "automated": None if all(a is None for a in automated.values()) else automated,
        }
    return schedules


def format_percent(value):
    """A fraction as a percentage with two decimals; "n/a" for a metric not measured."""
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
            cells.append(f"{format_percent(cell['mean']) + sd:>{width}}")
        n = len(row[attacks[0]]["values"])
        lines.append(f"{method:<{first}}" + "".join(cells) + f"   ({n} seed{'s' if n > 1 else ''})")
    confidence = int(round(100 * summary["confidence"]))
    for method, row in summary["differences"].items():
        cells = []
        for attack in attacks:
            d = row[attack]
            if d["low"] is not None:
                interval = f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
            elif d.get("degenerate"):
                interval = "no interval*"
            else:
                interval = "no interval (1 seed)"
            cells.append(f"{100 * d['mean']:+.2f} {interval}".rjust(width))
        lines.append(f"{method + ' - ' + summary['baseline']:<{first}}" + "".join(cells))
    if summary["differences"]:
        lines.append(
            f"differences: percentage points, paired by seed, {confidence} % "
            "Student-t interval; an interval that contains 0 separates nothing."
        )
        lines += _resolution_lines(summary)
    lines += _schedule_lines(summary.get("schedules", {}))
    for method, by_seed in summary.get("alphas", {}).items():
        chosen = ", ".join(f"seed {seed}: {alpha:g}" for seed, alpha in by_seed.items())
        lines.append(
            f"{method}: alpha chosen on validation (0: the init sub-run, 1: the "
            f"fine-tuned run): {chosen}"
        )
    return "\n".join(lines)


def _resolution_lines(summary):
    """The test sets' resolution under the differences, and why each starred cell has no
    interval."""
    lines = []
    counts = sorted(
        {d["examples"] for row in summary["differences"].values() for d in row.values()} - {None}
    )
    if counts:
        lines.append(
            "resolution: an accuracy on n test examples moves in steps of 1/n: "
            + ", ".join(f"{100 / n:.4g} points (n = {n})" for n in counts)
            + "."
        )
    for method, row in summary["differences"].items():
        for attack, d in row.items():
            if d.get("degenerate"):
                lines.append(f"* {method} - {summary['baseline']}, {attack}: {d['degenerate']}")
    return lines


def _schedule_lines(schedules):
    """The table's schedule lines: rows with the same fixed schedule share one; an automated
    rate adds its halvings per seed."""
    from twins_tf.training.schedule import format_schedule

    if not schedules:
        return []
    groups = {}
    for method, entry in schedules.items():
        groups.setdefault(format_schedule(entry["schedule"]), []).append(method)
    lines = ["schedules:"] + [f"  {', '.join(rows)}: {text}" for text, rows in groups.items()]
    for method, entry in schedules.items():
        if entry["automated"] is None:
            continue
        seeds = "; ".join(
            f"seed {seed}: {', '.join(map(str, run['halved_after_epochs'])) or 'never'}"
            + (
                f" (stopped at the lr floor after epoch {run['trained_epochs']})"
                if run["stopped_early"]
                else ""
            )
            for seed, run in entry["automated"].items()
        )
        lines.append(f"  {method}: lr halved on val_adv_acc after epochs: {seeds}")
    return lines
