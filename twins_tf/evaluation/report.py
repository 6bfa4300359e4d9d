"""The evaluation report: one JSON-ready dict per evaluation, written to disk and printed.

The dict is the contract between `evaluate` and its readers (`compare`'s tables, the demo,
users' scripts), so it is built in one place and `format_table` reads only what is in it.
"""

import os

from twins_tf.evaluation.inputs import AUTOATTACK
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
        "norm": "linf",
        "seed": s["seed"],
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
        f"{report['examples']} examples), L-inf eps {report['epsilon'] * 255:.4g}/255",
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
