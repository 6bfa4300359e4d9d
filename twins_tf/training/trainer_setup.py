"""`make_trainer` and `pipelines`: the compiled `AdversarialTrainer` and the data of a run."""

from twins_tf.training import init_stage
from twins_tf.training.schedule import cosine_schedule, learning_rate_schedule
from twins_tf.training.settings import as_settings


def make_trainer(model, settings, steps_per_epoch):
    """The `AdversarialTrainer` of a run, compiled with SGD(momentum 0.9) and the schedule.

    Training PGD (in `--attack_norm`) starts at a random point in the eps-ball; validation PGD
    starts at the clean image (spec §7: no random start at evaluation).  The training PGD
    computes in `--precision`'s dtype (`Settings.attack_compute_dtype`), validation PGD in
    float32 always, so val_adv_acc and the best epoch are measured alike under every
    precision.  The init stage of `--init` (`settings.stage == "init"`) trains only the head:
    the rest of `model` is frozen here (`init_stage.freeze_backbone`), and its schedule is the
    cosine decay over its steps.
    """
    import keras

    from twins_tf import methods as methods_lib
    from twins_tf.attacks.pgd import PGD
    from twins_tf.trainer import AdversarialTrainer

    s = as_settings(settings)
    method = methods_lib.get(s.method)
    if s.stage == "init":
        init_stage.freeze_backbone(model)
        schedule = cosine_schedule(s.lr, s.epochs * steps_per_epoch)
    else:
        schedule = learning_rate_schedule(s.lr, s.lr_decay_epochs, steps_per_epoch)
    pgd = dict(
        epsilon=s.attack_eps,
        step_size=s.attack_step,
        steps=s.attack_steps,
        norm=s.attack_norm,
        seed=s.seed,
    )
    trainer = AdversarialTrainer(
        model,
        method=s.method,
        attack=(
            PGD(**pgd, random_start=True, compute_dtype=s.attack_compute_dtype)
            if method.adversarial
            else None
        ),
        eval_attack=PGD(**pgd, random_start=False),
        lambda_twins=s.lambda_twins,
        beta=s.beta,
        weight_decay=s.weight_decay,
        l2sp_alpha=s.l2sp_alpha,
    )
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    trainer.compile(optimizer=optimizer, jit_compile=s.keras_jit_compile)
    return trainer


def pipelines(settings, spec, splits, start_epoch):
    """(training stream from `start_epoch`, validation batches or None) of a run.

    Args:
      settings: the run's `Settings` (or its dict).
      spec: its `data.DatasetSpec`; splits: its `data.load_splits` result.
      start_epoch: the first epoch to train (a resumed run's): data order and augmentation
        are functions of (seed, epoch), so a resumed run sees what an uninterrupted one would.
    """
    from twins_tf import data as data_lib

    s = as_settings(settings)
    # --max_*: class-stratified subsets (seeded by the split seed), not the first N examples.
    train = data_lib.stratified_subset(splits.source("train"), s.max_train_examples)
    train_ds = data_lib.make_pipeline(
        train, spec, training=True, batch_size=s.batch_size, seed=s.seed, start_epoch=start_epoch
    )
    if splits.validation is None:  # --validation=none
        return train_ds, None
    validation = data_lib.stratified_subset(splits.source("validation"), s.max_validation_examples)
    validation_ds = data_lib.make_pipeline(
        validation, spec, training=False, batch_size=s.batch_size
    )
    return train_ds, validation_ds
