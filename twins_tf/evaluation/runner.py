"""One evaluation end to end: resolve the settings, load data and model, run each attack, report.

This is what `python -m twins_tf.evaluate` does after parsing its flags, and what `compare`
and library users call with a settings dict (one key per evaluate flag).
"""

import time

from twins_tf import accuracy
from twins_tf.evaluation import autoattack_run, checks, inputs, report


def evaluate(settings, *, log=print, progress=True):
    """Runs the requested attacks; returns the report dict (and writes it to `output`).

    The model is evaluated in float32 whatever the global dtype policy (a mixed-precision
    training run's policy would otherwise leak into the attack's gradients); the policy is
    restored afterwards. `progress` shows AutoAttack's progress bar.

    Raises:
      SetupError: a problem with the inputs, found before any attack runs.
    """
    import keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return _evaluate(inputs.resolve(settings), log, progress)
    finally:
        keras.config.set_dtype_policy(policy)


def _pgd_result(model, batches, s, steps):
    from twins_tf.attacks.pgd import PGD

    restarts = s["pgd_restarts"]
    pgd = PGD(
        s["attack_eps"],
        s["attack_step"],
        steps,
        random_start=restarts > 1,
        restarts=restarts,
        seed=s["seed"],
    )
    result = accuracy.evaluate_batched(model, batches, pgd)
    result.update(
        steps=steps, step_size=s["attack_step"], restarts=restarts, random_start=restarts > 1
    )
    return result


def _evaluate(s, log, progress):
    if s.get("unfinished"):  # --allow_unfinished
        log(f"warning: {s['unfinished']}; evaluating its weights as they are.")
    batches, count = inputs.load_examples(s)
    model = inputs.load_model(s)
    messages = checks.model_checks(model, batches, s, log)
    results = {}
    for name, steps in s["attack_list"]:
        started = time.time()
        if name == inputs.CLEAN:
            results[name] = accuracy.evaluate_batched(model, batches, None)
        elif name == inputs.AUTOATTACK:
            results[name] = autoattack_run.run_autoattack(model, batches, s, progress=progress)
        else:
            results[name] = _pgd_result(model, batches, s, steps)
        results[name]["seconds"] = round(time.time() - started, 2)
        log(f"{name}: {100 * results[name]['accuracy']:.2f}% of {results[name]['examples']}")
    result = report.build_report(s, count, messages, results)
    if s.get("unfinished"):
        result["unfinished"] = s["unfinished"]
    if s.get("output"):
        report.write_report(s["output"], result)
    return result
