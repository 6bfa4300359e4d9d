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

Distribution: each replica attacks and trains on its own slice of the global batch, the loss
is divided by the number of replicas and the optimizer sums the gradients, so the update is
the mean over replicas.  A twin model splits the *per-replica* batch, which must therefore be
even; `fit`/`evaluate` check it (and the images and labels) before any compiled code runs.

Input checks: XLA removes runtime assertions, so they are not in the compiled step.  `fit`
and `evaluate` check numpy inputs directly and wrap a `tf.data.Dataset` in a `map` that
asserts, per batch and outside the compiled step, images in [0, 1], labels in
[0, num_classes) and (training a twin method) a batch divisible by 2 x replicas.  What the
element spec and tf.data's structure tell is checked at once, before training: dtypes, an
unbatched dataset, label shapes, the batch size, and for a twin method an odd *last* batch
(`batch()` without drop_remainder over a dataset of known cardinality), which would
otherwise fail a whole epoch later.  A pipeline check that fires while training is re-raised
as one line (`InputCheckError`, a ValueError and a tf.errors.InvalidArgumentError) instead of
TensorFlow's graph error.  Labels are class ids, (batch,) or (batch, 1), or one-hot rows of
the model's width, taken by argmax as the attacks take them; soft rows are refused (the
objectives take hard labels).  An L-inf attack budget above 1 (0-255 units) is refused at
construction.  Nothing is clipped: a bad input is an error that says what to fix.  Data
passed as an already distributed dataset, or to `train_step` directly, is not checked.

Saving: the trainer is a registered Keras serialisable (`twins_tf>AdversarialTrainer`), so
`trainer.save("x.keras")`, `keras.models.load_model` and `ModelCheckpoint("ckpt.keras")`
work as for any Keras model and bring back the wrapped model, method, attacks and
hyperparameters (`get_config`), every weight, and the optimizer state.  The file names
twins_tf's classes; Keras imports only its own packages when loading, so `import twins_tf`
first (that import registers every twins_tf serialisable).
"""

import contextlib
import inspect
import math

import keras
import numpy as np
import tensorflow as tf

from twins_tf import lora as lora_lib
from twins_tf import methods as methods_lib
from twins_tf.attacks.pgd import PGD
from twins_tf.layers import TWIN, twin_layers
from twins_tf.platform import keras_private


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
      check_inputs: check images, labels and batch sizes in `fit`/`evaluate` (see module doc).
      method may also be a `twins_tf.methods.Method`; to save the trainer it must be the one
        registered under its name (`twins_tf.methods.register`).

    Metrics of `fit` (running means over the epoch): `loss`; `adv_acc`, accuracy of the
    training forward on the adversarial batch; `clean_acc`, accuracy on the clean batch: of
    the training forward where the method has one (`clean`, `trades`, `twins_trades`; for a
    twin model half Frozen, half Adaptive wing), otherwise of one extra inference forward
    (`at`, `twins_at`, `l2sp`); `frozen_acc` / `adaptive_acc` (twin methods), the adversarial
    accuracy of each wing's half.  `evaluate` (and validation) reports `clean_acc` and
    `adv_acc` in inference mode, the latter under `eval_attack`.

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
        if not isinstance(model, keras.Model) or not model.built:
            raise TypeError(
                f"AdversarialTrainer needs a built keras.Model, got {type(model).__name__}; "
                "build it (e.g. call it on a batch) first."
            )
        _check_model_kind(model, self.method)
        if self.method.adversarial and attack is None:
            raise ValueError(
                f"method {self.method.name!r} trains on adversarial examples: pass an attack, "
                "e.g. attack=twins_tf.attacks.PGD(8/255, 2/255, 10, random_start=True)."
            )
        for arg, value in (
            ("lambda_twins", lambda_twins),
            ("beta", beta),
            ("weight_decay", weight_decay),
            ("l2sp_alpha", l2sp_alpha),
        ):
            if not value >= 0:
                raise ValueError(f"{arg} must be >= 0, got {value}.")
        self.model = model
        self.num_classes = int(model.output_shape[-1])
        self.attack = attack
        self.eval_attack = _default_eval_attack(attack) if eval_attack == "auto" else eval_attack
        for arg, value in (("attack", self.attack), ("eval_attack", self.eval_attack)):
            _check_attack_units(value, arg)
        self.lambda_twins = float(lambda_twins)
        self.beta = float(beta)
        self.weight_decay = float(weight_decay)
        self.l2sp_alpha = float(l2sp_alpha)
        self.l2sp_exclude = l2sp_exclude if l2sp_exclude == "auto" else list(l2sp_exclude or ())
        self.check_inputs = bool(check_inputs)

        self.loss_metric = keras.metrics.Mean(name="loss")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")
        self.frozen_accuracy = keras.metrics.SparseCategoricalAccuracy(name="frozen_acc")
        self.adaptive_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adaptive_acc")
        # Seeds a random-start eval attack; one counter for all replicas.
        self._eval_batches = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="eval_batches",
        )
        self._l2sp_variables, self._l2sp_anchors, self._l2sp_new = [], [], []
        if self.method.l2sp:
            self._l2sp_variables = _pretrained_variables(model, l2sp_exclude)
            anchored = {id(v) for v in self._l2sp_variables}
            self._l2sp_new = [v for v in model.trainable_variables if id(v) not in anchored]
            self._l2sp_anchors = [
                self.add_weight(
                    shape=v.shape,
                    dtype=v.dtype,
                    initializer="zeros",
                    trainable=False,
                    name=f"l2sp_anchor_{i}",
                )
                for i, v in enumerate(self._l2sp_variables)
            ]
            self.snapshot_pretrained()
        if self.method.lora:
            self._init_autolora(model)
        self.built = True

    def _init_autolora(self, model):
        """AutoLoRa's state: the LoRA variables, the head's, the automated scalars and the
        learning-rate scheme's history, as trainer weights so a backup resumes them."""
        self._lora_variables = lora_lib.lora_variables(model)
        if not self._lora_variables:
            raise ValueError(
                f"method {self.method.name!r} trains a LoRA branch but {model.name!r} has "
                "none: wrap it with twins_tf.lora.add_lora(model, rank) (--lora_rank=8)."
            )
        heads = set(_output_layer_names(model))
        self._head_variables = [
            v
            for layer in keras_private.flatten_layers(model)
            if layer.name in heads
            for v in layer.trainable_weights
        ]

        def scalar(name, value, shape=()):
            return self.add_weight(
                shape=shape,
                dtype="float32",
                trainable=False,
                name=name,
                initializer=keras.initializers.Constant(value),
            )

        lambda1, lambda2 = methods_lib.autolora_lambdas(0.0, beta=self.beta)
        self.autolora_lambda1 = scalar("autolora_lambda1", lambda1)
        self.autolora_lambda2 = scalar("autolora_lambda2", lambda2)
        self.autolora_lr_scale = scalar("autolora_lr_scale", 1.0)
        windows = len(AUTOLORA_WINDOWS)
        self._autolora_history = scalar("autolora_val_adv_acc", 0.0, (AUTOLORA_WINDOWS[-1] + 2,))
        self._autolora_best = scalar("autolora_best_per_window", 0.0, (windows,))
        self._autolora_etas = scalar("autolora_lr_per_window", 0.0, (windows,))
        self._autolora_counters = scalar("autolora_window_and_max", 0.0, (2,))
        self._autolora_shadow = [
            self.add_weight(
                shape=v.shape,
                dtype=v.dtype,
                trainable=False,
                initializer="zeros",
                name=f"autolora_best_{i}",
            )
            for i, v in enumerate(model.weights)
        ]
        self._autolora_etas.assign(np.eye(1, windows, dtype="float32")[0])  # eta_0 = 1 x lr
        self._autolora_counters.assign([1.0, -1.0])  # window index 1, best val so far -1

    # --- public helpers ----------------------------------------------------------------
    def snapshot_pretrained(self):
        """Take the current weights as L2-SP's theta_pre (done at construction; call again
        after loading the pre-trained weights into `model` later)."""
        for anchor, variable in zip(self._l2sp_anchors, self._l2sp_variables):
            anchor.assign(variable)

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    @property
    def metrics(self):
        return [
            self.loss_metric,
            self.clean_accuracy,
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

    # --- serialisation -------------------------------------------------------------------
    def get_config(self):
        """The constructor arguments, the wrapped model and the attacks as Keras configs.

        With it `trainer.save("x.keras")`, `keras.models.load_model` and
        `keras.callbacks.ModelCheckpoint("ckpt.keras")` work like for any Keras model; the
        weights (model, L2-SP anchors, eval counter) and the optimizer state are in the file's
        weights, not here.  The attacks must be registered Keras serialisables (twins_tf's
        are); a custom attack that is not is an error naming the fix.
        """
        registered = methods_lib.METHODS.get(self.method.name)
        if registered is not self.method:
            raise ValueError(
                f"AdversarialTrainer.get_config: method {self.method.name!r} is not the one "
                "registered under that name, so a loaded trainer could not find it: "
                "twins_tf.methods.register() it first."
            )
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            "method": self.method.name,
            "attack": _serialize_attack(self.attack, "attack"),
            "eval_attack": _serialize_attack(self.eval_attack, "eval_attack"),
            "lambda_twins": self.lambda_twins,
            "beta": self.beta,
            "weight_decay": self.weight_decay,
            "l2sp_alpha": self.l2sp_alpha,
            "l2sp_exclude": self.l2sp_exclude,
            "check_inputs": self.check_inputs,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The trainer of `get_config`; its weights and optimizer state come from the file."""
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        for key in ("attack", "eval_attack"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(model, **config)

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
        images, labels = _unpack(data)
        images = tf.cast(images, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        _check_model_kind(self.model, self.method)  # the twin mode is read at trace time
        if self.method.twin and images.shape[0] is not None and images.shape[0] % 2:
            raise ValueError(methods_lib.odd_batch_message(images.shape[0]))
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        if self.method.lora:
            return self._autolora_step(images, labels, replicas)

        adversarial = None
        if self.method.adversarial:
            adversarial = self._run_attack(self.attack, images, labels, self._train_seed())
        if self.method.adversarial and not self.method.natural:
            # clean accuracy costs one inference forward (about 1/(3k + 4) of a PGD-k step)
            self.clean_accuracy.update_state(labels, self.model(images, training=False))

        with tf.GradientTape() as tape:
            logits_adv = self.model(adversarial, training=True) if self.method.adversarial else None
            logits_nat = self.model(images, training=True) if self.method.natural else None
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
            scaled_loss = self.optimizer.scale_loss(loss / replicas)

        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        # A variable the loss does not reach (the unused Frozen wing of a twin layer in
        # "adaptive" mode) is skipped, decay included, as PyTorch's SGD skips grad=None.
        used = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        if self.weight_decay and not self.method.l2sp:  # L2-SP decays its head in the loss
            # per replica wd/R: the optimizer sums the replicas' gradients
            decay = self.optimizer.scale_loss(tf.constant(self.weight_decay / replicas))
            used = [(g + tf.cast(decay, v.dtype) * v, v) for g, v in used]
        self.optimizer.apply_gradients(used)

        self.loss_metric.update_state(loss)
        if logits_nat is not None:
            self.clean_accuracy.update_state(labels, logits_nat)
        logs = {"loss": self.loss_metric.result(), "clean_acc": self.clean_accuracy.result()}
        if logits_adv is not None:
            self.adversarial_accuracy.update_state(labels, logits_adv)
            logs["adv_acc"] = self.adversarial_accuracy.result()
        if self.method.twin:
            half = tf.shape(labels)[0] // 2
            self.frozen_accuracy.update_state(labels[:half], logits_adv[:half])
            self.adaptive_accuracy.update_state(labels[half:], logits_adv[half:])
            logs["frozen_acc"] = self.frozen_accuracy.result()
            logs["adaptive_acc"] = self.adaptive_accuracy.result()
        return logs

    def _autolora_step(self, images, labels, replicas):
        """AutoLoRa's step (docs/autolora.md): PGD on the main path; the natural forward (LoRA
        branch on) on x, then the adversarial one on x_adv, both in training mode; the LoRA
        variables take the gradient through the natural forward only, the main path's (BN
        gamma/beta and the stem included) through the adversarial one only, the head both."""
        adversarial = self._run_attack(self.attack, images, labels, self._train_seed())
        with tf.GradientTape() as natural_tape:
            with lora_lib.natural_branch():
                logits_nat = self.model(images, training=True)
        with tf.GradientTape() as adversarial_tape:
            logits_adv = self.model(adversarial, training=True)
        with tf.GradientTape() as loss_tape:
            loss_tape.watch([logits_nat, logits_adv])
            loss = self.method.objective(
                logits_nat,
                logits_adv,
                labels,
                lambda1=self.autolora_lambda1,
                lambda2=self.autolora_lambda2,
            )
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        grad_nat, grad_adv = loss_tape.gradient(scaled_loss, [logits_nat, logits_adv])
        variables = self.model.trainable_variables
        natural_ids = {id(v) for v in self._lora_variables + self._head_variables}
        natural_vars = [v for v in variables if id(v) in natural_ids]
        from_adv = adversarial_tape.gradient(logits_adv, variables, output_gradients=grad_adv)
        from_nat = dict(
            zip(
                map(id, natural_vars),
                natural_tape.gradient(logits_nat, natural_vars, output_gradients=grad_nat),
            )
        )
        used = []
        for g, v in zip(from_adv, variables):
            extra = from_nat.get(id(v))
            g = extra if g is None else (g if extra is None else g + extra)
            if g is not None:
                used.append((g, v))
        scale = self.autolora_lr_scale
        decay = self.optimizer.scale_loss(tf.constant(self.weight_decay / replicas))
        used = [(tf.cast(scale, v.dtype) * (g + tf.cast(decay, v.dtype) * v), v) for g, v in used]
        self.optimizer.apply_gradients(used)

        self.loss_metric.update_state(loss)
        self.clean_accuracy.update_state(labels, logits_nat)
        self.adversarial_accuracy.update_state(labels, logits_adv)
        return {
            "loss": self.loss_metric.result(),
            "clean_acc": self.clean_accuracy.result(),
            "adv_acc": self.adversarial_accuracy.result(),
        }

    def natural_branch_accuracy(self, dataset, steps=None):
        """Clean accuracy of the LoRA (natural) path in inference mode over `dataset`'s
        (images, labels) batches (at most `steps`): AutoLoRa's lambda input."""
        if not hasattr(self, "_natural_counts"):

            @tf.function
            def counts(images, labels):
                with lora_lib.natural_branch():
                    logits = self.model(tf.cast(images, tf.float32), training=False)
                labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
                hits = tf.equal(tf.argmax(logits, axis=-1), labels)
                return tf.reduce_sum(tf.cast(hits, tf.int64)), tf.size(labels, tf.int64)

            self._natural_counts = counts
        correct = total = 0
        for images, labels in dataset.take(-1 if steps is None else steps):
            c, n = self._natural_counts(images, labels)
            correct, total = correct + int(c), total + int(n)
        return correct / max(total, 1)

    def update_autolora_lambdas(self, dataset, steps=None):
        """Sets lambda1, lambda2 from the natural path's accuracy on `dataset`; returns it."""
        accuracy = self.natural_branch_accuracy(dataset, steps)
        lambda1, lambda2 = methods_lib.autolora_lambdas(accuracy, beta=self.beta)
        self.autolora_lambda1.assign(lambda1)
        self.autolora_lambda2.assign(lambda2)
        return accuracy

    def autolora_epoch_end(self, epoch, val_adv_acc):
        """AutoLoRa's learning-rate scheme after (0-based) `epoch` with validation robust
        accuracy `val_adv_acc`: keeps the best weights, halves the lr (restoring them) when a
        window check fails (`autolora_schedule`).  Returns the scheme's actions."""
        window, best = (float(c) for c in self._autolora_counters.numpy())
        state = dict(
            history=self._autolora_history.numpy(),
            window=int(window),
            max_acc=best,
            best=self._autolora_best.numpy(),
            etas=self._autolora_etas.numpy(),
            eta=float(self.autolora_lr_scale.numpy()),
        )
        state, actions = autolora_schedule(state, epoch + 1, float(val_adv_acc))
        if actions["new_best"]:
            for shadow, variable in zip(self._autolora_shadow, self.model.weights):
                shadow.assign(variable)
        if actions["halve"]:
            for shadow, variable in zip(self._autolora_shadow, self.model.weights):
                variable.assign(shadow)
        self._autolora_history.assign(state["history"])
        self._autolora_best.assign(state["best"])
        self._autolora_etas.assign(state["etas"])
        self._autolora_counters.assign([state["window"], state["max_acc"]])
        self.autolora_lr_scale.assign(state["eta"])
        return actions

    def test_step(self, data):
        images, labels = _unpack(data)
        images = tf.cast(images, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        logits = self.model(images, training=False)
        self.loss_metric.update_state(methods_lib.cross_entropy(logits, labels))
        self.clean_accuracy.update_state(labels, logits)
        logs = {"loss": self.loss_metric.result(), "clean_acc": self.clean_accuracy.result()}
        if self.eval_attack is not None:
            seed = None
            if isinstance(self.eval_attack, PGD) and self.eval_attack.random_start:
                seed = self._seed(self.eval_attack, self._eval_batches)
                self._eval_batches.assign_add(1)
            adversarial = self._run_attack(self.eval_attack, images, labels, seed)
            self.adversarial_accuracy.update_state(labels, self.model(adversarial, training=False))
            logs["adv_acc"] = self.adversarial_accuracy.result()
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

    # --- input checks before compiled code ------------------------------------------------
    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(
                x,
                y,
                batch_size,
                training=True,
                validation_split=kwargs.get("validation_split", 0.0),
            )
            if kwargs.get("validation_data") is not None:
                kwargs["validation_data"] = self._checked_validation(kwargs["validation_data"])
        if self.method.lora:
            data = (
                x
                if isinstance(x, tf.data.Dataset)
                else tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size or 32)
            )
            steps = kwargs.get("steps_per_epoch")
            callbacks = list(kwargs.get("callbacks") or [])
            # the epoch-end update first (the backup saves it), the start after a restore
            kwargs["callbacks"] = (
                [_AutoLoraEpochEnd(self, data, steps)]
                + callbacks
                + [_AutoLoraStart(self, data, steps)]
            )
        with _one_line_data_errors():
            return super().fit(x, y, batch_size=batch_size, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, batch_size, training=False)
        with _one_line_data_errors():
            return super().evaluate(x, y, batch_size=batch_size, **kwargs)

    def train_on_batch(self, x, y=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, None, training=True, whole=True)
        return super().train_on_batch(x, y, **kwargs)

    def test_on_batch(self, x, y=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, None, training=False, whole=True)
        return super().test_on_batch(x, y, **kwargs)

    def _checked_validation(self, data):
        if isinstance(data, tf.data.Dataset):
            return self._checked(data, None, None, training=False)[0]
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return self._checked(data[0], data[1], None, training=False)
        raise ValueError(
            "validation_data must be a tf.data.Dataset of (images, labels) or a tuple "
            "(images, labels); sample weights are not supported."
        )

    def _checked(self, x, y, batch_size, *, training, validation_split=0.0, whole=False):
        even = training and self.method.twin
        replicas = self.distribute_strategy.num_replicas_in_sync
        if isinstance(x, tf.data.Dataset):
            if y is not None:
                raise ValueError("pass labels inside the dataset, not as y=, with a tf.data input.")
            return self._checked_dataset(x, even, replicas), None
        if isinstance(x, tf.distribute.DistributedDataset) or hasattr(x, "element_spec"):
            return x, y  # already distributed or a custom iterator: not checked (module doc)
        if x is None or y is None:
            raise ValueError(
                "AdversarialTrainer needs (images, labels): a tf.data.Dataset yielding them, or "
                "x=images and y=integer labels."
            )
        images, labels = np.asarray(x), np.asarray(y)
        _check_images_array(images, _input_rank(self.model))
        class_ids = _class_ids_array(labels, self.num_classes)
        if class_ids is not labels:
            y = class_ids  # one-hot rows, taken by argmax
        if even:
            count = len(images)
            if validation_split:
                count = int(math.ceil(count * (1.0 - validation_split)))
            if whole:  # Keras's *_on_batch hands every replica the whole batch
                replicas = 1
            batches = [count] if whole else _numpy_batch_sizes(count, batch_size or 32)
            for batch in batches:
                if batch % (2 * replicas):
                    raise ValueError(methods_lib.odd_batch_message(batch, replicas=replicas))
        return x, y

    def _checked_dataset(self, dataset, even, replicas):
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(
                "AdversarialTrainer datasets must yield (images, labels) pairs; got elements "
                f"{spec}. Sample weights and dict inputs are not supported."
            )
        image_spec, label_spec = spec
        if not image_spec.dtype.is_floating:
            raise ValueError(
                f"images must be floats in [0, 1], got dtype {image_spec.dtype.name}: map "
                "`tf.cast(images, tf.float32) / 255.0` over the dataset."
            )
        one_hot = _is_one_hot_shape(tuple(label_spec.shape), self.num_classes)
        if not (label_spec.dtype.is_integer or one_hot and label_spec.dtype.is_floating):
            raise ValueError(
                f"labels must be integer class ids, got dtype {label_spec.dtype.name} (one-hot "
                "labels: take tf.argmax(labels, -1))."
            )
        rank = _input_rank(self.model)
        if rank is not None and image_spec.shape.rank == rank - 1:
            raise ValueError(
                f"the dataset is not batched: its images have shape {image_spec.shape} and the "
                f"model takes batches of rank {rank}. Call dataset.batch(batch_size) "
                "(drop_remainder=True for twin methods)."
            )
        if rank is not None and image_spec.shape.rank not in (None, rank):
            raise ValueError(
                f"the dataset's images have shape {image_spec.shape} but the model takes "
                f"batches of shape {tuple(self.model.input_shape)}."
            )
        _check_label_shape(tuple(label_spec.shape), self.num_classes, dataset=True)
        batch = image_spec.shape[0] if image_spec.shape.rank else None
        if even and batch is not None and batch % (2 * replicas):
            raise ValueError(methods_lib.odd_batch_message(batch, replicas=replicas))
        if even:
            # an odd *last* batch (batch() without drop_remainder): found here from the batch
            # size and the cardinality where tf.data's structure tells them, before training
            sizes = keras_private.dataset_batch_sizes(dataset) or ()
            odd = sorted(size for size in sizes if size % (2 * replicas))
            if odd:
                raise InputCheckError(
                    methods_lib.odd_batch_message(odd[0], replicas=replicas)
                    + f" (the dataset's batches have sizes {sorted(sizes)})"
                )
        num_classes = self.num_classes

        messages = _pipeline_messages(num_classes, replicas)
        _PIPELINE_MESSAGES.update(messages.values())

        def check(images, labels):
            if one_hot:  # exact one-hot rows, as the attacks take them (soft labels refused)
                hot = tf.logical_or(tf.equal(labels, 0), tf.equal(labels, 1))
                rows = tf.reduce_sum(tf.cast(labels, tf.float32), axis=-1)
                with tf.control_dependencies(
                    [
                        tf.debugging.assert_equal(
                            tf.logical_and(tf.reduce_all(hot), tf.reduce_all(tf.equal(rows, 1.0))),
                            True,
                            message=messages["soft"],
                        ),
                    ]
                ):
                    labels = tf.argmax(labels, axis=-1)
            checks = [
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(images), tf.constant(0, images.dtype), message=messages["low"]
                ),
                tf.debugging.assert_less_equal(
                    tf.reduce_max(images), tf.constant(1, images.dtype), message=messages["high"]
                ),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(labels),
                    tf.constant(0, labels.dtype),
                    message=messages["negative"],
                ),
                tf.debugging.assert_less(
                    tf.reduce_max(labels),
                    tf.constant(num_classes, labels.dtype),
                    message=messages["large"],
                ),
            ]
            if even:
                checks.append(
                    tf.debugging.assert_equal(
                        tf.shape(images)[0] % (2 * replicas), 0, message=messages["odd"]
                    )
                )
            with tf.control_dependencies(checks):
                return tf.identity(images), tf.identity(labels)

        return dataset.map(check)


# AutoLoRa's learning-rate windows: checks after epochs W_j + 1 (j >= 1), rho of each window's
# epoch-to-epoch steps must raise the validation robust accuracy (the authors' code).
AUTOLORA_WINDOWS = tuple(range(0, 57, 4))
AUTOLORA_RHO = 0.75
AUTOLORA_MIN_LR = 1e-5


def autolora_schedule(state, epoch, val_adv_acc):
    """One epoch of AutoLoRa's automated learning rate, as a pure function.

    Args:
      state: dict of numpy/float values: `history` (val robust accuracy of epoch e at index
        e - 1), `window` (index j of the next check, from 1), `max_acc` (best so far, -1 at
        the start), `best` (the best at each window's check), `etas` (the lr multiplier at
        each window's check, etas[0] = 1), `eta` (the current lr multiplier).
      epoch: the finished epoch, 1-based.
      val_adv_acc: its validation robust accuracy.

    Returns:
      (new state, actions): actions["new_best"] (keep these weights as the best),
      actions["halve"] (the lr was halved: restore the best weights).
    """
    state = {
        k: (np.array(v, dtype=np.float64) if isinstance(v, np.ndarray) else v)
        for k, v in state.items()
    }
    history, best, etas = state["history"], state["best"], state["etas"]
    window = int(state["window"])
    if epoch - 1 < len(history):
        history[epoch - 1] = val_adv_acc
    actions = {"new_best": False, "halve": False}
    if val_adv_acc > state["max_acc"]:
        best[window] = val_adv_acc
        state["max_acc"] = val_adv_acc
        actions["new_best"] = True
    if epoch - 1 == AUTOLORA_WINDOWS[window]:
        start, end = AUTOLORA_WINDOWS[window - 1], AUTOLORA_WINDOWS[window]
        rises = sum(history[j + 1] > history[j] for j in range(start, end))
        stalled = etas[window] == etas[window - 1] and best[window] == best[window - 1]
        if rises < AUTOLORA_RHO * (end - start) or stalled:
            state["eta"] = state["eta"] / 2
            etas[window] = state["eta"]
            actions["halve"] = True
        if window < len(AUTOLORA_WINDOWS) - 1:
            window += 1
            best[window] = best[window - 1]
            etas[window] = etas[window - 1]
    state.update(history=history, best=best, etas=etas, window=window)
    return state, actions


class _AutoLoraStart(keras.callbacks.Callback):
    """Sets AutoLoRa's scalars from the untrained natural path before a fresh run's first
    step (after BackupAndRestore, which restores a resumed run's)."""

    def __init__(self, trainer, data, steps):
        super().__init__()
        self.trainer, self.data, self.steps = trainer, data, steps

    def on_train_begin(self, logs=None):
        if int(self.trainer.optimizer.iterations.numpy()) == 0:
            self.trainer.update_autolora_lambdas(self.data, self.steps)


class _AutoLoraEpochEnd(keras.callbacks.Callback):
    """After each epoch: lambda1/lambda2 from the natural path's training accuracy, then the
    learning-rate windows on `val_adv_acc` (without validation data the lr stays as set)."""

    def __init__(self, trainer, data, steps):
        super().__init__()
        self.trainer, self.data, self.steps = trainer, data, steps

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        trainer = self.trainer
        logs["natural_branch_acc"] = trainer.update_autolora_lambdas(self.data, self.steps)
        if "val_adv_acc" in logs:
            actions = trainer.autolora_epoch_end(epoch, logs["val_adv_acc"])
            if actions["halve"]:
                print(
                    f"AutoLoRa: epoch {epoch + 1}: lr halved to "
                    f"{float(trainer.autolora_lr_scale.numpy()):g} x --lr, best weights "
                    "restored.",
                    flush=True,
                )
            lr = trainer.optimizer.learning_rate
            lr = float(lr.numpy() if hasattr(lr, "numpy") else lr)
            if lr * float(trainer.autolora_lr_scale.numpy()) < AUTOLORA_MIN_LR:
                print(
                    f"AutoLoRa: epoch {epoch + 1}: lr below {AUTOLORA_MIN_LR:g}, training "
                    "stops (the paper's rule).",
                    flush=True,
                )
                trainer.stop_training = True
        logs["autolora_lambda1"] = float(trainer.autolora_lambda1.numpy())
        logs["autolora_lr_scale"] = float(trainer.autolora_lr_scale.numpy())


class InputCheckError(tf.errors.InvalidArgumentError, ValueError):
    """Bad `fit`/`evaluate` data, found by a check of the trainer's tf.data pipeline.

    One line saying what is wrong and how to fix it, instead of TensorFlow's multi-line graph
    error.  A ValueError like the checks made before training, and still a
    `tf.errors.InvalidArgumentError`, which is what the pipeline's assertion raises, so code
    catching either keeps working.
    """

    def __init__(self, message):
        super().__init__(None, None, message)


def _pipeline_messages(num_classes, replicas):
    """The messages of the tf.data checks of `_checked_dataset`, by check."""
    return {
        "low": "images must lie in [0, 1] (pixel space); found a value below 0. Scale images "
        "to [0, 1] (e.g. /255) and do not normalise them: the model normalises inside.",
        "high": "images must lie in [0, 1] (pixel space); found a value above 1. Scale images "
        "to [0, 1] (e.g. divide uint8 images by 255).",
        "negative": f"labels must be class ids in [0, {num_classes}); found a negative one.",
        "large": f"labels must be class ids in [0, {num_classes}) (the model has {num_classes} "
        "outputs); found a larger one.",
        "odd": methods_lib.odd_batch_message(
            f"not a multiple of {2 * replicas}", replicas=replicas
        ),
        "soft": _SOFT_LABELS,
    }


_SOFT_LABELS = (
    "labels are 2-D but not one-hot (soft or mixed labels?): the objectives take "
    "hard labels; pass class ids (batch,) or one-hot rows."
)


# Every message a pipeline check of this process may raise, to recognise it in TF's error.
_PIPELINE_MESSAGES = set()


@contextlib.contextmanager
def _one_line_data_errors():
    """Re-raise a failed tf.data check of `_checked_dataset` as one InputCheckError line
    (TensorFlow's own error is several lines of graph context around the message)."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        if isinstance(error, InputCheckError):
            raise
        text = str(error)
        found = [m for m in _PIPELINE_MESSAGES if m in text]
        if found:
            raise InputCheckError(max(found, key=len)) from None
        raise


def _input_rank(model):
    """The rank of the model's input batches (4 for images), None if it has no single input."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    return (
        len(shape)
        if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape)
        else None
    )


def _is_one_hot_shape(shape, num_classes):
    return len(shape) == 2 and shape[1] == num_classes and num_classes > 1


def _check_label_shape(shape, num_classes, *, dataset):
    """Labels are one class id per image, shape (batch,) or (batch, 1), or one-hot rows of the
    model's width (taken by argmax, as the attacks take them); anything else is refused."""
    if len(shape) <= 1 or (len(shape) == 2 and shape[1] == 1):
        if len(shape) == 0 and dataset:
            raise ValueError(
                "the dataset's labels are scalars: the dataset is not batched. Call "
                "dataset.batch(batch_size) (drop_remainder=True for twin methods)."
            )
        return
    if _is_one_hot_shape(shape, num_classes):
        return
    raise ValueError(
        f"labels must be class ids, shape (batch,), or one-hot rows of the model's "
        f"{num_classes} classes, got shape {shape}."
    )


def _unpack(data):
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if len(data) == 3 and data[2] is not None:
            raise ValueError(
                "AdversarialTrainer does not support sample weights: pass (images, labels)."
            )
        return data[0], data[1]
    raise ValueError(
        "AdversarialTrainer steps take (images, labels) batches, got "
        f"{type(data).__name__} of {len(data) if isinstance(data, (tuple, list)) else 1} part(s)."
    )


def _check_model_kind(model, method):
    layers = twin_layers(model)
    active = [layer for layer in layers if layer.mode == TWIN]
    if method.twin and (not layers or len(active) != len(layers)):
        if not layers:
            raise ValueError(
                f"method {method.name!r} needs a twin model but {model.name!r} has no "
                "TwinBatchNormalization layers: build it with twin=True or use "
                "twins_tf.twinify(model)."
            )
        raise ValueError(
            f"method {method.name!r} needs every TwinBatchNormalization in 'twin' mode; "
            f"{len(layers) - len(active)} of {len(layers)} are not: call "
            "twins_tf.layers.set_twin_mode(model, 'twin')."
        )
    if not method.twin and active:
        raise ValueError(
            f"method {method.name!r} trains a plain-BN model but {model.name!r} has "
            f"{len(active)} TwinBatchNormalization layers in 'twin' mode (they would split "
            "every batch between two wings): use twins_tf.untwin(model), or "
            "twins_tf.layers.set_twin_mode(model, 'adaptive') for plain BN with PyTorch numerics."
        )


def _serialize_attack(attack, arg):
    """`attack` as a Keras config, or a ValueError saying how to make it serialisable."""
    if attack is None:
        return None
    function = inspect.isfunction(attack)
    registered = keras.saving.get_registered_name(attack if function else type(attack))
    if ">" not in registered or not (function or hasattr(attack, "get_config")):
        raise ValueError(
            f"AdversarialTrainer cannot be serialised: its {arg} {attack!r} is not a registered "
            "Keras serialisable. Decorate its class with "
            "@keras.saving.register_keras_serializable(package=...) and give it get_config() "
            "and from_config(), or save the weights only (trainer.model.save_weights, "
            "ModelCheckpoint(..., save_weights_only=True))."
        )
    return keras.saving.serialize_keras_object(attack)


def _check_attack_units(attack, arg):
    """An attack budget above 1 is in 0-255 units: the trainer's images are in [0, 1], so
    such an attack would let PGD replace each image by anything (found here, at construction,
    rather than as a useless run).  Reads the `epsilon`/`step_size` attributes twins_tf's
    attacks have; other attacks check their own arguments.  L-inf only: an L2 budget above 1
    is ordinary (ImageNet's L2 threat model is 3.0)."""
    if getattr(attack, "norm", "linf") not in ("linf", "Linf", "inf", float("inf")):
        return
    for name in ("epsilon", "step_size"):
        value = getattr(attack, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
            raise ValueError(
                f"{arg} {name}={value:g} is in 0-255 units, but twins_tf images are in [0, 1]: "
                f"pass {name}={value:g}/255 (e.g. PGD(8 / 255, 2 / 255, 10))."
            )


def _default_eval_attack(attack):
    if isinstance(attack, PGD):
        config = attack.get_config()
        config.update(random_start=False, restarts=1)
        return PGD(**config)
    return attack


def _pretrained_variables(model, exclude):
    if exclude == "auto":
        exclude = _output_layer_names(model)
    exclude = set(exclude or ())
    layers = keras_private.flatten_layers(model)
    known = {layer.name for layer in layers}
    unknown = exclude - known
    if unknown:
        raise ValueError(f"l2sp_exclude names layers not in the model: {sorted(unknown)}.")
    skipped = {id(v) for layer in layers if layer.name in exclude for v in layer.weights}
    return [v for v in model.trainable_variables if id(v) not in skipped]


def _output_layer_names(model):
    if isinstance(model, keras.Sequential) and model.layers:
        names = [model.layers[-1].name]
    else:  # a functional model's public list of its output layers
        names = list(getattr(model, "output_names", None) or [])
    if not names:
        raise ValueError(
            f"cannot find the output layer of {model.name!r} (not a functional model): pass "
            "l2sp_exclude=[names of the new head's layers] (or [] to anchor every weight)."
        )
    return names


def _numpy_batch_sizes(count, batch_size):
    sizes = [batch_size] if count >= batch_size else []
    if count % batch_size:
        sizes.append(count % batch_size)
    return sizes


def _check_images_array(images, rank=None):
    if rank is not None and images.ndim == rank - 1:
        raise ValueError(
            f"images of shape {images.shape} are one image, not a batch: the model takes "
            f"batches of rank {rank}. Pass images[None] for a single image."
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {images.dtype}: pass "
            "images.astype('float32') / 255."
        )
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1] (pixel space), got values in [{images.min():.4g}, "
            f"{images.max():.4g}]: scale them to [0, 1] and do not normalise them (the model "
            "normalises inside)."
        )


def _class_ids_array(labels, num_classes):
    """numpy labels as class ids: one-hot rows of the model's width by argmax, else checked."""
    _check_label_shape(labels.shape, num_classes, dataset=False)
    if _is_one_hot_shape(labels.shape, num_classes):
        if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=-1) == 1).all()):
            raise ValueError(_SOFT_LABELS)
        return labels.argmax(axis=-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integer class ids, got dtype {labels.dtype} (one-hot labels: pass "
            "labels.argmax(-1))."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be class ids in [0, {num_classes}) (the model has {num_classes} "
            f"outputs), got values in [{labels.min()}, {labels.max()}]."
        )
    return labels
