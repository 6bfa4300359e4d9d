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
[0, num_classes) and (training a twin method) a batch divisible by 2 x replicas.  A batch
size known statically is checked at once, before training.  Nothing is clipped: a bad input
is an error that says what to fix.  Data passed as an already distributed dataset, or to
`train_step` directly, is not checked.
"""
import math

import keras
import numpy as np
import tensorflow as tf

from twins_tf import methods as methods_lib
from twins_tf.attacks.pgd import PGD
from twins_tf.layers import TWIN, twin_layers


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
        for arg, value in (("lambda_twins", lambda_twins), ("beta", beta),
                           ("weight_decay", weight_decay), ("l2sp_alpha", l2sp_alpha)):
            if not value >= 0:
                raise ValueError(f"{arg} must be >= 0, got {value}.")
        self.model = model
        self.num_classes = int(model.output_shape[-1])
        self.attack = attack
        self.eval_attack = _default_eval_attack(attack) if eval_attack == "auto" else eval_attack
        self.lambda_twins = float(lambda_twins)
        self.beta = float(beta)
        self.weight_decay = float(weight_decay)
        self.l2sp_alpha = float(l2sp_alpha)
        self.check_inputs = bool(check_inputs)

        self.loss_metric = keras.metrics.Mean(name="loss")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")
        self.frozen_accuracy = keras.metrics.SparseCategoricalAccuracy(name="frozen_acc")
        self.adaptive_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adaptive_acc")
        # Seeds a random-start eval attack; one counter for all replicas.
        self._eval_batches = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            aggregation="only_first_replica", name="eval_batches",
        )
        self._l2sp_variables, self._l2sp_anchors, self._l2sp_new = [], [], []
        if self.method.l2sp:
            self._l2sp_variables = _pretrained_variables(model, l2sp_exclude)
            anchored = {id(v) for v in self._l2sp_variables}
            self._l2sp_new = [v for v in model.trainable_variables if id(v) not in anchored]
            self._l2sp_anchors = [
                self.add_weight(
                    shape=v.shape, dtype=v.dtype, initializer="zeros", trainable=False,
                    name=f"l2sp_anchor_{i}",
                )
                for i, v in enumerate(self._l2sp_variables)
            ]
            self.snapshot_pretrained()
        self.built = True

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
            self.loss_metric, self.clean_accuracy, self.adversarial_accuracy,
            self.frozen_accuracy, self.adaptive_accuracy,
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

    # --- steps ---------------------------------------------------------------------------
    def train_step(self, data):
        images, labels = _unpack(data)
        images = tf.cast(images, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        _check_model_kind(self.model, self.method)  # the twin mode is read at trace time
        if self.method.twin and images.shape[0] is not None and images.shape[0] % 2:
            raise ValueError(
                f"twin methods split each per-replica batch into a Frozen and an Adaptive half; "
                f"got a per-replica batch of {images.shape[0]}. Use an even per-replica batch "
                "size and drop_remainder=True in tf.data."
            )
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync

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
                    self._l2sp_variables, self._l2sp_anchors, self._l2sp_new,
                    alpha=self.l2sp_alpha, beta=self.weight_decay,
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
            self.adversarial_accuracy.update_state(
                labels, self.model(adversarial, training=False)
            )
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
            x, y = self._checked(x, y, batch_size, training=True,
                                 validation_split=kwargs.get("validation_split", 0.0))
            if kwargs.get("validation_data") is not None:
                kwargs["validation_data"] = self._checked_validation(kwargs["validation_data"])
        return super().fit(x, y, batch_size=batch_size, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if self.check_inputs:
            x, y = self._checked(x, y, batch_size, training=False)
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
        _check_images_array(images)
        _check_labels_array(labels, self.num_classes)
        if even:
            count = len(images)
            if validation_split:
                count = int(math.ceil(count * (1.0 - validation_split)))
            if whole:  # Keras's *_on_batch hands every replica the whole batch
                replicas = 1
            batches = [count] if whole else _numpy_batch_sizes(count, batch_size or 32)
            for batch in batches:
                if batch % (2 * replicas):
                    raise ValueError(_odd_batch_message(batch, replicas))
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
        if not label_spec.dtype.is_integer:
            raise ValueError(
                f"labels must be integer class ids, got dtype {label_spec.dtype.name} (one-hot "
                "labels: take tf.argmax(labels, -1))."
            )
        batch = image_spec.shape[0] if image_spec.shape.rank else None
        if even and batch is not None and batch % (2 * replicas):
            raise ValueError(_odd_batch_message(batch, replicas))
        num_classes = self.num_classes

        def check(images, labels):
            checks = [
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(images), tf.constant(0, images.dtype),
                    message="images must lie in [0, 1] (pixel space); found a value below 0. "
                    "Scale images to [0, 1] (e.g. /255) and do not normalise them: the model "
                    "normalises inside.",
                ),
                tf.debugging.assert_less_equal(
                    tf.reduce_max(images), tf.constant(1, images.dtype),
                    message="images must lie in [0, 1] (pixel space); found a value above 1. "
                    "Scale images to [0, 1] (e.g. divide uint8 images by 255).",
                ),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(labels), tf.constant(0, labels.dtype),
                    message=f"labels must be class ids in [0, {num_classes}); found a negative one.",
                ),
                tf.debugging.assert_less(
                    tf.reduce_max(labels), tf.constant(num_classes, labels.dtype),
                    message=f"labels must be class ids in [0, {num_classes}) (the model has "
                    f"{num_classes} outputs); found a larger one.",
                ),
            ]
            if even:
                checks.append(tf.debugging.assert_equal(
                    tf.shape(images)[0] % (2 * replicas), 0,
                    message=_odd_batch_message("not a multiple of 2 x replicas", replicas),
                ))
            with tf.control_dependencies(checks):
                return tf.identity(images), tf.identity(labels)

        return dataset.map(check)


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
    known = {layer.name for layer in model._flatten_layers(include_self=False)}
    unknown = exclude - known
    if unknown:
        raise ValueError(f"l2sp_exclude names layers not in the model: {sorted(unknown)}.")
    skipped = {
        id(v) for layer in model._flatten_layers(include_self=False)
        if layer.name in exclude for v in layer.weights
    }
    return [v for v in model.trainable_variables if id(v) not in skipped]


def _output_layer_names(model):
    names = []
    for output in getattr(model, "outputs", None) or []:
        history = getattr(output, "_keras_history", None)
        if history is not None:
            names.append(history[0].name)
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


def _check_images_array(images):
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


def _check_labels_array(labels, num_classes):
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


def _odd_batch_message(batch, replicas):
    return (
        f"twin methods split each per-replica batch into a Frozen and an Adaptive half, so the "
        f"global batch must be a multiple of 2 x {replicas} replica(s); got batch {batch}. Use "
        "an even per-replica batch size and drop_remainder=True in tf.data."
    )
