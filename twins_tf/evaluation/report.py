"""The evaluation report: one JSON-ready dict per evaluation, written to disk and printed.

The dict is the contract between `evaluate` and its readers (`compare`'s tables, the demo,
users' scripts), so it is built in one place and `format_table` reads only what is in it.
"""

import os

from twins_tf.evaluation.inputs import AUTOATTACK, CLEAN
from twins_tf.input_checks import NORM_NAMES, threat_model_text
from twins_tf.training import model_dir as run_files


def build_report(settings, examples, checks, results):
    """The report of an evaluation with resolved `settings` (see `inputs.resolve`).

    Args:
      settings: the resolved settings.
      examples: the number of examples of the split evaluated.
      checks: the model checks' messages, or None when AutoAttack ran them (they are then in
        `results["autoattack"]["checks"]`).
      results: {attack name: its result dict}, in the order they ran.
    """
    s = settings
    return {
        "model_dir": s.get("model_dir"),
        "weights": s["weights"],
        "arch": s["arch"],
        "dataset": s["dataset"],
        "split": s["split"],
        "examples": examples,
        "epsilon": s["attack_eps"],
        "norm": s["attack_norm"],
        "seed": s["seed"],
        # the numerics of clean and PGD (AutoAttack is always float32)
        "precision": s.get("precision", "float32"),
        "checks": checks,
        "results": results,
    }


def write_report(path, report):
    """Writes `report` as JSON to `path` (valid JSON: NaN accuracies become null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_files.write_json(path, report)


def format_table(report):
    """The printed table: one row per attack (accuracy in %, examples)."""
    lines = [
        f"{report['arch']} on {report['dataset']} ({report['split']}, "
        f"{report['examples']} examples), "
        + threat_model_text(report.get("norm", "linf"), report["epsilon"])
        + (", in bfloat16" if report.get("precision") == "bfloat16" else ""),
        f"{'attack':<24}{'accuracy':>10}{'time':>12}",
    ]
    for name, result in report["results"].items():
        lines.append(f"{name:<24}{100 * result['accuracy']:>9.2f}%{result['seconds']:>10.1f} s")
        seconds = result.get("seconds_each_attack", {})
        for sub, accuracy in result.get("after_each_attack", {}).items():
            lines.append(f"{'  after ' + sub:<24}{100 * accuracy:>9.2f}%{seconds[sub]:>10.1f} s")
        for sub, why in result.get("skipped", {}).items():
            lines.append(f"{'  ' + sub:<24} skipped: {why}")
        if name == AUTOATTACK:
            lines.append(
                f"  {result['version']} version, {result['n_target_classes']} target "
                f"classes, seed {result['seed']}, twins_tf {result['twins_tf_version']}"
            )
    checks = report.get("checks")
    if checks is None:  # AutoAttack ran them
        checks = report["results"].get(AUTOATTACK, {}).get("checks", [])
    lines += [f"warning: {message}" for message in checks]
    if report.get("unfinished"):  # evaluated with --allow_unfinished
        lines.append(f"warning: {report['unfinished']}")
    return "\n".join(lines)


def write_radius_plot(path, reports):
    """A PNG of accuracy against radius, one line per attack, from one report per radius.

    Clean accuracy does not depend on the radius: it is drawn as a dashed level line.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    norm = reports[0].get("norm", "linf")
    scale = 255 if norm == "linf" else 1  # L-inf in levels of 255, L2 as it is
    radii = [scale * report["epsilon"] for report in reports]
    figure = Figure(figsize=(5, 3.5), layout="tight")
    axes = figure.add_subplot()
    for name in reports[0]["results"]:
        accuracies = [100 * report["results"][name]["accuracy"] for report in reports]
        if name == CLEAN:
            axes.axhline(accuracies[0], color="gray", linestyle="--", label=name)
        else:
            axes.plot(radii, accuracies, marker="o", label=name)
    first = reports[0]
    axes.set_xlabel(f"{NORM_NAMES[norm]} radius" + (" (x/255)" if norm == "linf" else ""))
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{first['arch']} on {first['dataset']} ({first['split']})")
    axes.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
