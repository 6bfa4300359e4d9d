"""The run loop: `prepare` (check everything, build), `fit` (train, write the files), `run`.

`run(settings)` is what `python -m twins_tf.train` and `python -m twins_tf.pretrain` do, and
what `compare` and the demo call once per run: check the settings, the data, the weights and
the model_dir (`prepare`, nothing written), then train or resume (`fit`), or find the run
finished and return its summary.  Process-global state a run sets (the Keras dtype policy of
`--precision`, TensorFlow's op determinism of `--deterministic`, the multi-worker fixes
of Keras's trainer) is put back when it returns, so the next run in the process (compare, the
demo, a notebook) gets only its own settings.
"""

import dataclasses
import os

from twins_tf.input_checks import budget_text, threat_model_text
from twins_tf.training import backup, init_stage
from twins_tf.training import model_dir as model_dir_lib
from twins_tf.training.model import build_model
from twins_tf.training.schedule import format_schedule, run_schedule
from twins_tf.training.settings import Settings, SetupError, as_settings
from twins_tf.training.trainer_setup import make_trainer, pipelines


@dataclasses.dataclass
class PreparedRun:
    """Everything a checked run needs; built by `prepare` before anything is written."""

    settings: Settings
    output_dir: str
    state: str  # "new", "resume" or "finished" (see model_dir.check_model_dir)
    strategy: object = None
    spec: object = None
    splits: object = None
    steps_per_epoch: int = 0
    model: object = None
    chief: bool = True
    bn_batch: object = None  # run_callbacks.BatchNormBatch of the model at its batch size


def seed_everything(seed):
    """Seeds Python, NumPy and Keras (model initialisation); leaves TF's global seed unset.

    Every other random draw of a run has an explicit seed (data order and augmentation, PGD
    starts).  A TF global seed would also break `data.make_pipeline`: its per-epoch shuffle
    seed is a tensor, and TF cannot combine a global seed with a tensor op seed
    ("Using a symbolic tf.Tensor as a Python bool").
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.random.set_seed(None)


def _limited(count, limit):
    return count if limit is None else min(count, limit)


def prepare(settings):
    """Checks `settings` against the flags' rules, the data, the weights and the model_dir.

    Nothing is written.  Builds the strategy, loads the dataset splits (lazily: tf.data) and
    builds the model with its pre-trained weights.

    Args:
      settings: a `Settings`, or a settings dict (`training.flags.settings_from_flags`).

    Raises:
      SetupError: the first problem found, as a one-line message.
    """
    import keras
    import tensorflow as tf

    from twins_tf import data as data_lib
    from twins_tf.training import distribute, multi_worker

    s = as_settings(settings)
    if s.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        strategy = distribute.get_strategy(s.strategy, tpu_address=s.tpu_address)
    except (ValueError, RuntimeError) as error:
        raise SetupError(str(error)) from None
    try:
        data_lib.check_batch_size(s.batch_size, strategy.num_replicas_in_sync, s.twin)
    except ValueError as error:
        raise SetupError(str(error)) from None
    s = s.replace(replicas=strategy.num_replicas_in_sync)
    if (
        s.strategy == "mirrored"
        and s.jit_compile == "true"
        and not (tf.config.list_logical_devices("GPU"))
    ):
        raise SetupError(
            "--jit_compile=true with --strategy=mirrored over CPU devices fails "
            "inside TensorFlow; use --jit_compile=auto or false."
        )
    output_dir = multi_worker.output_dir(s.model_dir, strategy)
    spec = data_lib.get_dataset_spec(s.dataset, image_size=s.image_size, upsample=s.upsample)
    try:
        splits = data_lib.load_splits(
            spec,
            data_dir=s.data_dir,
            tfds_data_dir=s.tfds_data_dir,
            train_per_class=s.train_per_class,
            skip_bad_images=s.skip_bad_images,
            validation=s.validation,
        )
        s = s.replace(num_classes=int(splits.num_classes))
        train_examples = _limited(splits.num_examples["train"], s.max_train_examples)
        steps = data_lib.steps_per_epoch(train_examples, s.batch_size)
    except (ValueError, FileNotFoundError) as error:  # DatasetNotFoundError is one
        raise SetupError(str(error)) from None
    if output_dir != s.model_dir:
        # A worker refuses exactly when the chief does, rather than waiting for it forever.
        model_dir_lib.check_model_dir(s.model_dir, s)
    state = model_dir_lib.check_model_dir(output_dir, s)
    changed = model_dir_lib.changed_replicas(output_dir, s)
    if changed and state == "resume":
        print(
            f"{s.binary}: note: the run trained on {changed[0]} replica(s) and continues on "
            f"{changed[1]}: its BatchNorm is synchronized over the whole batch on any number, "
            "but the PGD starts of the epochs to come are drawn per replica, so they differ "
            "from an uninterrupted run's.",
            flush=True,
        )
    init_stage.check(s)  # <model_dir>/init, the --init probe's sub-run
    prepared = PreparedRun(
        settings=s,
        output_dir=output_dir,
        state=state,
        strategy=strategy,
        spec=spec,
        splits=splits,
        steps_per_epoch=steps,
        chief=multi_worker.is_chief(strategy),
    )
    if state == "finished":
        return prepared
    seed_everything(s.seed)
    keras.mixed_precision.set_dtype_policy(s.dtype_policy)
    with strategy.scope():
        prepared.model = build_model(s, strategy.num_replicas_in_sync)
    _check_batch_norm_batch(prepared)
    return prepared


def _check_batch_norm_batch(prepared):
    """Warns when a BatchNorm layer would normalise with statistics of too few values (few
    images per wing and replica at a small last map); `StopOnDivergence` names it if the run
    diverges.  An init stage's backbone is frozen (BN in inference mode): nothing to check."""
    from twins_tf.training import run_callbacks

    s = prepared.settings
    if s.stage == "init":
        return
    prepared.bn_batch = run_callbacks.batch_norm_batch(
        prepared.model, s.batch_size, prepared.strategy.num_replicas_in_sync
    )
    if prepared.bn_batch is not None and prepared.bn_batch.too_few:
        print(f"{s.binary}: warning: {prepared.bn_batch.warning()}", flush=True)


def _callbacks(prepared, validation_ds, train_ds):
    """The run's callbacks, in the order they must run, and the BestWeights one among them."""
    import keras

    from twins_tf.training import run_callbacks

    s, out = prepared.settings, prepared.output_dir
    probe = None
    if s.twin:  # a few task images (validation's if any), for the Frozen wing's logits
        probe = next(iter(validation_ds if validation_ds is not None else train_ds))[0][:32]
    best = run_callbacks.BestWeights(
        prepared.model, out, monitor="val_adv_acc" if validation_ds is not None else None
    )
    callbacks = [  # StopOnDivergence first: it raises before the others save a NaN epoch
        run_callbacks.StopOnDivergence(
            prepared.model,
            prepared.steps_per_epoch,
            probe=probe,
            lr=s.lr,
            bn_batch=prepared.bn_batch,
        ),
        run_callbacks.MetricsCsv(os.path.join(out, model_dir_lib.METRICS_FILE)),
        best,
        run_callbacks.LastWeights(prepared.model, out),
    ]
    if prepared.chief:
        callbacks.append(
            keras.callbacks.TensorBoard(
                os.path.join(out, model_dir_lib.TENSORBOARD_DIR), write_graph=False
            )
        )
    # Last, so a kill between the files above and the backup repeats the epoch (harmless)
    # instead of losing it.  double_checkpoint keeps the previous epoch's backup while the
    # new one is written, so a kill during that write resumes from the previous epoch.
    # Kept when the run finishes, so that a higher --epochs can extend it.
    callbacks.append(
        keras.callbacks.BackupAndRestore(
            os.path.join(out, backup.BACKUP_DIR), double_checkpoint=True, delete_checkpoint=False
        )
    )
    return callbacks, best


def fit(prepared, *, verbose="auto"):
    """Trains a prepared run (new or resumed) to its last epoch and writes its files.

    A finished run whose `--epochs` was raised is extended: it resumes from its backup (kept
    when it finished) and trains the extra epochs.  With `--init` != random a run that has
    not finished an epoch first runs (resumes, or reuses when finished) its init stage in
    `<model_dir>/init` and starts from that head (`training.init_stage`).

    Returns:
      The run summary (also written to `summary.json`).

    Raises:
      run_callbacks.DivergenceError: the loss or the weights became non-finite; the weights
        files keep the last finite epoch.
    """
    from twins_tf.training import multi_worker, run_callbacks

    s, out = prepared.settings, prepared.output_dir
    start_epoch = 0
    if prepared.state == "resume":
        backup.repair_backup(out)
        start_epoch = backup.resume_epoch(out)
    train_ds, validation_ds = pipelines(s, prepared.spec, prepared.splits, start_epoch)
    model_dir_lib.write_config(out, s)
    if s.stage == "main" and s.init != "random" and start_epoch == 0:
        # a resumed epoch > 0 restores the whole model, head included, from the backup
        _run_init_stage(prepared, verbose)
    with prepared.strategy.scope():
        trainer = make_trainer(prepared.model, s, prepared.steps_per_epoch)
    callbacks, best_weights = _callbacks(prepared, validation_ds, train_ds)
    print(
        f"{s.binary}: {s.method} {s.arch} on {s.dataset} "
        f"({prepared.steps_per_epoch} steps/epoch, {s.epochs} epochs, "
        f"{prepared.strategy.num_replicas_in_sync} replica(s)); "
        + (f"resuming after epoch {start_epoch}" if start_epoch else "starting")
        + f"; {out}\n{s.binary}: schedule: {format_schedule(run_schedule(s, []))}"
        + f"\n{s.binary}: attack: PGD-{s.attack_steps}, "
        + f"{threat_model_text(s.attack_norm, s.attack_eps)}, "
        + f"step {budget_text(s.attack_step, s.attack_norm)}",
        flush=True,
    )
    with multi_worker.keras_fixes_for(prepared.strategy):
        trainer.fit(
            train_ds,
            validation_data=validation_ds,
            epochs=s.epochs,
            steps_per_epoch=prepared.steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # the pipeline shuffles, per (seed, epoch)
    best = best_weights.best
    metrics = run_callbacks.read_metrics(os.path.join(out, model_dir_lib.METRICS_FILE))
    final = metrics[-1]
    summary = {
        "epochs": s.epochs,
        # below `epochs` when training stopped early (AutoLoRa's lr rule, twins_tf.autolora)
        "trained_epochs": final["epoch"],
        "validation": s.validation,
        "best_epoch": best["epoch"] if best else None,
        "best_val_adv_acc": best["value"] if best else None,
        # the threat model the adversarial metrics (and best_val_adv_acc) were measured in
        "attack": {
            "norm": s.attack_norm,
            "epsilon": s.attack_eps,
            "step_size": s.attack_step,
            "steps": s.attack_steps,
        },
        # the numerics of the training step and attack (validation attacks in float32)
        "precision": s.precision,
        "final": final,
        # what the optimiser ran: the flags' or the method's published schedule, and
        # AutoLoRa's automated halvings (training.schedule.run_schedule)
        "schedule": run_schedule(s, metrics),
    }
    model_dir_lib.write_json(os.path.join(out, model_dir_lib.SUMMARY_FILE), summary)
    backup.drop_previous_pair(out)
    return summary


def _run_init_stage(prepared, verbose):
    """Runs (resumes, or finds finished) the `--init` probe of a prepared main run in
    `<model_dir>/init`, then sets the main model's head to the probe's best one."""
    s = prepared.settings
    sub = init_stage.init_settings(s)
    print(
        f"{s.binary}: --init={s.init}: the head first, on the frozen backbone "
        f"({sub.method}, {sub.epochs} epochs); {sub.model_dir}",
        flush=True,
    )
    run(sub, verbose=verbose)
    init_stage.load_head(prepared.model, sub.model_dir, strategy=prepared.strategy)


def run(settings, *, verbose="auto"):
    """Checks, then trains (or resumes) the run described by `settings`; returns its summary.

    The directory the run writes is locked while it trains (`training.run_lock`): a second
    process finds it in use and gets `run_lock.LockHeld`, a `SetupError` naming the holder.

    Args:
      settings: a `Settings`, or a settings dict with one key per flag of its binary
        (`training.flags.settings_from_flags`).

    Raises:
      SetupError: a problem with the inputs, before anything is trained or written.
    """
    import contextlib

    import keras

    from twins_tf.platform import keras_private
    from twins_tf.training import run_lock

    # --precision sets the global dtype policy and --deterministic TensorFlow's global
    # op determinism: both are put back, so the next run in this process gets only its own.
    policy = keras.config.dtype_policy()
    deterministic = keras_private.op_determinism_enabled()
    try:
        prepared = prepare(settings)
        lock = contextlib.nullcontext()
        if prepared.state != "finished":  # one process at a time in the directory it writes
            lock = run_lock.held(
                prepared.output_dir,
                prefix=prepared.settings.binary,
                log=lambda line: print(line, flush=True),
            )
        with lock:
            if prepared.state != "finished":  # another process may have trained it meanwhile
                prepared.state = model_dir_lib.check_model_dir(
                    prepared.output_dir, prepared.settings
                )
            if prepared.state == "finished":
                print(
                    f"{prepared.output_dir} already holds this finished run; nothing to do (use "
                    "a new --model_dir to train again).",
                    flush=True,
                )
                return model_dir_lib.read_summary(prepared.output_dir)
            return fit(prepared, verbose=verbose)
    finally:
        keras.config.set_dtype_policy(policy)
        if not deterministic:
            keras_private.disable_op_determinism()
