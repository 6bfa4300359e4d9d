r"""`python -m twins_tf.train`: robust fine-tuning (TWINS-AT, TWINS-TRADES, AT, TRADES, L2-SP).

    python -m twins_tf.train --flagfile=flags/stanford_dogs.flags \
        --pretrained=robust_r50.weights.h5 --model_dir=runs/dogs

Flag groups (`--helpfull` lists them by group):
  data          --dataset --data_dir --tfds_data_dir --image_size --upsample --train_per_class
                --max_train_examples --max_validation_examples --validation
  model         --arch --pretrained --allow_random_init
  method        --method --lambda_twins --beta --l2sp_alpha
  attack        --attack_eps --attack_step --attack_steps (fractions like 8/255 work)
  optimisation  --epochs --batch_size --lr --lr_decay_epochs --weight_decay
  run           --model_dir --seed --strategy --tpu_address --jit_compile --mixed_precision
                --deterministic

The run: SGD (momentum 0.9) with the learning rate multiplied by 0.1 at each of
`--lr_decay_epochs` (stepped per iteration), coupled weight decay, the method's loss on PGD
examples (`twins_tf.AdversarialTrainer`), validation clean and PGD accuracy after every epoch
(on a split carved from the training data), a Keras progress bar, TensorBoard logs and
`metrics.csv`, the best epoch by validation PGD accuracy in `best.weights.h5`.  With
`--validation=none` (the published protocol) it trains on the whole official train split and
keeps the final epoch.  Killed, it resumes from its last finished epoch when started again
with the same command (`BackupAndRestore` with `double_checkpoint`, so even a kill while the
backup is written resumes, from the epoch before; data order and augmentation are functions of
(seed, epoch), so the resumed run ends with the weights an uninterrupted one would have).  A
finished run started again with a higher `--epochs` trains the extra epochs.  What it writes
is listed in `twins_tf.run_config`.

A NaN or infinite loss or weight stops the run at once with a one-line error naming the step,
the epoch and the likely cause (`run_callbacks.StopOnDivergence`); the binary exits 1 and the
weights files keep the last finite epoch.  A twin method without `--pretrained` is refused
unless `--allow_random_init` says it is meant.

Every input problem (unknown dataset or arch, missing data, a `--pretrained` file of another
arch or a corrupt one, a batch size that does not split over 2 x replicas, an attack radius
outside [0, 1], a model_dir holding a different run) stops the binary with a one-line error
before anything is trained or written.

`python -m twins_tf.pretrain` is this binary with from-scratch defaults (see pretrain.py);
library users call `run(settings)`.
"""
import dataclasses
import os
import sys

from absl import app, flags

from twins_tf import run_config
from twins_tf.run_config import SetupError

BINARY = run_config.TRAIN


@dataclasses.dataclass
class PreparedRun:
    """Everything a checked run needs; built by `prepare` before anything is written."""

    settings: dict
    output_dir: str
    state: str  # "new", "resume" or "finished" (see run_config.check_model_dir)
    strategy: object = None
    spec: object = None
    splits: object = None
    steps_per_epoch: int = 0
    model: object = None
    chief: bool = True


def prepare(settings):
    """Checks `settings` against the flags' rules, the data, the weights and the model_dir.

    Nothing is written.  Builds the strategy, loads the dataset splits (lazily: tf.data) and
    builds the model with its pre-trained weights.

    Raises:
      SetupError: the first problem found, as a one-line message.
    """
    import keras
    import tensorflow as tf

    from twins_tf import data as data_lib
    from twins_tf import distribute, multi_worker

    s = run_config.check_settings(settings)
    if s["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    try:
        strategy = distribute.get_strategy(s["strategy"], tpu_address=s.get("tpu_address"))
    except (ValueError, RuntimeError) as error:
        raise SetupError(str(error)) from None
    multi_worker.fix_keras_for(strategy)
    try:
        data_lib.check_batch_size(s["batch_size"], strategy.num_replicas_in_sync, s["twin"])
    except ValueError as error:
        raise SetupError(str(error)) from None
    if s["strategy"] == "mirrored" and s["jit_compile"] == "true" and not (
            tf.config.list_logical_devices("GPU")):
        raise SetupError("--jit_compile=true with --strategy=mirrored over CPU devices fails "
                         "inside TensorFlow; use --jit_compile=auto or false.")
    output_dir = multi_worker.output_dir(s["model_dir"], strategy)
    spec = data_lib.get_dataset_spec(s["dataset"], image_size=s["image_size"],
                                     upsample=s["upsample"])
    try:
        splits = data_lib.load_splits(spec, data_dir=s["data_dir"],
                                      tfds_data_dir=s["tfds_data_dir"],
                                      train_per_class=s["train_per_class"],
                                      skip_bad_images=s.get("skip_bad_images", False),
                                      validation=s["validation"])
        s["num_classes"] = int(splits.num_classes)
        train_examples = _limited(splits.num_examples["train"], s["max_train_examples"])
        steps = data_lib.steps_per_epoch(train_examples, s["batch_size"])
    except (ValueError, FileNotFoundError) as error:  # DatasetNotFoundError is one
        raise SetupError(str(error)) from None
    if output_dir != s["model_dir"]:
        # A worker refuses exactly when the chief does, rather than waiting for it forever.
        run_config.check_model_dir(s["model_dir"], s)
    state = run_config.check_model_dir(output_dir, s)
    prepared = PreparedRun(settings=s, output_dir=output_dir, state=state, strategy=strategy,
                           spec=spec, splits=splits, steps_per_epoch=steps,
                           chief=multi_worker.is_chief(strategy))
    if state == "finished":
        return prepared
    seed_everything(s["seed"])
    keras.mixed_precision.set_dtype_policy(
        "float32" if s["mixed_precision"] == "none" else s["mixed_precision"])
    with strategy.scope():
        prepared.model = build_model(s, strategy.num_replicas_in_sync)
    return prepared


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


def build_model(settings, num_replicas=1):
    """The run's classifier: `build_resnet` (twin for twin methods) with `--pretrained` loaded.

    A plain-BN model trained on several replicas gets synchronized BatchNormalization: Keras
    BN otherwise keeps per-replica moving statistics that drift apart (and saves replica 0's).
    Twin layers keep theirs equal themselves and split each replica's own batch (spec §2).

    Raises:
      SetupError: the pre-trained file is missing, corrupt or of another architecture.
    """
    from twins_tf import weights
    from twins_tf.models.resnet import build_resnet

    s = settings
    model = build_resnet(s["arch"], s["num_classes"], twin=s["twin"],
                         input_shape=(s["image_size"], s["image_size"], 3),
                         upsample=s["upsample"],
                         synchronized=num_replicas > 1 and not s["twin"])
    if s.get("pretrained"):
        try:
            weights.load_pretrained(model, s["pretrained"])
        except (FileNotFoundError, weights.CheckpointError) as error:
            raise SetupError(f"--pretrained: {error}") from None
    return model


def _limited(count, limit):
    return count if limit is None else min(count, limit)


def learning_rate_schedule(lr, decay_epochs, steps_per_epoch):
    """lr, times 0.1 from each epoch of `decay_epochs` on, as a per-iteration Keras schedule.

    Step k (0-based, the optimizer's `iterations` before the update) uses
    `lr * 0.1 ** (number of d in decay_epochs with k >= d * steps_per_epoch)`: with
    `--lr_decay_epochs=30,50` epochs 31-50 (1-based) run at lr/10, as PyTorch's MultiStepLR
    stepped per iteration.  Keras's `PiecewiseConstantDecay` keeps `values[i]` while
    `step <= boundaries[i]`, hence the boundaries one step before each decay.
    """
    import keras

    if not decay_epochs:
        return lr
    boundaries = [int(e) * steps_per_epoch - 1 for e in decay_epochs]
    values = [lr * 0.1**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_trainer(model, settings, steps_per_epoch):
    """The `AdversarialTrainer` of a run, compiled with SGD(momentum 0.9) and the schedule."""
    import keras

    from twins_tf import methods as methods_lib
    from twins_tf.attacks.pgd import PGD
    from twins_tf.trainer import AdversarialTrainer

    s = settings
    method = methods_lib.get(s["method"])
    pgd = dict(epsilon=s["attack_eps"], step_size=s["attack_step"], steps=s["attack_steps"],
               seed=s["seed"])
    trainer = AdversarialTrainer(
        model,
        method=s["method"],
        attack=PGD(**pgd, random_start=True) if method.adversarial else None,
        eval_attack=PGD(**pgd, random_start=False),  # spec §7: no random start at evaluation
        lambda_twins=s.get("lambda_twins", 1.0),
        beta=s["beta"],
        weight_decay=s["weight_decay"],
        l2sp_alpha=s.get("l2sp_alpha", 0.01),
    )
    optimizer = keras.optimizers.SGD(
        learning_rate_schedule(s["lr"], s["lr_decay_epochs"], steps_per_epoch), momentum=0.9)
    trainer.compile(optimizer=optimizer,
                    jit_compile=run_config.jit_compile_value(s["jit_compile"]))
    return trainer


def pipelines(prepared, start_epoch):
    """(training stream from `start_epoch`, validation batches or None) of a prepared run."""
    from twins_tf import data as data_lib

    s, splits = prepared.settings, prepared.splits
    # --max_*: class-stratified subsets (seeded by the split seed), not the first N examples.
    train = data_lib.stratified_subset(splits.source("train"), s["max_train_examples"])
    train_ds = data_lib.make_pipeline(train, prepared.spec, training=True,
                                      batch_size=s["batch_size"], seed=s["seed"],
                                      start_epoch=start_epoch)
    if splits.validation is None:  # --validation=none
        return train_ds, None
    validation = data_lib.stratified_subset(splits.source("validation"),
                                            s["max_validation_examples"])
    validation_ds = data_lib.make_pipeline(validation, prepared.spec, training=False,
                                           batch_size=s["batch_size"])
    return train_ds, validation_ds


def fit(prepared, *, verbose="auto"):
    """Trains a prepared run (new or resumed) to its last epoch and writes its files.

    A finished run whose `--epochs` was raised is extended: it resumes from its backup (kept
    when it finished) and trains the extra epochs.

    Returns:
      The run summary (also written to `summary.json`).

    Raises:
      run_callbacks.DivergenceError: the loss or the weights became non-finite; the weights
        files keep the last finite epoch.
    """
    import keras

    from twins_tf import run_callbacks

    s, out = prepared.settings, prepared.output_dir
    start_epoch = 0
    if prepared.state == "resume":
        run_config.repair_backup(out)
        start_epoch = run_config.resume_epoch(out)
    train_ds, validation_ds = pipelines(prepared, start_epoch)
    with prepared.strategy.scope():
        trainer = make_trainer(prepared.model, s, prepared.steps_per_epoch)
    run_config.write_config(out, s)
    probe = None
    if s["twin"]:  # a few task images (validation's if any), for the Frozen wing's logits
        probe = next(iter(validation_ds if validation_ds is not None else train_ds))[0][:32]
    with_validation = validation_ds is not None
    callbacks = [  # StopOnDivergence first: it raises before the others save a NaN epoch
        run_callbacks.StopOnDivergence(prepared.model, prepared.steps_per_epoch, probe=probe,
                                       lr=s["lr"]),
        run_callbacks.MetricsCsv(os.path.join(out, run_config.METRICS_FILE)),
        run_callbacks.BestWeights(prepared.model, out,
                                  monitor="val_adv_acc" if with_validation else None),
        run_callbacks.LastWeights(prepared.model, out),
    ]
    if prepared.chief:
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(out, run_config.TENSORBOARD_DIR), write_graph=False))
    # Last, so a kill between the files above and the backup repeats the epoch (harmless)
    # instead of losing it.  double_checkpoint keeps the previous epoch's backup while the
    # new one is written, so a kill during that write resumes from the previous epoch.
    # Kept when the run finishes, so that a higher --epochs can extend it.
    backup_dir = os.path.join(out, run_config.BACKUP_DIR)
    callbacks.append(keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True,
                                                      delete_checkpoint=False))
    print(f"{s['binary']}: {s['method']} {s['arch']} on {s['dataset']} "
          f"({prepared.steps_per_epoch} steps/epoch, {s['epochs']} epochs, "
          f"{prepared.strategy.num_replicas_in_sync} replica(s)); "
          + (f"resuming after epoch {start_epoch}" if start_epoch else "starting") + f"; {out}",
          flush=True)
    trainer.fit(train_ds, validation_data=validation_ds, epochs=s["epochs"],
                steps_per_epoch=prepared.steps_per_epoch, callbacks=callbacks, verbose=verbose,
                shuffle=False)  # the pipeline shuffles, per (seed, epoch)
    best = callbacks[2].best
    summary = {
        "epochs": s["epochs"],
        "validation": s["validation"],
        "best_epoch": best["epoch"] if best else None,
        "best_val_adv_acc": best["value"] if best else None,
        "final": run_callbacks.read_metrics(os.path.join(out, run_config.METRICS_FILE))[-1],
    }
    run_config.write_json(os.path.join(out, run_config.SUMMARY_FILE), summary)
    for name in (run_config.BACKUP_WEIGHTS, run_config.BACKUP_METADATA):
        previous = os.path.join(backup_dir, name + run_config.PREVIOUS_SUFFIX)
        if os.path.exists(previous):  # the latest pair is whole now: half the disk space
            os.remove(previous)
    return summary


def run(settings, *, verbose="auto"):
    """Checks, then trains (or resumes) the run described by `settings`; returns its summary.

    `settings` is what `run_config.settings_from_flags` returns: one key per flag.

    Raises:
      SetupError: a problem with the inputs, before anything is trained or written.
    """
    import keras
    # TF 2.21 makes only enable_op_determinism public; its config module also has the getter
    # and disable_op_determinism.
    from tensorflow.python.framework import config as tf_config

    # --mixed_precision sets the global dtype policy and --deterministic TensorFlow's global
    # op determinism: both are put back, so the next run in this process (compare, the demo,
    # a notebook) gets only its own settings.
    policy = keras.config.dtype_policy()
    deterministic = tf_config.is_op_determinism_enabled()
    try:
        prepared = prepare(settings)
        if prepared.state == "finished":
            import json

            print(f"{prepared.output_dir} already holds this finished run; nothing to do (use "
                  "a new --model_dir to train again).", flush=True)
            with open(os.path.join(prepared.output_dir, run_config.SUMMARY_FILE)) as f:
                return json.load(f)
        return fit(prepared, verbose=verbose)
    finally:
        keras.config.set_dtype_policy(policy)
        if not deterministic:
            tf_config.disable_op_determinism()


def main_for(binary):
    """The absl `main` of `binary`: run with the global flags, one-line errors on bad input."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        settings = run_config.settings_from_flags(flags.FLAGS, binary)
        from twins_tf.run_callbacks import DivergenceError

        try:
            run(settings)
        except (SetupError, DivergenceError) as error:
            sys.exit(f"{binary}: error: {error}")

    return main


def define_main_flags(binary):
    """Defines `binary`'s flags on the global FLAGS and makes them its key flags (`--help`)."""
    for name in run_config.define_flags(flags.FLAGS, binary):
        # absl names the main module after sys.argv[0]; key flags of it are what --help lists
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


if __name__ == "__main__":
    define_main_flags(BINARY)
    app.run(main_for(BINARY))
