"""AutoAttack over an evaluation's batches: sharded, resumable, with the accuracy after each
sub-attack.

The attack itself (sub-attacks, target classes, budgets) is `twins_tf.attacks.AutoAttack`;
this module shares the batches out over the replicas and workers (`shards.py`), keeps each
shard's progress in its own state file, merges the shards' per-example results back into the
evaluation order and turns them into the report's `results.autoattack` entry, which records
everything a rerun needs.

A state file's name holds a hash of everything that changes the result (weights, data and
subset, norm, radius, version, seed, targets, budgets, batch size) and of the shard layout,
so an evaluation only ever finds its own; one that still does not fit (written by another
version, cut short on disk) is set aside as `<name>.stale` with a one-line notice.  The files
are removed once their results are merged into the report.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from twins_tf.evaluation import shards
from twins_tf.training.settings import SetupError


def state_directory(settings):
    """Where the chief keeps AutoAttack's state files (beside the report), or None."""
    if settings.get("model_dir"):
        return settings["model_dir"]
    if settings.get("output"):
        return os.path.dirname(os.path.abspath(settings["output"]))
    return None


def state_key(settings, attack):
    """A hash of everything that changes AutoAttack's per-example result."""
    s = settings
    digest = hashlib.sha1(s["weights_sha1"].encode())
    data = [s[k] for k in ("dataset", "image_size", "upsample", "split", "max_examples")]
    data += [s.get("train_per_class"), bool(s.get("skip_bad_images"))]
    digest.update(json.dumps([data, attack.get_config(), s["batch_size"]]).encode())
    return digest.hexdigest()[:12]


def state_paths(settings, attack, layout, directory):
    """{shard: its state file} for every shard of `layout` (each in its worker's directory)."""
    key = state_key(settings, attack)
    return {
        shard: os.path.join(
            layout.directory_of(layout.rank_of(shard), directory),
            f"autoattack_{settings['split']}_{key}_shard{shard}of{layout.count}.npz",
        )
        for shard in range(layout.count)
    }


def run_autoattack(model, batches, examples, settings, *, layout=None, progress=True, log=print):
    """AutoAttack over the `examples` examples of `batches`, sharded over `layout`; the
    report's entry (the accuracy after each sub-attack, per-example `broken_by`).

    Each local shard runs on its replica's device and saves its progress after every batch
    (its state holds per-example codes only, so saving is cheap), so an interrupted
    evaluation started again continues where it stopped.
    """
    import tensorflow as tf

    from twins_tf.attacks import AutoAttack  # looked up at call time: tests lower its budget

    s = settings
    layout = layout or shards.layout_of(None)

    def new_attack():
        return AutoAttack(
            s["attack_eps"],
            norm=s.get("attack_norm", "linf"),  # settings resolved before the norm: L-inf
            version=s["autoattack_version"],
            seed=s["seed"],
        )

    attack = new_attack()
    total = -(-examples // s["batch_size"])
    directory, temporary = state_directory(s), None
    if directory is None:
        if layout.multi_worker:
            raise SetupError(
                "AutoAttack under --strategy=multi_worker needs --model_dir or --output: the "
                "workers share their results through files beside the report."
            )
        directory = temporary = tempfile.mkdtemp(prefix="twins_tf_autoattack_")
    paths = state_paths(s, attack, layout, directory)
    checker, local_examples = None, 0
    for shard, device in layout.local:
        indices = layout.batches_of(shard, total)
        if not indices:
            continue
        shard_attack = new_attack()
        _set_aside_if_stale(shard_attack, paths[shard], s["batch_size"], indices, log)
        with tf.device(device) if device else contextlib.nullcontext():
            result = shard_attack.run(
                model,
                _shard_of(batches, shard, layout.count),
                batch_size=s["batch_size"],
                state_path=paths[shard],
                save_every=1,
                keep_adversarial=False,
                verbose=int(progress),
                batch_indices=indices,
            )
        local_examples += len(result.labels)
        checker = shard_attack if shard == 0 else checker
    done = shards.sum_over_workers(layout, local_examples)  # every shard's file is complete
    if done != examples:
        raise RuntimeError(f"AutoAttack's shards attacked {done} examples of {examples}.")
    merged = merge_shards(paths, layout, total)
    first_batch = next(iter(batches))
    entry = _report_entry(checker or new_attack(), model, first_batch, merged, s, layout)
    shards.sum_over_workers(layout, 0)  # every worker has read every shard's file
    if layout.is_chief:
        _remove_states(paths.values(), directory)
    if temporary:
        shutil.rmtree(temporary, ignore_errors=True)
    return entry


def _shard_of(batches, shard, count):
    """The batches i of `batches` with i mod `count` == `shard`, in order."""
    if count == 1:
        return batches
    return batches.enumerate().filter(lambda i, _: i % count == shard).map(lambda _, batch: batch)


def _set_aside_if_stale(attack, path, batch_size, indices, log):
    problem = attack.state_problem(path, batch_size, keep_adversarial=False, batch_indices=indices)
    if problem:
        os.replace(path, f"{path}.stale")
        reason = problem.splitlines()[0] if problem.strip() else "it does not fit"
        log(
            f"AutoAttack state {path} does not fit this evaluation ({reason}): "
            f"moved to {os.path.basename(path)}.stale; starting afresh."
        )


def merge_shards(paths, layout, total_batches):
    """The shards' per-example results in the evaluation's order, from their state files.

    Returns:
      {"labels", "broken_by": arrays over the evaluation; "seconds": {sub-attack: seconds
      summed over shards}; "counts": the four counts of `AutoAttack.read_state`, summed}.
    """
    from twins_tf.attacks.autoattack import AutoAttack

    by_batch, seconds, counts = {}, {}, np.zeros(4, np.int64)
    for shard, path in paths.items():
        indices = layout.batches_of(shard, total_batches)
        if not indices:
            continue
        state = AutoAttack.read_state(path)
        if state["batches_done"] != len(indices):
            raise RuntimeError(
                f"AutoAttack shard {shard} ({path}) holds {state['batches_done']} of its "
                f"{len(indices)} batches."
            )
        splits = np.cumsum(state["batch_sizes"])[:-1]
        for index, labels, broken in zip(
            indices, np.split(state["labels"], splits), np.split(state["broken_by"], splits)
        ):
            by_batch[index] = (labels, broken)
        for name, value in state["seconds"].items():
            seconds[name] = seconds.get(name, 0.0) + value
        counts += np.asarray(state["counts"], np.int64)
    order = [by_batch[i] for i in range(total_batches)]
    return {
        "labels": np.concatenate([labels for labels, _ in order]),
        "broken_by": np.concatenate([broken for _, broken in order]),
        "seconds": seconds,
        "counts": [int(c) for c in counts],
    }


def _report_entry(attack, model, first_batch, merged, settings, layout):
    """The report's `results.autoattack` from the merged shards."""
    import twins_tf
    from twins_tf import input_checks
    from twins_tf.attacks import checks
    from twins_tf.attacks.autoattack import AutoAttackResult, unconfirmed_message

    s = settings
    names, targets, skipped = attack.plan(s["num_classes"])
    zero, attacked, unconfirmed, reported = merged["counts"]
    result = AutoAttackResult(
        attacks=names,
        labels=merged["labels"],
        broken_by=merged["broken_by"],
        n_target_classes=targets,
        skipped=dict(skipped),
        seconds={name: merged["seconds"].get(name, 0.0) for name in names},
        unconfirmed=unconfirmed,
    )
    x, y = input_checks.check_images_and_labels(*first_batch, attack.who, model=model)
    before = attack.check(model, x, y)  # the first batch's checks (shard 0 ran them already)
    after = [
        checks.zero_gradient_message(
            zero, attacked, "examples the DLR attack ran on (all batches)"
        ),
        unconfirmed_message(unconfirmed, reported),
        checks.check_square(result.accuracy),
    ]
    accuracy = result.accuracy
    config = attack.get_config()
    return {
        "accuracy": float(result.robust_accuracy),
        "clean_accuracy": float(accuracy["clean"]),
        "after_each_attack": {name: float(accuracy[name]) for name in result.attacks},
        "seconds_each_attack": {name: round(result.seconds[name], 2) for name in result.attacks},
        "skipped": dict(result.skipped),
        "examples": int(len(result.labels)),
        "version": s["autoattack_version"],
        "twins_tf_version": twins_tf.__version__,
        "epsilon": attack.epsilon,
        "norm": attack.norm,
        "n_target_classes": result.n_target_classes,
        "seed": attack.seed,
        "budget": {
            key: config[key] for key in ("apgd_steps", "fab_steps", "square_queries", "eot_iter")
        },
        "batch_size": s["batch_size"],
        "checks": list(before) + [m for m in after if m],
        "unconfirmed": int(unconfirmed),  # non-robust points the whole batch did not confirm
        "shards": layout.count,
        # per example, in evaluation order: -1 robust, 0 misclassified clean, k >= 1 first
        # fooled by the k-th sub-attack of after_each_attack
        "broken_by": [int(code) for code in result.broken_by],
    }


def _remove_states(paths, directory):
    """Removes the merged state files, and the workers' directories they leave empty."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        parent = os.path.dirname(path)
        if os.path.abspath(parent) != os.path.abspath(directory):
            with contextlib.suppress(OSError):  # not empty: a training worker's files
                os.rmdir(parent)
