"""The learning-rate schedules of a run: `--lr` times 0.1 from each of `--lr_decay_epochs` on;
the `--init` probe's cosine decay."""


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


def cosine_schedule(lr, total_steps):
    """lr * (1 + cos(pi * k / total_steps)) / 2 at step k (0-based): the `--init` probe's decay
    from lr to 0 over its steps, stepped per iteration (RoLI steps its cosine per epoch and
    warms up first; see training.init_stage)."""
    import keras

    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=int(total_steps), alpha=0.0)
