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
  the table says so.
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
