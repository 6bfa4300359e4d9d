"""The runs of a comparison's grid trained by any number of processes at once.

Each run is trained through `training.loop.run`, which holds the run directory's lock
(`training.run_lock`) while it trains, so processes sharing an output directory (several
`compare`s, shards, planned commands) never train one run twice: a run another process holds
is skipped with a notice naming it and looked at again after the others.  The workers of one
multi-worker job are the exception: they must train every run together (training runs
collectives in lockstep), so there a held run is an error, and only the chief goes on to
evaluate and report.
"""

from twins_tf.platform import keras_private
from twins_tf.training import run_lock

MULTI_WORKER = "multi_worker"


class GridUnfinished(Exception):
    """Runs of the grid (or its report) are in use by other processes: this process evaluates
    nothing and writes no report; a later `compare` with the same flags does."""


def _train_one(settings, verbose):
    from twins_tf.training import loop

    keras_private.forget_tracing_history()  # a new run, new models: its traces count alone
    loop.run(settings, verbose=verbose)


def in_multi_worker_job(runs):
    """Whether any of `runs` (`grid.grid_runs` items) trains under MultiWorkerMirroredStrategy."""
    return any(settings["strategy"] == MULTI_WORKER for _, _, settings in runs)


def is_chief(runs):
    """Whether this process evaluates and reports: the chief of a multi-worker job, else yes."""
    if not in_multi_worker_job(runs):
        return True
    from twins_tf.training import distribute, multi_worker

    return multi_worker.is_chief(distribute.get_strategy(MULTI_WORKER))


def _train_or_skip(variant, seed, settings, *, skip_held, log, verbose):
    """Trains (resumes, or finds finished) one run; returns None, or the `LockHeld` of a run
    another process is training when `skip_held`, after a notice naming that process."""
    name = f"{variant.name}, seed {seed}"
    model_dir = settings["model_dir"]
    try:
        holder = run_lock.live_holder(model_dir) if skip_held else None
        if holder is not None:  # seen before the run is prepared (data, model): cheaper
            path = run_lock.lock_path(model_dir)
            raise run_lock.LockHeld(run_lock.held_message(model_dir, path, holder), path, holder)
        _train_one(settings, verbose)
    except run_lock.LockHeld as error:
        if not skip_held:
            raise
        log(f"compare: {name}: skipped: {error}")
        return error
    return None


def train_runs(runs, *, skip_held=True, log=print, verbose=0):
    """Trains (resumes, or finds finished) each of `runs` (`grid_runs` items).

    With `skip_held`, a run another process is training is skipped with a notice, and looked
    at again after the others: by then it may be finished, or its holder gone (then it is
    taken over and trained here).  Without it (the workers of one multi-worker job train
    every run together) a held run raises.

    Returns:
      [(variant, seed, LockHeld)] of the runs still held by other processes.
    """
    held = []
    for variant, seed, settings in runs:
        log(f"compare: {variant.name}, seed {seed}: {settings['model_dir']}")
        error = _train_or_skip(
            variant, seed, settings, skip_held=skip_held, log=log, verbose=verbose
        )
        if error is not None:
            held.append((variant, seed, settings))
    still = []
    for variant, seed, settings in held:
        log(f"compare: {variant.name}, seed {seed}: looked at again: {settings['model_dir']}")
        error = _train_or_skip(
            variant, seed, settings, skip_held=skip_held, log=log, verbose=verbose
        )
        if error is not None:
            still.append((variant, seed, error))
    return still


def unfinished_message(held):
    names = "; ".join(
        f"{v.name}, seed {seed} ({run_lock.describe(error.holder)})" for v, seed, error in held
    )
    return (
        f"{len(held)} run(s) are still being trained by other processes: {names}; a later "
        "compare with the same flags evaluates them and writes the report."
    )
