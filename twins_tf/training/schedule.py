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


def run_schedule(settings, metrics):
    """The optimisation schedule a run ran: what summary.json and compare's table show.

    Args:
      settings: the run's `Settings` or settings dict (its config.json).
      metrics: its metrics.csv rows (`run_callbacks.read_metrics`), in epoch order.

    Returns:
      {"lr": the initial rate, "weight_decay", "lr_decay_epochs": [...] (x0.1 from each),
       "cosine": the `--init` probe's cosine decay to 0 instead (its sub-run),
       "published": the method's own schedule (`methods.Method.schedule`) as a dict, or None,
       "as_published": whether the run's three values are that schedule (None without one),
       "automated": None, or for AutoLoRa's automated rate {"rule", "halved_after_epochs"
       (1-based epochs after which the rate was halved and the best weights restored),
       "final_lr_scale", "trained_epochs", "stopped_early" (the lr floor ended it)}}.
    """
    from twins_tf import methods as methods_lib

    values = settings if isinstance(settings, dict) else settings.to_dict()
    method = methods_lib.get(values["method"])
    cosine = values.get("stage") == "init"  # training.trainer_setup.make_trainer
    out = {
        "lr": float(values["lr"]),
        "weight_decay": float(values["weight_decay"]),
        "lr_decay_epochs": [] if cosine else [int(e) for e in values.get("lr_decay_epochs") or ()],
        "cosine": cosine,
        "published": None,
        "as_published": None,
        "automated": None,
    }
    if method.schedule is not None:
        published = {k: (list(v) if isinstance(v, tuple) else v) for k, v in method.schedule}
        out["published"] = published
        out["as_published"] = all(out[k] == published[k] for k in published)
    if method.lora:
        from twins_tf import autolora

        halved, scale = [], 1.0  # the multiplier after each epoch's check, from 1
        for row in metrics:
            value = row.get("autolora_lr_scale")
            if isinstance(value, float):
                if value < scale:
                    halved.append(int(row["epoch"]))
                scale = value
        trained = int(metrics[-1]["epoch"]) if metrics else 0
        out["automated"] = {
            "rule": autolora.SCHEDULE_RULE,
            "halved_after_epochs": halved,
            "final_lr_scale": scale,
            "trained_epochs": trained,
            "stopped_early": bool(metrics) and trained < int(values["epochs"]),
        }
    return out


def format_schedule(schedule):
    """A `run_schedule`'s fixed part in one line, e.g. "lr 0.01, weight decay 0.0001, no step
    decay (the method's published schedule)"."""
    decay = schedule["lr_decay_epochs"]
    if schedule.get("cosine"):
        shape = "cosine decay to 0"
    else:
        shape = f"x0.1 at epochs {', '.join(map(str, decay))}" if decay else "no step decay"
    text = f"lr {schedule['lr']:g}, weight decay {schedule['weight_decay']:g}, {shape}"
    if schedule["as_published"] is not None:
        text += (
            " (the method's published schedule)"
            if schedule["as_published"]
            else " (chosen for the run: not the method's published schedule)"
        )
    return text
