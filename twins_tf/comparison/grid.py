"""The grid of a comparison: every (row, seed) trained, evaluated or interpolated, then reported.

`compare` trains every row with every seed, each as an ordinary `train` run in its own model_dir
(resumable; a finished run is reused, not retrained), evaluates each on the same test examples
(an evaluation is reused while the weights it measured are unchanged), adds the `wise(...)`
interpolation rows, and hands the results to `report.write_report`.  `plan_rows` checks the
whole grid first, so a bad entry fails before the first run rather than hours into the grid.
Any number of processes may share the grid (`grid_training`); one of them, holding the report
directory's lock, evaluates and reports.
"""

import dataclasses
import json
import os

from twins_tf.comparison.commands import shard_runs
from twins_tf.comparison.grid_training import (
    GridUnfinished,
    in_multi_worker_job,
    is_chief,
    train_runs,
    unfinished_message,
)
from twins_tf.comparison.report import REPORT_DIR, write_report
from twins_tf.comparison.rows import (
    RunResult,
    parse_variant,
    run_dir,
    settings_hash,
    variant_settings,
    wise_dir_name,
    wise_name,
)
from twins_tf.evaluation.inputs import AUTOATTACK
from twins_tf.platform import keras_private
from twins_tf.training import init_stage, run_lock
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import Settings, SetupError

EVALUATION_FILE = "compare_evaluation.json"
AUTOATTACK_FILE = "compare_autoattack.json"
RANDOM_INIT = "random"  # --init of a run without an init sub-run to interpolate from
# The lock of the report directory: one process evaluates the grid and writes the report.
REPORT_LOCK = "report.lock"


def _evaluate_one(model_dir, evaluation_args, log, file_name=EVALUATION_FILE):
    """Evaluates a finished run; reuses the stored report while the best weights are older.

    `evaluation_args` are `python -m twins_tf.evaluate` flags, parsed by that binary's flag
    definitions, and the report keeps them: a later comparison reuses it only for the same ones.
    """
    from absl import flags

    from twins_tf.evaluation import evaluate
    from twins_tf.evaluation import flags as evaluation_flags

    path = os.path.join(model_dir, file_name)
    weights = os.path.join(model_dir, run_files.BEST_WEIGHTS)
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(weights):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("compare_args") == list(evaluation_args):
            return stored
    flag_values = flags.FlagValues()
    evaluation_flags.define_flags(flag_values)
    flag_values(["evaluate", f"--model_dir={model_dir}", f"--output={path}", *evaluation_args])
    settings = evaluation_flags.settings_from_flags(flag_values)
    report = evaluate(settings, log=log, progress=False)
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

    keras_private.forget_tracing_history()  # a new run, new models: its traces count alone
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
      SetupError: a bad `--methods` entry, a repeated row, two rows that are the same run
        (`at+init=random` beside `at`), an `--interpolate` variant that is not among the
        methods or has init=random.
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
    _refuse_same_runs(plan, seeds[0])
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


def plan_grid(base_settings, methods, seeds, baseline, output_dir, interpolate=()):
    """`plan_rows` after checking that `baseline` is one of `methods`: every check of
    `compare`, nothing written."""
    names = [parse_variant(m).name for m in methods]
    if parse_variant(baseline).name not in names:
        raise SetupError(
            f"--baseline={baseline} is not among --methods="
            f"{','.join(methods)}: add it or pick one of them."
        )
    return plan_rows(base_settings, methods, seeds, output_dir, interpolate)


def _refuse_same_runs(plan, seed):
    """SetupError when two rows' runs would learn the same thing (their settings but where they
    live and how they execute are equal, as `settings_hash` counts them): one run, two rows."""
    seen = {}
    for variant, runs in plan.items():
        key = settings_hash(Settings.from_dict(runs[seed]).to_dict())
        if key in seen:
            raise SetupError(
                f"--methods entries {seen[key].name!r} and {variant.name!r} are the same run "
                "(every setting that changes what is learnt is equal): drop one of them."
            )
        seen[key] = variant


def grid_runs(plan):
    """The plan's runs in the grid's order (rows, then seeds): [(variant, seed, settings)]."""
    return [(v, seed, settings) for v, runs in plan.items() for seed, settings in runs.items()]


def evaluate_runs(
    plan,
    seeds,
    output_dir,
    interpolated,
    *,
    evaluation_args,
    autoattack_args=None,
    interpolation_args=None,
    log=print,
    verbose=0,
):
    """The `RunResult` of every finished run of `plan`, then of every `wise(...)` row (each
    interpolated here, or its stored result reused)."""
    results = []
    for variant, seed, settings in grid_runs(plan):
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

    Raises:
      GridUnfinished: runs are being trained by other processes (see `train_runs`).
    """
    plan, interpolated = plan_rows(base_settings, methods, seeds, output_dir, interpolate)
    runs = grid_runs(plan)
    held = train_runs(runs, skip_held=not in_multi_worker_job(runs), log=log, verbose=verbose)
    if held:
        raise GridUnfinished(unfinished_message(held))
    return evaluate_runs(
        plan,
        seeds,
        output_dir,
        interpolated,
        evaluation_args=evaluation_args,
        autoattack_args=autoattack_args,
        interpolation_args=interpolation_args,
        log=log,
        verbose=verbose,
    )


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
    shard=None,
    log=print,
    verbose=0,
):
    """Runs the grid, evaluates every run, writes the report; returns (summary, table).

    Several processes may run one comparison at once: each run is locked while it trains
    (`training.run_lock`), a run another process holds is skipped with a notice, and the one
    process that finds every run finished evaluates them and writes the report (under a lock
    of the report directory).  In a multi-worker job every worker trains every run with the
    others (training runs collectives in lockstep) and only the chief evaluates and reports.

    Args:
      base_settings: `train` settings shared by every run.
      methods, seeds: the grid (`methods`: `METHOD[+KEY=VALUE...]` entries); `baseline` (one
        of `methods`) is what differences are against.
      attacks: `evaluate` attacks on `max_examples` test examples (None: all).
      autoattack_examples: > 0 also runs standard AutoAttack on that many test examples.
      interpolate: variants of `methods` whose `wise(...)` rows to add (see `run_grid`), with
        `interpolation_args` for `interpolate_runs` (alphas, select, validation_examples).
      report_dir: where the report goes (default `output_dir/report`).
      shard: (K, N): train only the K-th of N slices of the runs (`commands.shard_runs`);
        nothing is evaluated or reported.

    Returns:
      (summary, table); None when this process writes no report (a shard, or a worker of a
      multi-worker job that is not its chief).

    Raises:
      SetupError: before anything is trained, for a bad entry of `methods`, `interpolate` or
        `baseline`.
      GridUnfinished: runs of the grid (or the report) are in use by other processes.
    """
    plan, interpolated = plan_grid(base_settings, methods, seeds, baseline, output_dir, interpolate)
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
    runs = grid_runs(plan)
    multi_worker_job = in_multi_worker_job(runs)
    held = train_runs(
        shard_runs(runs, shard), skip_held=not multi_worker_job, log=log, verbose=verbose
    )
    if held:
        raise GridUnfinished(unfinished_message(held))
    if shard is not None:
        log(
            f"compare: shard {shard[0]}/{shard[1]} is trained; a compare without --shard "
            "evaluates the runs and writes the report."
        )
        return None
    if not is_chief(runs):
        log("compare: every run is trained; the chief evaluates them and writes the report.")
        return None
    report_dir = report_dir or os.path.join(output_dir, REPORT_DIR)
    try:
        lock = run_lock.acquire(report_dir, name=REPORT_LOCK, log=log, prefix="compare")
    except run_lock.LockHeld as error:
        raise GridUnfinished(
            f"every run is trained, and another process is writing the report: {error}"
        ) from None
    try:
        results = evaluate_runs(
            plan,
            seeds,
            output_dir,
            interpolated,
            evaluation_args=evaluation_args,
            autoattack_args=autoattack_args,
            interpolation_args=interpolation_args,
            log=log,
            verbose=verbose,
        )
        reported = list(attacks) + ([AUTOATTACK] if autoattack_examples else [])
        return write_report(
            results, reported, parse_variant(baseline).name, report_dir, title=title
        )
    finally:
        run_lock.release(lock)
