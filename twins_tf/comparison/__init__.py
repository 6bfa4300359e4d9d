"""Methods x seeds on one task: ordinary runs, their evaluation, a table with intervals, plots.

One run of one seed on a few hundred test images separates nothing, so `compare` trains every
row (a method or a variant of one) with every seed, each as an ordinary `train` run, evaluates
each on the same test examples and reports the mean and spread over seeds, the paired
difference of every row against a baseline with a Student-t interval, plots, a self-contained
`report.html` and a model card per run.  A row `wise(VARIANT)` is, per seed, the weight-space
interpolation (`twins_tf.interpolation.interpolate_runs`, WiSE-FT) between that variant's init
sub-run (`<run>/init`, the linear probe) and its final weights, at the alpha that is best on
validation; it is evaluated and paired with the baseline like every row.

The binary is `python -m twins_tf.compare`; this package holds the logic, one module per job:

    rows.py           methods, variants (`METHOD+KEY=VALUE...`), wise rows, run dirs, `RunResult`
    grid.py           the grid checked, then run: train, evaluate, interpolate; `compare`
    grid_training.py  the grid's runs trained by many processes at once (run locks)
    commands.py       the grid for many machines: `--shard=K/N` slices, `--plan` commands
    statistics.py     mean and sd over seeds, paired differences, the printed table
    cards.py          a model card per run
    report.py         the plots, report.json / .txt / .html and the cards on disk
    demo_pipeline.py  the demo's pipeline (`python -m twins_tf.demo`): pre-train, compare, export
"""

from twins_tf.comparison.cards import model_card
from twins_tf.comparison.commands import parse_shard, run_args, run_command, shard_runs
from twins_tf.comparison.grid import (
    AUTOATTACK_FILE,
    EVALUATION_FILE,
    compare,
    grid_runs,
    plan_grid,
    plan_rows,
    run_grid,
)
from twins_tf.comparison.grid_training import GridUnfinished, train_runs
from twins_tf.comparison.report import (
    REPORT_DIR,
    plot_curves,
    plot_scatter,
    plot_wings,
    write_report,
)
from twins_tf.comparison.rows import (
    RUNS_DIR,
    RunResult,
    Variant,
    parse_variant,
    row_dir_name,
    run_dir,
    settings_hash,
    variant_keys,
    variant_settings,
    wise_name,
)
from twins_tf.comparison.statistics import (
    CONFIDENCE,
    format_table,
    mean_and_sd,
    paired_difference,
    summarise,
)

__all__ = [
    "AUTOATTACK_FILE",
    "CONFIDENCE",
    "EVALUATION_FILE",
    "GridUnfinished",
    "REPORT_DIR",
    "RUNS_DIR",
    "RunResult",
    "Variant",
    "compare",
    "format_table",
    "grid_runs",
    "mean_and_sd",
    "model_card",
    "paired_difference",
    "parse_shard",
    "parse_variant",
    "plan_grid",
    "plan_rows",
    "plot_curves",
    "plot_scatter",
    "plot_wings",
    "row_dir_name",
    "run_args",
    "run_command",
    "run_dir",
    "run_grid",
    "settings_hash",
    "shard_runs",
    "summarise",
    "train_runs",
    "variant_keys",
    "variant_settings",
    "wise_name",
    "write_report",
]
