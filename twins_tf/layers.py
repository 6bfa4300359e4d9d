"""TwinBatchNormalization: one BatchNorm layer with two parameter sets (spec §1-2).

Keras's BatchNormalization cannot express TWINS: a twin layer normalises the first half of a
training batch with the *pre-training* population statistics (the Frozen wing) and the second
half with its own batch statistics (the Adaptive wing), each with its own gamma/beta, so the
convolutions run once over the whole batch and only the normalisation differs.  Nothing in
Keras, keras-cv or keras-hub does this, hence our own layer.

Numerics follow PyTorch's BatchNorm2d, which the pre-trained weights come from:
normalisation uses the biased batch variance, the moving variance is updated with the
unbiased one (times n/(n-1), n = elements per channel), momentum 0.9 in Keras's convention
(PyTorch's 0.1), epsilon 1e-5.  Statistics and the affine transform are computed in float32
under mixed precision, as in Keras's BatchNormalization.

Distribution: the moving statistics are created with `aggregation="mean"`, so under
`tf.distribute` every replica's EMA update is averaged across replicas and the copies stay
identical (plain Keras BN keeps per-replica values that drift apart).  `synchronized=True`
additionally computes the Adaptive wing's batch statistics over all replicas' halves.
"""

import keras
import tensorflow as tf
from keras import ops

from twins_tf.platform import keras_private

TWIN = "twin"
FROZEN = "frozen"
ADAPTIVE = "adaptive"
MODES = (TWIN, FROZEN, ADAPTIVE)


@keras.saving.register_keras_serializable(package="twins_tf")
class TwinBatchNormalization(keras.layers.Layer):
    """Two-wing BatchNorm (TWINS, Liu et al., CVPR 2023).

    Weights:
      * Adaptive wing: `gamma`, `beta` (trainable), `moving_mean`, `moving_variance`
        (updated by EMA in training).
      * Frozen wing: `frozen_gamma`, `frozen_beta` (trainable), `frozen_mean`,
        `frozen_variance` (non-trainable and never assigned after construction/loading).

    Forward passes:
      * `training=True`, `mode="twin"` (the default): rows `[0, B/2)` go through the Frozen
        wing (population statistics), rows `[B/2, B)` through the Adaptive wing (batch
        statistics of that half, EMA update of its moving statistics).  B must be even.
      * `training=False`: the whole batch through the Adaptive wing with moving statistics.
      * `mode="frozen"`: the whole batch through the Frozen wing, training or not (analysis).
      * `mode="adaptive"`: the whole batch through the Adaptive wing as a plain BN layer.
    As with Keras BatchNormalization, a layer with `trainable=False` always runs in
    inference mode.

    Args:
      axis: the channel axis (-1 for NHWC).
      momentum: EMA momentum of the moving statistics, Keras convention (0.9 = PyTorch 0.1).
      epsilon: added to the variance before the square root.
      synchronized: compute the Adaptive wing's batch statistics across all replicas.
      mode: one of "twin", "frozen", "adaptive" (see above).

    Example:
      >>> layer = TwinBatchNormalization()
      >>> y = layer(keras.random.normal((8, 4, 4, 16)), training=True)
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.9,
        epsilon=1e-5,
        synchronized=False,
        mode=TWIN,
        gamma_initializer="ones",
        beta_initializer="zeros",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {mode!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{self.name}: momentum must be in [0, 1), got {momentum}.")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)
        self.mode = mode
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        self._channel_axis = self.axis % rank
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(f"{self.name}: the channel axis {self.axis} has unknown size.")
        self._reduction_axes = [a for a in range(rank) if a != self._channel_axis]
        self.input_spec = keras.InputSpec(ndim=rank, axes={self._channel_axis: channels})
        shape = (channels,)

        def weight(name, init, trainable, aggregation="none"):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=init,
                trainable=trainable,
                autocast=False,  # statistics and affine stay float32 under mixed precision
                aggregation=aggregation,
            )

        self.gamma = weight("gamma", self.gamma_initializer, True)
        self.beta = weight("beta", self.beta_initializer, True)
        self.moving_mean = weight("moving_mean", self.moving_mean_initializer, False, "mean")
        self.moving_variance = weight(
            "moving_variance", self.moving_variance_initializer, False, "mean"
        )
        self.frozen_gamma = weight("frozen_gamma", self.gamma_initializer, True)
        self.frozen_beta = weight("frozen_beta", self.beta_initializer, True)
        self.frozen_mean = weight("frozen_mean", self.moving_mean_initializer, False)
        self.frozen_variance = weight("frozen_variance", self.moving_variance_initializer, False)

    # --- the two wings -------------------------------------------------------------------
    # Batch statistics (the Adaptive wing in training) run TensorFlow's FusedBatchNormV3 op,
    # and FusedBatchNormGradV3 in the backward pass, where the layout allows it, instead of
    # the elementwise graph of Keras 3's `ops.moments` + `ops.batch_normalization`: the fused
    # kernels read the activations once or twice instead of five to eight times, and the
    # fused gradient replaces the chain rule through mean and variance.  The raw op is called
    # because `tf.nn.fused_batch_norm` raises epsilon to at least 1.001e-5 (a cuDNN limit),
    # which would move us off PyTorch's 1e-5.  It returns the *unbiased* batch variance
    # (pinned in tests/test_layers.py), what the EMA needs, and normalises with the biased
    # one, as PyTorch does.  Layouts the op cannot take (a channel axis that is not the
    # last, a synchronized batch statistic) keep the composed ops, with the same numerics.
    #
    # Population statistics (inference, and the Frozen wing) stay the per-channel affine map
    # `x * a + b`, `a = gamma / sqrt(var + eps)`, `b = beta - mean * a`
    # (`ops.batch_normalization`), not the fused op in inference mode, on purpose: it is
    # PyTorch's own eval-mode arithmetic, so the attack's input gradients keep their signs
    # where they are close to zero (the fused op rounds differently and flipped 8 of 49152
    # PGD pixel steps in tests/test_trainer.py's ResNet-18 parity test), and its backward is
    # one multiplication, where FusedBatchNormGradV3 would also reduce for the gamma and beta
    # gradients an attack never uses.
    def _fusable(self, x):
        return self._channel_axis == len(x.shape) - 1 and len(x.shape) >= 2

    def _as_nhwc(self, x):
        """x with the channel axis last, as rank 4 (N, 1, spatial, C) for the fused op."""
        if len(x.shape) == 4:
            return x
        shape = tf.shape(x)
        return tf.reshape(x, tf.stack([shape[0], 1, -1, shape[-1]]))

    def _fused(self, x, gamma, beta):
        """(y, batch mean, unbiased batch variance) of a batch-statistics normalisation."""
        empty = tf.zeros([0], tf.float32)
        y, batch_mean, batch_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=self._as_nhwc(x),
            scale=gamma,
            offset=beta,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        if len(x.shape) != 4:
            y = tf.reshape(y, tf.shape(x))
        return y, batch_mean, batch_variance

    def _normalize(self, x, mean, variance, gamma, beta):
        return ops.batch_normalization(
            x,
            mean,
            variance,
            axis=self._channel_axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )

    def _frozen_wing(self, x):
        return self._normalize(
            x, self.frozen_mean, self.frozen_variance, self.frozen_gamma, self.frozen_beta
        )

    def _adaptive_wing(self, x, training):
        if not training:
            return self._normalize(x, self.moving_mean, self.moving_variance, self.gamma, self.beta)
        if self._fusable(x) and not self.synchronized:
            # With one element per channel the kernel returns a zero variance, as the
            # composed path's n / max(n - 1, 1) does (pinned in tests/test_layers.py).
            y, mean, unbiased = self._fused(x, self.gamma, self.beta)
        else:
            mean, variance = ops.moments(
                x, axes=self._reduction_axes, synchronized=self.synchronized
            )
            count = ops.cast(self._elements_per_channel(x), "float32")
            unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
            y = self._normalize(x, mean, variance, self.gamma, self.beta)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + unbiased * (1.0 - m))
        return y

    def _elements_per_channel(self, x):
        shape = ops.shape(x)
        count = 1
        for a in self._reduction_axes:
            count = count * shape[a]
        if self.synchronized:
            count = count * tf.distribute.get_replica_context().num_replicas_in_sync
        return count

    # --- forward -------------------------------------------------------------------------
    def call(self, inputs, training=None, mask=None):
        del mask  # accepted so the layer drops in wherever a BatchNormalization was
        x = ops.cast(inputs, "float32")
        training = bool(training) and self.trainable
        if self.mode == FROZEN:
            y = self._frozen_wing(x)
        elif self.mode == ADAPTIVE or not training:
            y = self._adaptive_wing(x, training)
        else:
            frozen_half, adaptive_half = self._split_batch(x)
            y = ops.concatenate(
                [self._frozen_wing(frozen_half), self._adaptive_wing(adaptive_half, True)],
                axis=0,
            )
        return ops.cast(y, self.compute_dtype)

    def _split_batch(self, x):
        """Rows [0, B/2) and [B/2, B); an odd B is an error, never a silent uneven split.

        One `tf.split`, not two slices: its gradient is one concatenation, where each slice's
        gradient (StridedSliceGrad) writes a zero-padded batch-sized tensor and the two are
        then added (3 % of a ResNet-18 TWINS-AT step in benchmarks/profile_step.py).
        """
        static_batch = x.shape[0]
        if static_batch is not None:
            if static_batch % 2:
                raise ValueError(self._odd_batch_message(static_batch))
        else:
            batch = tf.shape(x)[0]
            # Effective in graph mode; XLA drops Assert ops, which is why the trainer also
            # checks the per-replica batch size before training starts.
            with tf.control_dependencies(
                [tf.debugging.assert_equal(batch % 2, 0, message=self._odd_batch_message("odd"))]
            ):
                x = tf.identity(x)
        frozen_half, adaptive_half = tf.split(x, 2, axis=0)
        return frozen_half, adaptive_half

    def _odd_batch_message(self, batch):
        from twins_tf.methods import odd_batch_message  # the one text, shared with the trainer

        return odd_batch_message(batch, layer=self.name)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            mode=self.mode,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            beta_initializer=keras.initializers.serialize(self.beta_initializer),
            moving_mean_initializer=keras.initializers.serialize(self.moving_mean_initializer),
            moving_variance_initializer=keras.initializers.serialize(
                self.moving_variance_initializer
            ),
        )
        return config


def set_twin_mode(model, mode):
    """Set `mode` ("twin", "frozen" or "adaptive") on every TwinBatchNormalization in `model`.

    The mode is read when a function is traced, so call this before (re)compiling.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    layers = twin_layers(model)
    for layer in layers:
        layer.mode = mode
    return len(layers)


def twin_layers(model):
    """All TwinBatchNormalization layers of a (possibly nested) Keras model."""
    return [
        layer
        for layer in keras_private.flatten_layers(model)
        if isinstance(layer, TwinBatchNormalization)
    ]


# --- plain BatchNormalization on the fused kernel ------------------------------------------
def _fused_batch_statistics(x, gamma, beta, epsilon):
    """(y, batch mean, unbiased batch variance): TensorFlow's FusedBatchNormV3 in training
    mode on `x` with the channel axis last, any rank >= 2 (reshaped to rank 4 for the op).

    Its gradient is FusedBatchNormGradV3, one kernel for x, gamma and beta.  The raw op, not
    `tf.nn.fused_batch_norm`, which raises epsilon to at least 1.001e-5 (a cuDNN limit) and
    would move us off PyTorch's 1e-5.  The op normalises with the biased variance and returns
    the unbiased one (pinned in tests/test_layers.py).
    """
    rank4 = x
    if len(x.shape) != 4:
        shape = tf.shape(x)
        rank4 = tf.reshape(x, tf.stack([shape[0], 1, -1, shape[-1]]))
    empty = tf.zeros([0], tf.float32)
    y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=rank4,
        scale=gamma,
        offset=beta,
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    if len(x.shape) != 4:
        y = tf.reshape(y, tf.shape(x))
    return y, mean, variance


@keras.saving.register_keras_serializable(package="twins_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras's BatchNormalization whose training forward runs TensorFlow's fused kernel.

    The same layer, arguments, weights, config and results as `keras.layers.BatchNormalization`
    (it is a subclass and only `call` differs), so it loads Keras BN weights and its weights
    load into a Keras BN.  Keras 3 computes training-mode BN from composed elementwise ops
    (`ops.moments`, then `tf.nn.batch_normalization`) that read the activations five to eight
    times in the forward and again through the chain rule in the backward; here the batch
    statistics, the normalisation and their gradient are FusedBatchNormV3 /
    FusedBatchNormGradV3, which read them once or twice (issue 11: every training forward of
    the AT, TRADES, clean and L2-SP methods pays for BN).

    Kept from Keras on purpose:
      * the moving variance is updated with the *biased* batch variance, as Keras's layer
        does (PyTorch uses the unbiased one; `TwinBatchNormalization` follows PyTorch);
      * inference (moving statistics) is Keras's own per-channel affine map `x * a + b`, the
        arithmetic of PyTorch's eval-mode BN: the fused op in inference mode rounds
        differently, which flips PGD gradient signs where they are near zero (see
        `TwinBatchNormalization`), and its backward would also reduce for gamma and beta
        gradients an attack never uses.
    Layouts or options the fused op cannot take (a channel axis that is not the last, a
    mask, `synchronized=True`, batch renormalisation, `center`/`scale` False, float64) run
    Keras's own `call`.

    The class name is Keras's on purpose: `model.save_weights` files name a layer's group
    after its class (`batch_normalization_3`), so the same name keeps weights files of plain
    models interchangeable with those written by Keras's BN (older runs, other code).
    """

    def _fusable(self, inputs, training, mask):
        return (
            bool(training)
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and self.scale
            and self.center
            and len(inputs.shape) >= 2
            and self.axis % len(inputs.shape) == len(inputs.shape) - 1
            and inputs.dtype != "float64"
        )

    def call(self, inputs, training=None, mask=None):
        inputs = ops.convert_to_tensor(inputs)
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, "float32")
        y, mean, unbiased = _fused_batch_statistics(x, self.gamma, self.beta, self.epsilon)
        count = ops.cast(ops.size(x) // ops.shape(x)[-1], "float32")
        variance = unbiased * ops.maximum(count - 1.0, 0.0) / count  # Keras's biased update
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return ops.cast(y, self.compute_dtype)
