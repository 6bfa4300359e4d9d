"""One evaluation end to end: resolve the settings, load data and model, run each attack at each
radius, report.

This is what `python -m twins_tf.evaluate` does after parsing its flags (`evaluate_radii`),
and what `compare` and library users call with a settings dict (`evaluate`, one radius).

Under a strategy, AutoAttack's batches are shared out over its replicas and workers
(`autoattack_run`, `shards`); clean and PGD accuracy are computed whole by every process
(they cost a fraction of AutoAttack, and the same computation in every process gives the
single-process numbers by construction).  Only the chief writes reports and the plot.
"""

import dataclasses
import time

from twins_tf import accuracy
from twins_tf.evaluation import autoattack_run, checks, inputs, report, shards
from twins_tf.training.settings import DTYPE_POLICIES, SetupError, attack_compute_dtype


@dataclasses.dataclass
class Evaluation:
    """What `evaluate_radii` did.

    Attributes:
      reports: one report dict per radius, in the order given.
      paths: where each report was written (None: no --output or --model_dir, or not the
        chief of a multi-worker job).
      plot: the accuracy-vs-radius PNG (several radii, written by the chief), else None.
    """

    reports: list
    paths: list
    plot: str = None


def evaluate(settings, *, log=print, progress=True, strategy=None):
    """Runs the requested attacks at one radius; returns the report dict (and writes it).

    The model is evaluated in float32 whatever the global dtype policy (a mixed-precision
    training run's policy would otherwise leak into the attack's gradients), or with
    `precision="bfloat16"` in the mixed_bfloat16 policy, PGD computing in it; the policy is
    restored afterwards. `progress` shows AutoAttack's progress bar.

    Raises:
      SetupError: a problem with the inputs (several radii: use `evaluate_radii`), found
        before any attack runs.
    """
    evaluation = evaluate_radii(
        settings, log=log, progress=progress, strategy=strategy, single=True
    )
    return evaluation.reports[0]


def evaluate_radii(settings, *, log=print, progress=True, strategy=None, single=False):
    """`evaluate` at each radius of `settings["attack_eps"]`: an `Evaluation`.

    Args:
      settings: {evaluate flag: value}; missing ones take their defaults.
      log, progress: as for `evaluate`.
      strategy: the `tf.distribute.Strategy` to shard AutoAttack over; None builds the one
        `settings["strategy"]` names (a multi-worker one must be built at program start,
        before other TensorFlow work: the binary does).
      single: refuse several radii (`evaluate` returns one report).
    """
    import keras

    s = inputs.resolve(settings)
    if single and len(s["radii"]) > 1:
        raise SetupError(
            f"evaluate takes one --attack_eps radius, got {len(s['radii'])}: call "
            "twins_tf.evaluation.evaluate_radii for several."
        )
    if strategy is None and s["strategy"] != "default":
        from twins_tf.training import distribute

        try:
            strategy = distribute.get_strategy(s["strategy"], tpu_address=s["tpu_address"])
        except (ValueError, RuntimeError) as error:
            raise SetupError(str(error)) from None
    layout = shards.layout_of(strategy)
    wants_autoattack = any(name == inputs.AUTOATTACK for name, _ in s["attack_list"])
    if layout.multi_worker and wants_autoattack and not autoattack_run.state_directory(s):
        raise SetupError(
            "AutoAttack under --strategy=multi_worker needs --model_dir or --output: the "
            "workers share their results through files beside the report."
        )
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(DTYPE_POLICIES[s["precision"]])  # before the model is built
    try:
        return _evaluate(s, layout, log, progress)
    finally:
        keras.config.set_dtype_policy(policy)


def _pgd_result(model, batches, s, steps):
    from twins_tf.attacks.pgd import PGD

    restarts = s["pgd_restarts"]
    pgd = PGD(
        s["attack_eps"],
        s["attack_step"],
        steps,
        norm=s["attack_norm"],
        random_start=restarts > 1,
        restarts=restarts,
        seed=s["seed"],
        compute_dtype=attack_compute_dtype(s["precision"]),
    )
    result = accuracy.evaluate_batched(model, batches, pgd)
    result.update(
        steps=steps,
        step_size=s["attack_step"],
        norm=s["attack_norm"],
        restarts=restarts,
        random_start=restarts > 1,
    )
    return result


def _evaluate(s, layout, log, progress):
    if s.get("unfinished"):  # --allow_unfinished
        log(f"warning: {s['unfinished']}; evaluating its weights as they are.")
    batches, count = inputs.load_examples(s)
    model = inputs.load_model(s)
    messages = checks.model_checks(model, batches, s, log)
    paths, plot = inputs.report_paths(s)
    if not layout.is_chief:  # only the chief writes
        paths, plot = [None] * len(paths), None
    several = len(s["radii"]) > 1
    clean, reports = None, []
    for radius, path in zip(s["radii"], paths):
        settings = dict(s, attack_eps=radius)
        results = {}
        for name, steps in s["attack_list"]:
            started = time.time()
            if name == inputs.CLEAN:  # the same at every radius: computed once
                if clean is None:
                    clean = accuracy.evaluate_batched(model, batches, None)
                    clean["seconds"] = round(time.time() - started, 2)
                results[name] = dict(clean)
            elif name == inputs.AUTOATTACK:
                results[name] = autoattack_run.run_autoattack(
                    model, batches, count, settings, layout=layout, progress=progress, log=log
                )
            else:
                results[name] = _pgd_result(model, batches, settings, steps)
            if name != inputs.CLEAN:
                results[name]["seconds"] = round(time.time() - started, 2)
            shown = inputs.radius_label(radius, s["attack_norm"]).replace("-", "/")
            at = f" at {shown}" if several else ""
            log(
                f"{name}{at}: {100 * results[name]['accuracy']:.2f}% of {results[name]['examples']}"
            )
        result = report.build_report(settings, count, messages, results)
        if s.get("unfinished"):
            result["unfinished"] = s["unfinished"]
        if path:  # as each radius finishes: a killed evaluation keeps the radii done
            report.write_report(path, result)
        reports.append(result)
    if plot:
        report.write_radius_plot(plot, reports)
    return Evaluation(reports, paths, plot)
