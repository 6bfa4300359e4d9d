"""The fine-tuning objectives of spec §5 as pure functions of logits and labels, and L2-SP.

Each objective is written once, here, with the exact reductions of the TWINS reference code,
because those reductions are easy to get subtly wrong and change the effective weighting:
  * a cross-entropy is the mean over the rows it is given (each TWINS half: over its half);
  * a TRADES KL term is summed over rows and classes and divided by the *full* batch B, also
    for the per-wing KL terms of TWINS-TRADES (B, not B/2);
  * nothing is stop-gradient'ed: the natural logits of the KL terms carry gradients too.
Keras's `KLDivergence` loss averages over the batch and takes probabilities rather than
logits, so it cannot give these reductions without the same amount of code.

The trainer (`twins_tf.trainer`) runs the forwards; this module only turns their logits into a
scalar.  Logits of a twin model's training forward hold the Frozen wing's rows first and the
Adaptive wing's rows second (spec §2); the halves here split at `B // 2` the same way.

`METHODS` is the table the trainer reads: for each method, whether it needs a twin model, an
attack, and which training forwards (adversarial, natural) it runs, in that order.
"""
import dataclasses

import tensorflow as tf


def cross_entropy(logits, labels):
    """Softmax cross-entropy from logits, mean over the rows (float32)."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


def kl_sum(logits_natural, logits_adversarial):
    """sum over rows and classes of softmax(z_nat) * (log softmax(z_nat) - log softmax(z_adv)).

    This is PyTorch's `KLDivLoss(reduction="sum")(log_softmax(z_adv), softmax(z_nat))`, the
    TRADES robust term before its division by the batch size.
    """
    log_p = tf.nn.log_softmax(tf.cast(logits_natural, tf.float32), axis=-1)
    log_q = tf.nn.log_softmax(tf.cast(logits_adversarial, tf.float32), axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q))


def _batch_size(logits):
    return tf.cast(tf.shape(logits)[0], tf.float32)


def _halves(tensor):
    """Rows [0, B/2) (Frozen wing) and [B/2, B) (Adaptive wing) of a twin training forward."""
    half = tf.shape(tensor)[0] // 2
    return tensor[:half], tensor[half:]


def clean(logits_natural, labels):
    """Standard fine-tuning: CE(f(x), y)."""
    return cross_entropy(logits_natural, labels)


def at(logits_adversarial, labels):
    """Adversarial training (Madry et al.): CE(f(x_adv), y) over the whole batch."""
    return cross_entropy(logits_adversarial, labels)


def trades(logits_natural, logits_adversarial, labels, *, beta):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL_sum(f(x) || f(x_adv)) / B."""
    robust = kl_sum(logits_natural, logits_adversarial) / _batch_size(logits_natural)
    return cross_entropy(logits_natural, labels) + beta * robust


def twins_at(logits_adversarial, labels, *, lambda_twins):
    """TWINS-AT: lambda * CE(Frozen half) + CE(Adaptive half), each CE a mean over its half."""
    frozen_logits, adaptive_logits = _halves(logits_adversarial)
    frozen_labels, adaptive_labels = _halves(tf.reshape(labels, [-1]))
    return lambda_twins * cross_entropy(frozen_logits, frozen_labels) + cross_entropy(
        adaptive_logits, adaptive_labels
    )


def twins_trades(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    """TWINS-TRADES: lambda*CE(z_nat_F) + CE(z_nat_A) + beta * (lambda*KL_F/B + KL_A/B).

    KL_w sums over wing w's rows and classes; B is the full batch (both halves).
    """
    batch = _batch_size(logits_natural)
    nat_frozen, nat_adaptive = _halves(logits_natural)
    adv_frozen, adv_adaptive = _halves(logits_adversarial)
    labels_frozen, labels_adaptive = _halves(tf.reshape(labels, [-1]))
    natural = lambda_twins * cross_entropy(nat_frozen, labels_frozen) + cross_entropy(
        nat_adaptive, labels_adaptive
    )
    robust = (
        lambda_twins * kl_sum(nat_frozen, adv_frozen) + kl_sum(nat_adaptive, adv_adaptive)
    ) / batch
    return natural + beta * robust


def l2sp_penalty(variables, anchors, alpha):
    """L2-SP (Li et al. 2018): alpha / 2 * sum_i ||theta_i - theta_pre_i||^2.

    Args:
      variables: the current weights theta (those that have a pre-trained value).
      anchors: their pre-trained values theta_pre, same order and shapes.
      alpha: strength of the pull towards the pre-trained weights.
    """
    if len(variables) != len(anchors):
        raise ValueError(
            f"l2sp_penalty got {len(variables)} variables but {len(anchors)} anchors."
        )
    total = tf.constant(0.0, tf.float32)
    for variable, anchor in zip(variables, anchors):
        diff = tf.cast(variable, tf.float32) - tf.cast(anchor, tf.float32)
        total += tf.reduce_sum(tf.square(diff))
    return 0.5 * alpha * total


@dataclasses.dataclass(frozen=True)
class Method:
    """How the trainer runs one objective.

    Attributes:
      name: the `method=` string.
      twin: needs a twin model (TwinBatchNormalization layers in "twin" mode); plain methods
        refuse one.
      adversarial: runs the attack and a training forward on x_adv.
      natural: runs a training forward on the clean x (after the adversarial one, so the
        Adaptive moving statistics see the adversarial batch first, as in the reference).
      l2sp: adds the L2-SP penalty.
      description: one line for help texts.
    """

    name: str
    twin: bool
    adversarial: bool
    natural: bool
    l2sp: bool
    description: str

    def loss(self, logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
        """The objective (without L2-SP, which the trainer adds) from the forwards' logits."""
        if self.name == "clean":
            return clean(logits_natural, labels)
        if self.name in ("at", "l2sp"):
            return at(logits_adversarial, labels)
        if self.name == "trades":
            return trades(logits_natural, logits_adversarial, labels, beta=beta)
        if self.name == "twins_at":
            return twins_at(logits_adversarial, labels, lambda_twins=lambda_twins)
        return twins_trades(
            logits_natural, logits_adversarial, labels, lambda_twins=lambda_twins, beta=beta
        )


METHODS = {
    m.name: m
    for m in (
        Method("clean", False, False, True, False, "CE on clean images (no attack)"),
        Method("at", False, True, False, False, "adversarial training: CE on PGD images"),
        Method("trades", False, True, True, False, "TRADES: clean CE + beta * KL(clean||adv)/B"),
        Method(
            "l2sp", False, True, False, True,
            "AT + alpha/2 * ||theta - theta_pre||^2 on the pre-trained weights (L2-SP)",
        ),
        Method("twins_at", True, True, False, False, "TWINS-AT: lambda*CE_frozen + CE_adaptive"),
        Method(
            "twins_trades", True, True, True, False,
            "TWINS-TRADES: per-wing clean CE + beta * per-wing KL / B",
        ),
    )
}


def get(name):
    """The `Method` called `name`, or a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}.")
    return METHODS[name]
