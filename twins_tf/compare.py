r"""`python -m twins_tf.compare`: methods x seeds on one task, intervals, plots and model cards.

    python -m twins_tf.compare --flagfile=flags/stanford_dogs.flags \
        --pretrained=robust_r50.weights.h5 --methods=trades,twins_trades --seeds=0,1,2 \
        --output_dir=runs/dogs_compare --autoattack_examples=1000

Every `train` flag applies to every run (the flagfile describes the task); `--methods` and
`--seeds` replace `--method` and `--seed`, and each run lives in
`output_dir/runs/<method>_seed<seed>`, an ordinary run that `evaluate`, `export` and
`train` accept: kill the comparison and start it again, and finished runs are reused, the
interrupted one resumes.  The report goes to `output_dir/report/`: `report.txt` (the table),
`report.json`, `report.html` (table and plots, self-contained), the PNGs and
`model_cards/<dataset>/<Linf|L2>/<run>.json` (RobustBench's model-info format).

A `--methods` entry may be a variant, `METHOD+KEY=VALUE...` with KEY any train flag (e.g.
`at+init=robust_linear_probe`, `autolora+lora_rank=8`; a list value separates its items with
`:`), whose runs live in `output_dir/runs/<spelling, = as ->_seed<seed>`.
`--interpolate=VARIANT` (repeatable) adds the row `wise(VARIANT)`: per seed, the WiSE-FT
interpolation between that variant's init sub-run and its final weights at the alpha best on
validation (`twins_tf.interpolation.interpolate_runs`), evaluated like every run.
`--deterministic` is on by default here, so the same command on
another machine of the same kind trains the same weights.

Over many machines: `--plan` prints one standalone `python -m twins_tf.train ...` command per
run (writing nothing), `--shard=K/N` trains the K-th of N slices of the runs; either way a
`compare` with the same flags (no `--shard`) then finds the runs finished and evaluates and
reports.  Each run is locked while it trains, so processes sharing `--output_dir` never train
one run twice: a run another process holds is skipped with a notice, and a compare that
cannot report because runs are still held elsewhere says which and exits with status 75
(EX_TEMPFAIL: try again later).  The work is `twins_tf.comparison.compare`; this binary
parses flags.
"""

import sys

from absl import app, flags

from twins_tf.comparison.rows import parse_seeds
from twins_tf.interpolation import SELECTIONS
from twins_tf.training.flags import command_line_flags, settings_from_flags
from twins_tf.training.flags import define_flags as define_run_flags
from twins_tf.training.settings import TRAIN, SetupError

FLAGS = flags.FLAGS
# Train flags that compare sets itself, per run.
PER_RUN_FLAGS = {"method": "--methods", "seed": "--seeds", "model_dir": "--output_dir"}
# Exit status of a compare that could not report because other processes hold runs
# (sysexits.h EX_TEMPFAIL: a temporary failure, try again later).
EXIT_UNFINISHED = 75


def define_flags(flag_values):
    """Defines compare's own flags and every `train` flag on `flag_values`; returns the former."""
    module = "twins_tf.compare"
    options = dict(flag_values=flag_values, module_name=module)
    flags.DEFINE_list(
        "methods",
        ["at", "twins_at"],
        "Rows to compare: train's --method, or a "
        "variant METHOD+KEY=VALUE... with KEY a train flag (e.g. "
        "at+init=robust_linear_probe).",
        **options,
    )
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every method runs with each.", **options)
    flags.DEFINE_string(
        "baseline",
        None,
        "Method the paired differences are against (default: the first of --methods).",
        **options,
    )
    flags.DEFINE_string("output_dir", None, "Where the runs and the report go.", **options)
    flags.DEFINE_list(
        "attacks",
        ["clean", "pgd10"],
        "evaluate's --attacks for every run (clean, pgdK).",
        **options,
    )
    flags.DEFINE_integer(
        "eval_max_examples",
        None,
        "Evaluate on this many test examples (class-stratified; default: all).",
        **options,
    )
    flags.DEFINE_integer("eval_batch_size", 128, "Evaluation batch size.", **options)
    flags.DEFINE_integer(
        "autoattack_examples",
        0,
        "> 0: also standard AutoAttack on this many test examples per run.",
        **options,
    )
    flags.DEFINE_multi_string(
        "interpolate",
        [],
        "A variant of --methods with an init stage "
        "(+init=linear_probe or robust_linear_probe): adds the row "
        "wise(VARIANT), the interpolation of its init sub-run and final "
        "weights at the alpha best on validation. Repeatable.",
        **options,
    )
    flags.DEFINE_list(
        "interpolate_alphas",
        None,
        "The alphas --interpolate tries (0: the init "
        "sub-run, 1: the fine-tuned run; default: interpolate's grid).",
        **options,
    )
    flags.DEFINE_enum(
        "interpolate_select",
        "robust",
        list(SELECTIONS),
        "What the alpha of --interpolate maximises on validation: PGD or clean accuracy.",
        **options,
    )
    flags.DEFINE_integer(
        "interpolate_validation_examples",
        None,
        "Validation examples the alpha is chosen on (default: interpolate's).",
        **options,
    )
    flags.DEFINE_bool(
        "plan",
        False,
        "Print one standalone train command per run (for a scheduler) and exit; writes "
        "nothing. A compare with the same flags then evaluates and reports.",
        **options,
    )
    flags.DEFINE_string(
        "shard",
        None,
        "K/N: train only the K-th of N slices of the runs (run index mod N = K-1); no "
        "evaluation or report (a compare without --shard writes it).",
        **options,
    )
    own = [
        "methods",
        "seeds",
        "baseline",
        "output_dir",
        "attacks",
        "eval_max_examples",
        "eval_batch_size",
        "autoattack_examples",
        "interpolate",
        "interpolate_alphas",
        "interpolate_select",
        "interpolate_validation_examples",
        "plan",
        "shard",
    ]
    define_run_flags(flag_values, TRAIN)
    flag_values.set_default("deterministic", True)
    return own


def interpolation_args(alphas, select, validation_examples):
    """`interpolate_runs` keyword arguments of the `--interpolate_*` flags (SetupError for an
    alpha that is not a number)."""
    args = {"select": select}
    if alphas:
        try:
            args["alphas"] = [float(a) for a in alphas]
        except ValueError:
            raise SetupError(
                f"--interpolate_alphas must be numbers, got {','.join(alphas)}."
            ) from None
    if validation_examples is not None:
        args["validation_examples"] = validation_examples
    return args


def print_plan(base, shard):
    """Prints one `train` command per run of the grid (of `shard`'s slice); writes nothing."""
    from twins_tf import comparison

    plan, _ = comparison.plan_grid(
        base,
        FLAGS.methods,
        parse_seeds(FLAGS.seeds),
        FLAGS.baseline or FLAGS.methods[0],
        FLAGS.output_dir,
        FLAGS.interpolate,
    )
    for _, _, settings in comparison.shard_runs(comparison.grid_runs(plan), shard):
        print(comparison.run_command(settings), flush=True)
    print(
        "# then this compare without --plan evaluates the runs and writes the report",
        file=sys.stderr,
    )


def main(argv):
    from twins_tf import comparison
    from twins_tf.training.run_callbacks import DivergenceError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        typed = command_line_flags(FLAGS, sys.argv)  # a flagfile's --method is the task's
        for name, replacement in PER_RUN_FLAGS.items():
            if name in typed:
                raise SetupError(f"--{name} is set per run by compare; use {replacement}.")
        if not FLAGS.output_dir:
            raise SetupError("--output_dir is required: where the runs and the report go.")
        if "autoattack" in FLAGS.attacks:
            raise SetupError(
                "--attacks takes clean and pgdK; AutoAttack runs on --autoattack_examples examples."
            )
        shard = comparison.parse_shard(FLAGS.shard) if FLAGS.shard is not None else None
        base = settings_from_flags(FLAGS, TRAIN)
        if FLAGS.plan:
            print_plan(base, shard)
            return
        reported = comparison.compare(
            base,
            methods=FLAGS.methods,
            seeds=parse_seeds(FLAGS.seeds),
            baseline=FLAGS.baseline or FLAGS.methods[0],
            output_dir=FLAGS.output_dir,
            attacks=FLAGS.attacks,
            max_examples=FLAGS.eval_max_examples,
            batch_size=FLAGS.eval_batch_size,
            autoattack_examples=FLAGS.autoattack_examples,
            interpolate=FLAGS.interpolate,
            interpolation_args=interpolation_args(
                FLAGS.interpolate_alphas,
                FLAGS.interpolate_select,
                FLAGS.interpolate_validation_examples,
            ),
            shard=shard,
        )
    except (SetupError, DivergenceError) as error:
        sys.exit(f"compare: error: {error}")
    except comparison.GridUnfinished as unfinished:
        print(f"compare: {unfinished}", file=sys.stderr, flush=True)
        sys.exit(EXIT_UNFINISHED)
    if reported is not None:
        print(reported[1])
        print(f"report: {FLAGS.output_dir}/{comparison.REPORT_DIR}/report.html")


if __name__ == "__main__":
    for _name in define_flags(FLAGS):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[_name])
    app.run(main)
