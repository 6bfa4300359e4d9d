"""AdversarialTrainer: the train/test steps of TWINS-AT, TWINS-TRADES, AT, TRADES, L2-SP, clean.

A `keras.Model` wrapping the classifier, so the whole Keras training machinery (`fit`,
callbacks, `BackupAndRestore`, `jit_compile`, `tf.distribute`, mixed precision) applies
unchanged; only `train_step` / `test_step` are ours, because no Keras loss can express an
objective that needs an attack on the model *inside* the step and two forward modes.

One training step (spec §4-6):
  1. PGD against the model in inference mode (Adaptive wing, moving statistics), outside the
     gradient tape, its result `stop_gradient`-ed;
  2. the training forward(s) the method needs (adversarial first, then natural), each a
     single pass through the network: a twin model splits every batch inside its BN layers;
  3. the method's loss (`twins_tf.methods`), plus for `method="l2sp"` L2-SP's regulariser
     alpha/2 ||w_S - w_S^0||^2 + wd/2 ||w_new||^2 (`methods.l2sp_penalty`);
  4. coupled L2 weight decay (not for "l2sp", whose regulariser already decays the head and
     must not pull the pre-trained part towards zero): `wd * w` added to the gradient of every
     trainable variable (both wings' gamma/beta included), then `optimizer.apply_gradients`.
     With Keras `SGD(lr, momentum=0.9)` this is PyTorch's
     `SGD(lr, momentum=0.9, weight_decay=wd)`.
AutoLoRa's step (`method="autolora"`) routes the gradients of its two forwards apart
(`twins_tf.autolora`, which also holds its loss weights and learning-rate windows).  What the
trainer is given is checked in `checks.py`; its Keras config is `serialisation.py`'s.

Metrics: one meaning per name, the same for every method, so that runs of different methods
can be plotted on one axis (`METRICS`).  Accuracies and cross-entropies are of the network
that is evaluated and exported (a twin model's Adaptive wing, AutoLoRa's main path) in
inference mode, the same forward `evaluate` runs; only `loss` and the wings' metrics come from
the training forwards, and say so.  Keras prefixes the validation ones with `val_`.

Its length is the Keras model's own surface (the steps, the fit/evaluate entry points and
the AutoLoRa methods callers use); everything that is not the model lives beside it.
"""

import keras
import tensorflow as tf

from twins_tf import autolora
from twins_tf import lora as lora_lib
from twins_tf import methods as methods_lib
from twins_tf.attacks.pgd import PGD
from twins_tf.trainer import checks, l2sp, serialisation

# The metrics' names and meanings.  `fit` logs them all (running means over the epoch's
# batches); `evaluate` and validation (`val_` + name) all but `loss` and the wings'.
METRICS = {
    "loss": "the method's objective on the training batch (what the step minimises; for "
    "l2sp with its regulariser): not comparable across methods",
    "clean_loss": "cross-entropy on the clean batch, inference mode",
    "clean_acc": "accuracy on the clean batch, inference mode",
    "adv_loss": "cross-entropy on the attack's adversarial batch, inference mode (training: "
    "the training attack's x_adv, before the step's update; evaluation: eval_attack's)",
    "adv_acc": "accuracy on that adversarial batch, inference mode",
    "frozen_adv_acc": "twin methods, training only: accuracy of the training forward's Frozen "
    "half (the batch's first half, on the Frozen wing) on x_adv",
    "adaptive_adv_acc": "twin methods, training only: the same for the Adaptive half",
}


@keras.saving.register_keras_serializable(package="twins_tf")
class AdversarialTrainer(keras.Model):
    """Adversarial fine-tuning of a classifier with one of `twins_tf.methods.METHODS`.

    Args:
      model: a built Keras classifier mapping [0, 1] images to logits (num_classes wide).
        Twin methods need `TwinBatchNormalization` layers in "twin" mode (`twins_tf.twinify`
        or `build_resnet(..., twin=True)`); plain methods refuse such a model (use
        `twins_tf.untwin`, or `set_twin_mode(model, "adaptive")` for plain BN with PyTorch's
        numerics).
      method: "clean", "at", "trades", "l2sp", "twins_at" or "twins_trades" (spec §5).
      attack: the training attack, e.g. `PGD(8/255, 2/255, 10, random_start=True)`; any
        callable `(model, x, y) -> x_adv` works.  Not needed for "clean".
      eval_attack: the attack of `test_step`.  "auto" (default): for a PGD training attack,
        the same PGD without random start and with one restart (spec §7); otherwise the
        training attack.  None: `test_step` reports clean metrics only.
      lambda_twins: weight of the Frozen wing's terms (TWINS methods).
      beta: weight of the TRADES KL term.
      weight_decay: coupled L2 weight decay on every trainable variable; for "l2sp" L2-SP's
        beta, the decay of the new head only (gradient wd * w there, none elsewhere).
      l2sp_alpha: L2-SP's alpha, the pull to the pre-trained weights ("l2sp" only): gradient
        alpha * (w - w_pre) on every trainable variable outside the head, BN gamma/beta
        included.
      l2sp_exclude: names of layers whose weights have no pre-trained value (the new head,
        decayed towards zero by `weight_decay`).  "auto": the layer producing the output.
      check_inputs: check images, labels and batch sizes in `fit`/`evaluate` (`checks.py`).
      method may also be a `twins_tf.methods.Method`; to save the trainer it must be the one
        registered under its name (`twins_tf.methods.register`).

    Metrics (`METRICS`), the same for every method: `fit` reports `loss`, the method's
    objective, and of the evaluated network in inference mode on the training batch, before
    the step's update, `clean_loss` / `clean_acc` and (methods with an attack) `adv_loss` /
    `adv_acc` on the training attack's x_adv; twin methods add `frozen_adv_acc` /
    `adaptive_adv_acc`, each wing's half of the training forward on x_adv.  `evaluate` (and
    validation, `val_...`) reports `clean_loss`, `clean_acc`, `adv_loss` and `adv_acc`,
    the same quantities on its data under `eval_attack`.  The inference forward costs one
    pass over 2B images per step, about 2/(3k + 5) of an AT step with PGD-k.

    Attributes:
      model: the wrapped classifier (save its weights with `trainer.model.save_weights`).
      method: the `twins_tf.methods.Method` in use.

    Example:
      >>> model = twins_tf.models.build_resnet("resnet18", 10, input_shape=(32, 32, 3))
      >>> trainer = AdversarialTrainer(model, method="twins_at",
      ...                              attack=PGD(8 / 255, 2 / 255, 10, random_start=True))
      >>> trainer.compile(keras.optimizers.SGD(0.003, momentum=0.9), jit_compile=True)
      >>> trainer.fit(train_ds, validation_data=val_ds, epochs=60)
    """

    def __init__(
        self,
        model,
        *,
        method,
        attack=None,
        eval_attack="auto",
        lambda_twins=1.0,
        beta=6.0,
        weight_decay=0.0,
        l2sp_alpha=0.01,
        l2sp_exclude="auto",
        check_inputs=True,
        name="adversarial_trainer",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.method = methods_lib.get(method)
        if eval_attack == "auto":
            eval_attack = _default_eval_attack(attack)
        checks.check_arguments(
            model,
            self.method,
            {"attack": attack, "eval_attack": eval_attack},
            lambda_twins=lambda_twins,
            beta=beta,
            weight_decay=weight_decay,
            l2sp_alpha=l2sp_alpha,
        )
        self.model = model
        self.num_classes = int(model.output_shape[-1])
        self.attack = attack
        self.eval_attack = eval_attack
        self.lambda_twins = float(lambda_twins)
        self.beta = float(beta)
        self.weight_decay = float(weight_decay)
        self.l2sp_alpha = float(l2sp_alpha)
        self.l2sp_exclude = l2sp_exclude if l2sp_exclude == "auto" else list(l2sp_exclude or ())
        self.check_inputs = bool(check_inputs)

        self.loss_metric = keras.metrics.Mean(name="loss")
        self.clean_loss = keras.metrics.Mean(name="clean_loss")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adversarial_loss = keras.metrics.Mean(name="adv_loss")
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")
        self.frozen_accuracy = keras.metrics.SparseCategoricalAccuracy(name="frozen_adv_acc")
        self.adaptive_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adaptive_adv_acc")
        # Seeds a random-start eval attack; one counter for all replicas.
        self._eval_batches = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="eval_batches",
        )
        # The order of the trainer's own weights (these, then AutoLoRa's) is their order in
        # a saved file: keep it.
        self._l2sp_variables, self._l2sp_anchors, self._l2sp_new = [], [], []
        if self.method.l2sp:
            l2sp.add_state(self, model, l2sp_exclude)
            self.snapshot_pretrained()
        if self.method.lora:
            autolora.add_state(self, model)
        self.built = True

    # --- public helpers ----------------------------------------------------------------
    def snapshot_pretrained(self):
        """Take the current weights as L2-SP's theta_pre (done at construction; call again
        after loading the pre-trained weights into `model` later)."""
        for anchor, variable in zip(self._l2sp_anchors, self._l2sp_variables):
            anchor.assign(variable)

    def call(self, inputs, training=False):
        if training:
            return self.model(inputs, training=True)
        images = tf.convert_to_tensor(inputs)
        empty = tf.zeros([0, self.model.output_shape[-1]], self.model.outputs[0].dtype)
        return _unless_empty(lambda: self.model(images, training=False), images, empty)

    @property
    def metrics(self):
        return [
            self.loss_metric,
            self.clean_loss,
            self.clean_accuracy,
            self.adversarial_loss,
            self.adversarial_accuracy,
            self.frozen_accuracy,
            self.adaptive_accuracy,
        ]

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile` without `loss`/`metrics`: the method defines both."""
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"AdversarialTrainer.compile() takes no {key}=: the loss and metrics come "
                    f"from method={self.method.name!r}. Pass only the optimizer and options "
                    "such as jit_compile."
                )
        super().compile(optimizer=optimizer, **kwargs)
        # The optimizer's variables exist from here on, as Keras creates them when it builds a
        # model for fit: a trainer saved before training then holds the same optimizer
        # variables as a loaded one, and its state always loads.
        with self.distribute_strategy.scope():
            self.optimizer.build(self.trainable_variables)

    # --- AutoLoRa (twins_tf.autolora) ---------------------------------------------------
    def natural_branch_accuracy(self, dataset, steps=None):
        """Clean accuracy of the LoRA (natural) path in inference mode over `dataset`'s
        (images, labels) batches (at most `steps`): AutoLoRa's lambda input."""
        return autolora.natural_branch_accuracy(self, dataset, steps)

    def update_autolora_lambdas(self, dataset, steps=None):
        """Sets lambda1, lambda2 from the natural path's accuracy on `dataset`; returns it."""
        return autolora.update_lambdas(self, dataset, steps)

    def autolora_epoch_end(self, epoch, val_adv_acc):
        """AutoLoRa's learning-rate scheme after (0-based) `epoch` with validation robust
        accuracy `val_adv_acc`: keeps the best weights, halves the lr (restoring them) when a
        window check fails (`autolora.autolora_schedule`).  Returns the scheme's actions."""
        return autolora.epoch_end(self, epoch, val_adv_acc)

    # --- serialisation (twins_tf.trainer.serialisation) -----------------------------------
    def get_config(self):
        """The constructor arguments, the wrapped model and the attacks as Keras configs."""
        return serialisation.trainer_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The trainer of `get_config`; its weights and optimizer state come from the file."""
        model, arguments = serialisation.constructor_arguments(config, custom_objects)
        return cls(model, **arguments)

    def compile_from_config(self, config):
        """Recompile a loaded trainer as it was saved (Keras's default skips a model whose
        `compile` is overridden); `compile` creates the optimizer's variables, so the saved
        optimizer state (SGD momentum, the step counter seeding the attacks) loads into them."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**{k: v for k, v in config.items() if v is not None})

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save`, failing before the file is opened if the trainer cannot be
        serialised (Keras would leave a 0-byte file behind)."""
        self.get_config()
        return super().save(filepath, *args, **kwargs)

    # --- steps ---------------------------------------------------------------------------
    def train_step(self, data):
        images, labels = checks.step_batch(data)
        checks.check_model_kind(self.model, self.method)  # the twin mode is read at trace time
        if self.method.twin and images.shape[0] is not None and images.shape[0] % 2:
            raise ValueError(methods_lib.odd_batch_message(images.shape[0]))
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        if self.method.lora:
            return self._autolora_step(images, labels, replicas)

        adversarial = None
        if self.method.adversarial:
            adversarial = self._run_attack(self.attack, images, labels, self._train_seed())
        self._inference_metrics(images, adversarial, labels)
        with tf.GradientTape() as tape:
            logits_adv = self.model(adversarial, training=True) if self.method.adversarial else None
            logits_nat = self.model(images, training=True) if self.method.natural else None
            loss = self._loss(logits_nat, logits_adv, labels)
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        variables = self.model.trainable_variables
        self._apply_gradients(tape.gradient(scaled_loss, variables), variables, replicas)
        return self._train_logs(loss, labels, logits_adv)

    def _autolora_step(self, images, labels, replicas):
        """AutoLoRa's step (docs/autolora.md): PGD on the main path; the natural forward (LoRA
        branch on) on x, then the adversarial one on x_adv, both in training mode; the LoRA
        variables take the gradient through the natural forward only, the main path's (BN
        gamma/beta and the stem included) through the adversarial one only, the head both;
        every update is scaled by the automated learning-rate multiplier."""
        adversarial = self._run_attack(self.attack, images, labels, self._train_seed())
        self._inference_metrics(images, adversarial, labels)  # the main path: what is evaluated
        with tf.GradientTape() as natural_tape:
            with lora_lib.natural_branch():
                logits_nat = self.model(images, training=True)
        with tf.GradientTape() as adversarial_tape:
            logits_adv = self.model(adversarial, training=True)
        with tf.GradientTape() as loss_tape:
            loss_tape.watch([logits_nat, logits_adv])
            lambdas = dict(lambda1=self.autolora_lambda1, lambda2=self.autolora_lambda2)
            loss = self.method.objective(logits_nat, logits_adv, labels, **lambdas)
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        grad_nat, grad_adv = loss_tape.gradient(scaled_loss, [logits_nat, logits_adv])
        variables = self.model.trainable_variables
        gradients = autolora.routed_gradients(
            variables,
            self._lora_variables + self._head_variables,
            natural=(natural_tape, logits_nat, grad_nat),
            adversarial=(adversarial_tape, logits_adv, grad_adv),
        )
        self._apply_gradients(gradients, variables, replicas, scale=self.autolora_lr_scale)
        return self._train_logs(loss, labels, logits_adv)

    def test_step(self, data):
        images, labels = checks.step_batch(data)
        adversarial = None
        if self.eval_attack is not None:
            seed = None
            if isinstance(self.eval_attack, PGD) and self.eval_attack.random_start:
                seed = self._seed(self.eval_attack, self._eval_batches)
                self._eval_batches.assign_add(1)
            adversarial = _unless_empty(
                lambda: self._run_attack(self.eval_attack, images, labels, seed), images, images
            )
        self._inference_metrics(images, adversarial, labels)
        logs = self._inference_logs(adversarial is not None)
        return _over_replicas(logs, {m.name: m for m in self.metrics})

    # --- the steps' parts -------------------------------------------------------------------
    def _loss(self, logits_nat, logits_adv, labels):
        """The method's objective, plus L2-SP's regulariser for "l2sp"."""
        loss = self.method.loss(
            logits_nat, logits_adv, labels, lambda_twins=self.lambda_twins, beta=self.beta
        )
        if self.method.l2sp:
            loss += methods_lib.l2sp_penalty(
                self._l2sp_variables,
                self._l2sp_anchors,
                self._l2sp_new,
                alpha=self.l2sp_alpha,
                beta=self.weight_decay,
            )
        return loss

    def _apply_gradients(self, gradients, variables, replicas, scale=None):
        """The update: coupled weight decay added, times `scale` (AutoLoRa's multiplier).

        A variable the loss does not reach (the unused Frozen wing of a twin layer in
        "adaptive" mode) is skipped, decay included, as PyTorch's SGD skips grad=None.
        L2-SP decays its head in the loss instead.
        """
        used = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        if self.weight_decay and not self.method.l2sp:
            # per replica wd/R: the optimizer sums the replicas' gradients
            decay = self.optimizer.scale_loss(tf.constant(self.weight_decay / replicas))
            used = [(g + tf.cast(decay, v.dtype) * v, v) for g, v in used]
        if scale is not None:
            used = [(tf.cast(scale, v.dtype) * g, v) for g, v in used]
        self.optimizer.apply_gradients(used)

    def _inference_metrics(self, images, adversarial, labels):
        """`clean_*` and `adv_*` of a batch: the evaluated network in inference mode, one
        forward over the clean and (when there is one) the adversarial batch."""
        batch = images if adversarial is None else tf.concat([images, adversarial], axis=0)
        logits = self(batch, training=False)
        clean = logits[: tf.shape(images)[0]]
        # per example: the mean over the evaluated examples, whatever the batches' sizes (a
        # replica's batch may be empty)
        self.clean_loss.update_state(methods_lib.cross_entropy_per_example(clean, labels))
        self.clean_accuracy.update_state(labels, clean)
        if adversarial is not None:
            adv = logits[tf.shape(images)[0] :]
            self.adversarial_loss.update_state(methods_lib.cross_entropy_per_example(adv, labels))
            self.adversarial_accuracy.update_state(labels, adv)

    def _inference_logs(self, adversarial):
        logs = {"clean_loss": self.clean_loss.result(), "clean_acc": self.clean_accuracy.result()}
        if adversarial:
            logs["adv_loss"] = self.adversarial_loss.result()
            logs["adv_acc"] = self.adversarial_accuracy.result()
        return logs

    def _train_logs(self, loss, labels, logits_adv):
        """The training metrics updated with this batch's objective and training forward,
        and the logs `fit` shows (`_inference_metrics` has updated the others)."""
        self.loss_metric.update_state(loss)
        logs = {"loss": self.loss_metric.result()}
        logs.update(self._inference_logs(self.method.adversarial))
        if self.method.twin:
            half = tf.shape(labels)[0] // 2
            self.frozen_accuracy.update_state(labels[:half], logits_adv[:half])
            self.adaptive_accuracy.update_state(labels[half:], logits_adv[half:])
            logs["frozen_adv_acc"] = self.frozen_accuracy.result()
            logs["adaptive_adv_acc"] = self.adaptive_accuracy.result()
        return logs

    def _run_attack(self, attack, images, labels, seed):
        if isinstance(attack, PGD):
            return attack(self.model, images, labels, seed=seed)
        return tf.stop_gradient(tf.cast(attack(self.model, images, labels), tf.float32))

    def _train_seed(self):
        if not (isinstance(self.attack, PGD) and self.attack.random_start):
            return None
        return self._seed(self.attack, self.optimizer.iterations)

    @staticmethod
    def _seed(attack, counter):
        """(attack seed, counter * replicas + replica id): reproducible, resumable (the
        counter is checkpointed) and different on every replica and step."""
        context = tf.distribute.get_replica_context()
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
        stream = tf.cast(counter, tf.int64) * context.num_replicas_in_sync + replica
        return tf.stack([tf.constant(attack.seed, tf.int64), stream])

    # --- input checks before compiled code (checks.py) -------------------------------------
    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        if self.check_inputs:
            split = kwargs.get("validation_split", 0.0)
            x, y = self._checked(x, y, batch_size, training=True, validation_split=split)
            if kwargs.get("validation_data") is not None:
                kwargs["validation_data"] = checks.checked_validation(
                    kwargs["validation_data"], **self._check_options(training=False)
                )
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            # a dataset keeps its own order; Keras shuffles arrays only (and warns otherwise)
            kwargs.setdefault("shuffle", False)
        if self.method.lora:
            autolora.check_fit_arguments(self, kwargs)
            kwargs["callbacks"] = autolora.fit_callbacks(
                self, x, y, batch_size, kwargs.get("steps_per_epoch"), kwargs.get("callbacks")
            )
        with checks.one_line_data_errors():
            return super().fit(x, y, batch_size=batch_size, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, batch_size, training=False)
        with checks.one_line_data_errors():
            return super().evaluate(x, y, batch_size=batch_size, **kwargs)

    def train_on_batch(self, x, y=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, None, training=True, whole=True)
        return super().train_on_batch(x, y, **kwargs)

    def test_on_batch(self, x, y=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, None, training=False, whole=True)
        return super().test_on_batch(x, y, **kwargs)

    def _check_options(self, *, training):
        return dict(
            model=self.model,
            even=training and self.method.twin,
            replicas=self.distribute_strategy.num_replicas_in_sync,
        )

    def _checked(self, x, y, batch_size, *, training, **kwargs):
        options = self._check_options(training=training)
        return checks.checked_inputs(x, y, batch_size, **options, **kwargs)


def _over_replicas(logs, metrics):
    """`logs` of Mean-style metrics over every replica's examples so far.

    Keras logs each replica's own running means and averages them over the replicas (it reads
    the metrics' cross-replica totals only when a step logs every metric of the model, which
    a test step does not).  That is the mean over all examples only when every replica saw
    as many; an evaluation's last batch may leave some with fewer, or none.  So the test step
    sums the totals and counts over replicas itself: one small all-reduce per step.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return logs
    sums = tf.stack(
        [
            tf.cast(v, tf.float32)
            for name in logs
            for v in (metrics[name].total, metrics[name].count)
        ]
    )
    sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
    return {
        name: tf.math.divide_no_nan(sums[2 * i], sums[2 * i + 1]) for i, name in enumerate(logs)
    }


def _unless_empty(compute, images, empty):
    """`compute()`, or `empty` (a tensor with no rows) when the batch `images` has none.

    A replica's batch is empty when the last global batch of an evaluation has fewer examples
    than there are replicas (tf.distribute hands the others none); a served client may send
    one.  The network is not run on zero rows: TensorFlow's oneDNN convolution returns its
    *input's* shape for an empty batch, and the next layer fails on it.
    """
    if images.shape[0] == 0:  # known while tracing: the network is not even traced
        return empty
    return tf.cond(tf.shape(images)[0] > 0, compute, lambda: empty)


def _default_eval_attack(attack):
    if isinstance(attack, PGD):
        config = attack.get_config()
        config.update(random_start=False, restarts=1)
        return PGD(**config)
    return attack
