"""AutoAttack over an evaluation's batches: resumable, with the accuracy after each sub-attack.

The attack itself (sub-attacks, target classes, budgets) is `twins_tf.attacks.AutoAttack`;
this module decides where its progress is kept and turns its result into the report's
`results.autoattack` entry, which records everything a rerun needs.
"""

import hashlib
import json
import os


def autoattack_state_path(settings):
    """Where a resumable AutoAttack run keeps its progress, or None (no model_dir or output).

    The name holds a hash of the weights file and of the examples evaluated, so a state is
    only ever resumed for the same model and data (AutoAttack itself checks its settings).
    """
    directory = settings.get("model_dir") or (
        os.path.dirname(os.path.abspath(settings["output"])) if settings.get("output") else None
    )
    if directory is None:
        return None
    digest = hashlib.sha1()
    with open(settings["weights"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(
        json.dumps(
            [
                settings["dataset"],
                settings["split"],
                settings["image_size"],
                settings.get("max_examples"),
            ]
        ).encode()
    )
    return os.path.join(directory, f"autoattack_{settings['split']}_{digest.hexdigest()[:12]}.npz")


def run_autoattack(model, batches, settings, *, progress=True):
    """AutoAttack over the batches, resumable; accuracy after each sub-attack.

    The AutoAttack object sees the evaluation batches in their fixed order; its progress is
    saved every 10 batches to `autoattack_state_path(settings)`, so an interrupted evaluation
    started again continues where it stopped.
    """
    import twins_tf
    from twins_tf.attacks import AutoAttack  # looked up at call time: tests lower its budget

    attack = AutoAttack(
        settings["attack_eps"],
        norm="linf",
        version=settings["autoattack_version"],
        seed=settings["seed"],
    )
    state_path = autoattack_state_path(settings)
    result = attack.run(
        model,
        batches,
        batch_size=settings["batch_size"],
        state_path=state_path,
        keep_adversarial=False,
        verbose=int(progress),
    )
    accuracy = result.accuracy
    config = attack.get_config()
    return {
        "accuracy": float(result.robust_accuracy),
        "clean_accuracy": float(accuracy["clean"]),
        "after_each_attack": {name: float(accuracy[name]) for name in result.attacks},
        "seconds_each_attack": {name: round(result.seconds[name], 2) for name in result.attacks},
        "skipped": dict(result.skipped),
        "examples": int(len(result.labels)),
        "version": settings["autoattack_version"],
        "twins_tf_version": twins_tf.__version__,
        "epsilon": attack.epsilon,
        "norm": attack.norm,
        "n_target_classes": result.n_target_classes,
        "seed": attack.seed,
        "budget": {
            key: config[key] for key in ("apgd_steps", "fab_steps", "square_queries", "eot_iter")
        },
        "batch_size": settings["batch_size"],
        "checks": list(result.warnings),
        "unconfirmed": int(result.unconfirmed),  # non-robust points the whole batch did not confirm
        "state": state_path,
    }
