"""The fine-tuning objectives of spec §5 as pure functions of logits and labels, and L2-SP's
regulariser.

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

`METHODS` is the registry the trainer reads: name -> `Method`, an object carrying its objective
and whether it needs a twin model, an attack, and which training forwards (adversarial,
natural) it runs, in that order.  `get(name)` looks one up (an unknown name is an error there,
so at the trainer's construction); `register(Method(...))` adds one.
"""

import dataclasses
from typing import Callable

import tensorflow as tf


def cross_entropy(logits, labels):
    """Softmax cross-entropy from logits, mean over the rows (float32)."""
    return tf.reduce_mean(cross_entropy_per_example(logits, labels))


def cross_entropy_per_example(logits, labels):
    """Softmax cross-entropy from logits, one value per row (float32)."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


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


def autolora(logits_natural, logits_adversarial, labels, *, lambda1, lambda2):
    """AutoLoRa (Xu et al., ICLR 2024): the natural branch's logits z_nat on x, the main
    branch's z_adv on x_adv,

        lambda1 * CE(z_nat, y) + (1 - lambda1) * CE(z_adv, y) + lambda2 * KL_sum(z_nat||z_adv)/B.

    Nothing is stopped here; which variables each term reaches is the trainer's (the natural
    branch's forward trains only the LoRA branch and the head, docs/autolora.md).
    """
    robust = kl_sum(logits_natural, logits_adversarial) / _batch_size(logits_natural)
    return (
        lambda1 * cross_entropy(logits_natural, labels)
        + (1.0 - lambda1) * cross_entropy(logits_adversarial, labels)
        + lambda2 * robust
    )


def autolora_lambdas(natural_accuracy, *, beta=6.0):
    """AutoLoRa's automated scalars from the natural branch's clean training accuracy a in
    [0, 1]: (lambda1, lambda2) = (1 - a, beta * a), beta = 6 in the paper."""
    a = float(natural_accuracy)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"natural_accuracy must be in [0, 1], got {a}.")
    return 1.0 - a, beta * a


def odd_batch_message(batch, *, replicas=None, layer=None):
    """The one text for a training batch a twin model cannot split into two equal halves.

    Every place that checks it (the trainer before and during `fit`, a TwinBatchNormalization
    layer while tracing) says the same why and the same fix.

    Args:
      batch: the batch size seen, or a phrase ("not a multiple of 2") when only the run time
        knows it.
      replicas: the trainer's view, a *global* batch spread over this many replicas; None:
        `batch` is one replica's batch.
      layer: the name of the TwinBatchNormalization layer that saw it.
    """
    if layer is not None:
        head, rule, seen = (
            f"TwinBatchNormalization layer '{layer}' got a training batch of size {batch}: ",
            "so the batch must be even",
            "",
        )
    elif replicas is None:
        head, rule, seen = "", "so it must be even", f"; got a per-replica batch of {batch}"
    else:
        head, rule, seen = (
            "",
            f"so the global batch must be a multiple of 2 x {replicas} replica(s)",
            f"; got batch {batch}",
        )
    return (
        f"{head}twin methods split each per-replica batch into a Frozen and an Adaptive half, "
        f"{rule}{seen}. Use an even per-replica batch size and drop_remainder=True in tf.data."
    )


def l2sp_penalty(pretrained, anchors, new, *, alpha, beta):
    """L2-SP's regulariser (Li et al., ICML 2018): the pull to the start plus the head's decay.

        Omega(w) = alpha / 2 * ||w_S - w_S^0||^2 + beta / 2 * ||w_new||^2

    w_S are the weights that have a pre-trained value w_S^0 (the starting point, "SP"); w_new
    are the new head's, which have none and decay towards zero as in ordinary fine-tuning.  The
    gradient is alpha * (w_S - w_S^0) on the pre-trained part and beta * w on the head: the
    factors are the authors' own (their TensorFlow code writes `alpha * tf.nn.l2_loss(w - w0)
    + beta * tf.nn.l2_loss(w_new)`, and `l2_loss` is half the sum of squares), so their
    values carry over.  Nothing else decays: ordinary weight decay on the
    pre-trained part would pull it towards zero against the pull towards w_S^0.

    Which weights count as pre-trained is the caller's choice; the trainer anchors every
    trainable variable outside the new head, BatchNormalization's gamma and beta included,
    because they are pre-trained values like the kernels (the authors' code has this as its
    "all parameters" variant, weight_decay_mode 101; its default, mode 1, regularises the
    kernels only, with alpha = 0.1 and beta = 0.01 in its train.sh).

    Args:
      pretrained: the current weights w_S.
      anchors: their pre-trained values w_S^0, same order and shapes.
      new: the new head's weights w_new.
      alpha: strength of the pull towards the pre-trained weights.
      beta: weight decay of the new head.
    """
    if len(pretrained) != len(anchors):
        raise ValueError(
            f"l2sp_penalty got {len(pretrained)} pre-trained variables but {len(anchors)} "
            "anchors: pass one anchor (pre-trained value) per pre-trained variable."
        )

    def sum_of_squares(tensors):
        total = tf.constant(0.0, tf.float32)
        for tensor in tensors:
            total += tf.reduce_sum(tf.square(tf.cast(tensor, tf.float32)))
        return total

    pull = sum_of_squares(
        tf.cast(w, tf.float32) - tf.cast(w0, tf.float32) for w, w0 in zip(pretrained, anchors)
    )
    return 0.5 * alpha * pull + 0.5 * beta * sum_of_squares(new)


def _clean_objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    del logits_adversarial, lambda_twins, beta
    return clean(logits_natural, labels)


def _at_objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    del logits_natural, lambda_twins, beta
    return at(logits_adversarial, labels)


def _trades_objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    del lambda_twins
    return trades(logits_natural, logits_adversarial, labels, beta=beta)


def _twins_at_objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    del logits_natural, beta
    return twins_at(logits_adversarial, labels, lambda_twins=lambda_twins)


def _twins_trades_objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
    return twins_trades(
        logits_natural, logits_adversarial, labels, lambda_twins=lambda_twins, beta=beta
    )


# The settings a method's own schedule (`Method.schedule`) sets.
SCHEDULE_SETTINGS = ("lr", "weight_decay", "lr_decay_epochs")
# AutoLoRa's published schedule (the authors' high-resolution code, src/argument.py and
# AutoLoRa_high_resolution.py; docs/autolora.md): SGD from eta = 0.01 with weight decay 1e-4,
# no step decay; the automated halving (twins_tf.autolora) is the only change of the rate.
AUTOLORA_SCHEDULE = (("lr", 0.01), ("weight_decay", 1e-4), ("lr_decay_epochs", ()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One fine-tuning method: its objective and what the trainer must run to feed it.

    A method carries its own loss (`objective`), so the trainer never looks at the name and a
    new method is one `register(Method(...))` away, with no table elsewhere to keep in step.
    Every field is a keyword: six booleans in a row are too easy to misorder.

    Attributes:
      name: the `method=` string.
      objective: `(logits_natural, logits_adversarial, labels, *, lambda_twins, beta) ->
        scalar`; a logits argument the method does not run (see `adversarial`, `natural`) is
        None.
      twin: needs a twin model (TwinBatchNormalization layers in "twin" mode); plain methods
        refuse one.
      adversarial: runs the attack and a training forward on x_adv.
      natural: runs a training forward on the clean x (after the adversarial one, so the
        Adaptive moving statistics see the adversarial batch first, as in the reference).
      l2sp: adds the L2-SP regulariser (`l2sp_penalty`) in place of weight decay.
      lora: AutoLoRa's two-branch step (a model with `twins_tf.lora` branches; the natural
        forward runs the branch and trains only it and the head, the adversarial forward the
        main path); its objective takes `(logits_natural, logits_adversarial, labels, *,
        lambda1, lambda2)`, the automated scalars, instead of lambda_twins and beta.
      schedule: the method's own published optimisation schedule, as (setting, value) pairs
        of `lr`, `weight_decay` and `lr_decay_epochs`, or None: the run's flags decide.
        Runs of such a method take these values for every one of those settings the user
        did not choose for it (`training.settings`), because a recipe tuned for another
        method (a flagfile's step decay, say) is not what the method's paper trained with.
      description: one line for help texts.
    """

    name: str
    objective: Callable
    twin: bool = False
    adversarial: bool = False
    natural: bool = False
    l2sp: bool = False
    lora: bool = False
    schedule: tuple = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a Method needs a non-empty string name, got {self.name!r}.")
        if not callable(self.objective):
            raise TypeError(
                f"method {self.name!r}: objective must be a callable (logits_natural, "
                f"logits_adversarial, labels, *, lambda_twins, beta), got {self.objective!r}."
            )
        if not (self.adversarial or self.natural):
            raise ValueError(
                f"method {self.name!r} runs no training forward: set adversarial=True, "
                "natural=True or both."
            )
        if self.schedule is not None:
            keys = [key for key, _ in self.schedule]
            if sorted(keys) != sorted(SCHEDULE_SETTINGS):
                raise ValueError(
                    f"method {self.name!r}: schedule must give each of "
                    f"{', '.join(SCHEDULE_SETTINGS)} once, got {', '.join(keys) or 'nothing'}."
                )

    def loss(self, logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
        """The objective (without L2-SP, which the trainer adds) from the forwards' logits."""
        return self.objective(
            logits_natural, logits_adversarial, labels, lambda_twins=lambda_twins, beta=beta
        )


METHODS = {}


def register(method):
    """Add `method` to `METHODS` (and so to `get`, the trainer and the binaries' choices).

    A name is registered once: a second method under the same name is an error rather than a
    silent replacement of the objective every caller of `get(name)` would then train with.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a twins_tf.methods.Method, got {type(method).__name__}.")
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


for _method in (
    Method(
        name="clean",
        objective=_clean_objective,
        natural=True,
        description="CE on clean images (no attack)",
    ),
    Method(
        name="at",
        objective=_at_objective,
        adversarial=True,
        description="adversarial training: CE on PGD images",
    ),
    Method(
        name="trades",
        objective=_trades_objective,
        adversarial=True,
        natural=True,
        description="TRADES: clean CE + beta * KL(clean||adv)/B",
    ),
    Method(
        name="l2sp",
        objective=_at_objective,
        adversarial=True,
        l2sp=True,
        description="AT + alpha/2 * ||w_S - w_S^0||^2 on the pre-trained weights "
        "+ beta/2 * ||w_new||^2 on the head (L2-SP)",
    ),
    Method(
        name="twins_at",
        objective=_twins_at_objective,
        twin=True,
        adversarial=True,
        description="TWINS-AT: lambda*CE_frozen + CE_adaptive",
    ),
    Method(
        name="twins_trades",
        objective=_twins_trades_objective,
        twin=True,
        adversarial=True,
        natural=True,
        description="TWINS-TRADES: per-wing clean CE + beta * per-wing KL / B",
    ),
    Method(
        name="autolora",
        objective=autolora,
        adversarial=True,
        natural=True,
        lora=True,
        schedule=AUTOLORA_SCHEDULE,
        description="AutoLoRa: l1*CE(LoRA branch, x) + (1-l1)*CE(main, x_adv) + "
        "l2*KL/B, l1/l2 and the lr automated (needs --lora_rank)",
    ),
):
    register(_method)
del _method


def get(name):
    """The `Method` called `name` (a `Method` passes through), or a ValueError listing the
    known ones."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}.")
    return METHODS[name]
