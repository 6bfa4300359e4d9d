"""Evaluation of a trained classifier: clean, PGD-K and AutoAttack accuracy, and the report.

The library side of `python -m twins_tf.evaluate` (which only parses flags and calls
`evaluate`), so a library user or another binary (`compare`, the demo) evaluates without
importing a binary:

    inputs.py          the attack list and radii, settings resolved from a run's config.json,
                       model, data, where the reports go
    shards.py          how batches are shared out over a strategy's replicas and workers
    autoattack_run.py  sharded, resumable AutoAttack (state files beside the report)
    checks.py          the official code's sanity checks on the first batch
    report.py          the report dict, its JSON file, the printed table, the radius plot
    runner.py          one evaluation end to end: `evaluate(settings)` (one radius),
                       `evaluate_radii(settings)` (one report per radius)

Clean and PGD accuracy over a pipeline (`evaluate_batched`) count with `twins_tf.accuracy`, the
loop the trainer and the interpolation path use too.
"""

from twins_tf.accuracy import accuracy_counter, evaluate_batched
from twins_tf.evaluation.autoattack_run import run_autoattack, state_paths
from twins_tf.evaluation.checks import model_checks
from twins_tf.evaluation.inputs import (
    AUTOATTACK,
    CLEAN,
    DEFAULTS,
    REPORT_PREFIX,
    SPLITS,
    load_examples,
    load_model,
    parse_attacks,
    parse_radii,
    report_paths,
    resolve,
)
from twins_tf.evaluation.report import build_report, format_table, write_radius_plot, write_report
from twins_tf.evaluation.runner import Evaluation, evaluate, evaluate_radii
from twins_tf.evaluation.shards import ShardLayout, layout_of

__all__ = [
    "AUTOATTACK",
    "CLEAN",
    "DEFAULTS",
    "REPORT_PREFIX",
    "SPLITS",
    "Evaluation",
    "ShardLayout",
    "accuracy_counter",
    "build_report",
    "evaluate",
    "evaluate_batched",
    "evaluate_radii",
    "format_table",
    "layout_of",
    "load_examples",
    "load_model",
    "model_checks",
    "parse_attacks",
    "parse_radii",
    "report_paths",
    "resolve",
    "run_autoattack",
    "state_paths",
    "write_radius_plot",
    "write_report",
]
