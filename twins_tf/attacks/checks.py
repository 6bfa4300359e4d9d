"""Sanity checks before a robustness evaluation: is AutoAttack's number going to mean anything?

AutoAttack's guarantees assume a deterministic classifier that returns logits and whose input
gradients carry information.  The official implementation (fra31/auto-attack, `checks.py`)
warns when a model looks otherwise; these are the same checks, written for Keras models:

  * `check_randomized`: outputs (or the number of correct predictions) differ between calls
    on the same images: a randomised defence, for which only version="rand" (gradients
    averaged over 20 draws, EOT) is a meaningful attack;
  * `check_rand_version`: the converse: version="rand" on a deterministic model spends 20
    forward-backward passes per step for nothing (and fewer than the reference's 20 EOT draws
    on a randomised one weakens the attack);
  * `check_logits`: rows in [0, 1] summing to 1 are probabilities, not logits: the
    cross-entropy of APGD-CE then saturates and the DLR loss is ill-scaled;
  * `check_zero_gradients` / `zero_gradient_message`: examples whose DLR-loss gradient w.r.t.
    the input is exactly zero give the gradient attacks nothing to follow (gradient masking,
    e.g. a rounding or `stop_gradient` inside the model).  As in the official code, the loss is
    DLR, not the cross-entropy (whose float32 gradient is legitimately zero on a confidently
    classified example: a saturated softmax, which APGD-T's DLR loss is there to overcome), and
    in an AutoAttack evaluation the check runs inside APGD-T (APGD-DLR for "rand") at every
    run's start point on every batch, not once on the first batch; `check_zero_gradients`
    is the one-batch form for evaluations without AutoAttack;
  * `check_dynamic`: a model whose inference forward computes gradients or writes variables
    adapts at test time, which a fixed-model attack such as AutoAttack does not model;
  * `check_n_classes`: the targeted attacks need enough classes (APGD-T's targeted DLR loss
    needs 4, a target must be another class), so a small dataset gets fewer targets or skips
    APGD-T, and the report says which;
  * `check_square` (after a run): Square, a black-box attack, breaking points that every
    gradient attack before it missed hints at gradient masking.

Each check returns its message, or None, so a caller can both warn and record it; `warn`
issues them as `EvaluationWarning`s.  The thresholds are the official ones (1e-4 between the
normalised outputs of 5 calls, 1e-5 for probabilities, 0.2 points for Square).
"""

import warnings

import numpy as np
import tensorflow as tf

from twins_tf.attacks import _lp, apgd

RANDOMIZED_CALLS = 5
RANDOMIZED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
SQUARE_TOLERANCE = 0.002
REFERENCE_EOT_ITER = 20
# APGD-T's targeted DLR loss divides by z_pi1 - (z_pi3 + z_pi4) / 2: four logits.
TARGETED_DLR_MIN_CLASSES = 4
DLR_MIN_CLASSES = 3  # the untargeted DLR loss needs z_pi3
# Op types an inference forward has no business running: variable writes, gradients.
_DYNAMIC_OP_TYPES = (
    "AssignVariableOp",
    "AssignAddVariableOp",
    "AssignSubVariableOp",
    "ResourceScatterUpdate",
    "ResourceApplyGradientDescent",
)


class EvaluationWarning(UserWarning):
    """A robustness evaluation may not mean what it seems (see `twins_tf.attacks.checks`)."""


def check_randomized(model, x, y, *, calls=RANDOMIZED_CALLS, tolerance=RANDOMIZED_TOLERANCE):
    """A message if `calls` forwards on the same images disagree; None if they agree.

    Outputs are compared after dividing each row by its L2 norm, so the tolerance does not
    depend on the logits' scale; a change in how many images are classified correctly counts
    too.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = np.asarray(y).reshape(-1)
    outputs, correct = [], []
    for _ in range(calls):
        logits = _lp.logits_of(model, x).numpy().astype(np.float64)
        outputs.append(logits / (np.linalg.norm(logits, axis=1, keepdims=True) + 1e-10))
        correct.append(int(np.sum(logits.argmax(1) == y)))
    spread = max(
        float(np.max(np.linalg.norm(a - b, axis=1)))
        for i, a in enumerate(outputs)
        for b in outputs[i + 1 :]
    )
    if spread > tolerance or len(set(correct)) > 1:
        return (
            f"the model's outputs differ between {calls} calls on the same images "
            f"(normalised difference up to {spread:.3g}, correct predictions "
            f"{sorted(set(correct))}): a randomised defence? AutoAttack's standard version "
            "assumes a deterministic model; use version='rand' (EOT over 20 draws)."
        )
    return None


def check_rand_version(randomized, eot_iter):
    """For version="rand": a message if the model is deterministic or EOT is under 20 draws."""
    if not randomized:
        return (
            "version='rand' on a deterministic model (the same outputs on every call): its "
            f"{eot_iter}-draw EOT only repeats the same gradient; use version='standard', "
            "the stronger evaluation of a deterministic model."
        )
    if eot_iter < REFERENCE_EOT_ITER:
        return (
            f"version='rand' with eot_iter={eot_iter}: the reference averages "
            f"{REFERENCE_EOT_ITER} gradients per step on a randomised model; fewer make the "
            "attack weaker and the robust accuracy optimistic."
        )
    return None


def check_logits(model, x, *, tolerance=PROBABILITY_TOLERANCE):
    """A message if the model's rows look like probabilities (in [0, 1], summing to 1)."""
    output = _lp.logits_of(model, x).numpy()
    if (
        output.max() < 1 + tolerance
        and output.min() > -tolerance
        and np.all(np.abs(output.sum(-1) - 1) < tolerance)
    ):
        return (
            "the model's outputs are in [0, 1] and every row sums to 1: probabilities, "
            "not logits? AutoAttack's losses need logits; remove the final softmax."
        )
    return None


def zero_gradient_message(zero, examples, where="examples"):
    """The zero-gradient warning for `zero` of `examples` examples, or None if `zero` is 0."""
    if zero:
        return (
            f"{zero} of {examples} {where} have a zero input gradient (a rounding or "
            "stop_gradient in the model?): the gradient attacks cannot move them, so their "
            "robustness may be overestimated."
        )
    return None


def check_zero_gradients(model, x, y):
    """A message if some examples' DLR-loss gradient w.r.t. the input is exactly zero.

    The official check's loss (the untargeted DLR of `apgd.dlr_loss`), taken at the class the
    model predicts, as an attack sees it on the correctly classified examples it runs on (with
    a label that happens to rank third the DLR loss is the constant 1, a zero gradient that
    is no defect of the model).  A model with 2 classes has no DLR loss, and the
    cross-entropy at the labels `y` stands in.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = _lp.logits_of(model, x)
        if logits.shape[-1] >= DLR_MIN_CLASSES:
            loss = apgd.dlr_loss(logits, tf.argmax(logits, -1, output_type=tf.int32))
        else:
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    gradient = tape.gradient(loss, x)
    if gradient is None:
        zero = int(x.shape[0])
    else:
        zero = int(
            tf.reduce_sum(
                tf.cast(
                    tf.reduce_all(tf.equal(tf.reshape(gradient, [x.shape[0], -1]), 0.0), axis=1),
                    tf.int32,
                )
            )
        )
    return zero_gradient_message(zero, int(x.shape[0]))


def check_dynamic(model, x):
    """A message if the model's inference forward writes variables or computes gradients.

    The forward is traced once as a graph and its operations inspected, so nothing runs.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    forward = tf.function(lambda images: model(images, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph
    operations = _operations(graph)
    found = sorted(
        {f"variable writes ({op.type})" for op in operations if op.type in _DYNAMIC_OP_TYPES}
    )
    if any(
        op.name.startswith("gradient_tape") or "/gradient_tape/" in op.name for op in operations
    ):
        found.append("gradient computation")
    if found:
        return (
            f"the model's inference forward runs {' and '.join(found)}: a dynamic defence "
            "that adapts or optimises at test time? AutoAttack attacks a fixed model, so "
            "its number may not bound this one's robustness; use an adaptive attack too."
        )
    return None


def _operations(graph):
    """The graph's operations, those of the functions it calls included (Keras layers)."""
    seen, stack, result = set(), [graph], []
    while stack:
        g = stack.pop()
        result.extend(g.get_operations())
        for function in getattr(g, "_functions", {}).values():
            inner = getattr(function, "graph", None)
            if inner is not None and id(inner) not in seen:
                seen.add(id(inner))
                stack.append(inner)
    return result


def check_n_classes(num_classes, version, n_target_classes, skipped):
    """A message naming the targets used and the sub-attacks skipped for a small dataset.

    Args:
      num_classes: the model's outputs.
      version: "standard" or "rand".
      n_target_classes: the targets APGD-T and FAB-T run with (after capping).
      skipped: {sub-attack: why} of the plan.
    """
    parts = []
    if version == "standard" and n_target_classes < 9:
        parts.append(
            f"APGD-T and FAB-T use {n_target_classes} target class(es), not the "
            f"reference's 9 (the model has {num_classes} classes)"
        )
    parts += [f"{name} is skipped: {why}" for name, why in skipped.items()]
    if parts:
        return "; ".join(parts) + ". Report the numbers with these settings."
    return None


def check_square(accuracy, *, tolerance=SQUARE_TOLERANCE):
    """After a cascade: a message if Square lowered the robust accuracy by > 0.2 points.

    Args:
      accuracy: {"clean": ..., "<sub-attack>": robust accuracy after it, ...} in run order.
    """
    if "square" not in accuracy or len(accuracy) <= 2:
        return None
    before = min(value for name, value in accuracy.items() if name != "square")
    if accuracy["square"] < before - tolerance:
        return (
            f"Square, a black-box attack, lowered the robust accuracy by "
            f"{100 * (before - accuracy['square']):.2f} points after every gradient attack: "
            "a sign of gradient masking; the evaluation may be unreliable, so try Square "
            "with more queries and restarts, or an adaptive attack."
        )
    return None


def model_checks(
    model, x, y, *, randomized_defence=False, eot_iter=REFERENCE_EOT_ITER, zero_gradients=True
):
    """The checks of the model itself, on one batch; returns the messages.

    Args:
      model: the Keras classifier.
      x, y: a batch of clean images and labels (the first batch of the evaluation).
      randomized_defence: the evaluation treats the model as randomised (AutoAttack's
        "rand"): then a deterministic model, not a randomised one, is the warning.
      eot_iter: the EOT draws of such an evaluation.
      zero_gradients: run `check_zero_gradients` on this batch (False when the evaluation's
        APGD-DLR/APGD-T checks every batch itself).
    """
    randomized = check_randomized(model, x, y)
    if randomized_defence:
        randomized = check_rand_version(randomized is not None, eot_iter)
    messages = [
        randomized,
        check_logits(model, x),
        check_zero_gradients(model, x, y) if zero_gradients else None,
        check_dynamic(model, x),
    ]
    return [m for m in messages if m is not None]


def before_evaluation(
    model, x, y, *, version, eot_iter, num_classes, n_target_classes, skipped, dlr_attack=None
):
    """Every check that runs before an AutoAttack evaluation, on one batch; the messages.

    Args:
      model, x, y: as for `model_checks`.
      version, eot_iter: AutoAttack's version and EOT draws.
      num_classes, n_target_classes, skipped: as for `check_n_classes`.
      dlr_attack: the planned sub-attack with the DLR loss ("apgd-t", "apgd-dlr"), which checks
        zero gradients on every batch itself; None (none planned): checked here, once.
    """
    messages = model_checks(
        model,
        x,
        y,
        randomized_defence=version == "rand",
        eot_iter=eot_iter,
        zero_gradients=dlr_attack is None,
    )
    targets = check_n_classes(num_classes, version, n_target_classes, skipped)
    return messages + ([targets] if targets else [])


def warn(messages, who="AutoAttack"):
    """Issues each message as an `EvaluationWarning`."""
    for message in messages:
        warnings.warn(f"{who}: {message}", EvaluationWarning, stacklevel=3)
