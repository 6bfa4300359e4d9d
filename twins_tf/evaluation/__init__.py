"""Evaluation of a trained classifier: clean, PGD-K and AutoAttack accuracy, and the report.

The library side of `python -m twins_tf.evaluate` (which only parses flags and calls
`evaluate`), so a library user or another binary (`compare`, the demo) evaluates without
importing a binary:

    inputs.py          the attack list, settings resolved from a run's config.json, model, data
    autoattack_run.py  resumable AutoAttack (state file beside the report), per sub-attack
    checks.py          the official code's sanity checks on the first batch
    report.py          the report dict, its JSON file and the printed table
    runner.py          one evaluation end to end: `evaluate(settings)`

Clean and PGD accuracy over a pipeline (`evaluate_batched`) count with `twins_tf.accuracy`, the
loop the trainer and the interpolation path use too.
"""

from twins_tf.accuracy import accuracy_counter, evaluate_batched
from twins_tf.evaluation.autoattack_run import autoattack_state_path, run_autoattack
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
    report_path,
    resolve,
)
from twins_tf.evaluation.report import build_report, format_table, write_report
from twins_tf.evaluation.runner import evaluate

__all__ = [
    "AUTOATTACK",
    "CLEAN",
    "DEFAULTS",
    "REPORT_PREFIX",
    "SPLITS",
    "accuracy_counter",
    "autoattack_state_path",
    "build_report",
    "evaluate",
    "evaluate_batched",
    "format_table",
    "load_examples",
    "load_model",
    "model_checks",
    "parse_attacks",
    "report_path",
    "resolve",
    "run_autoattack",
    "write_report",
]
