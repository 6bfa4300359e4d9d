"""TwinBatchNormalization: one BatchNorm layer with two parameter sets (spec §1-2).

Keras's BatchNormalization cannot express TWINS: a twin layer normalises the first half of a
training batch with the *pre-training* population statistics (the Frozen wing) and the second
half with its own batch statistics (the Adaptive wing), each with its own gamma/beta, so the
convolutions run once over the whole batch and only the normalisation differs.  Nothing in
Keras, keras-cv or keras-hub does this, hence our own layer.

Both BN layers here (the twin layer and the plain `BatchNormalization` of the baselines)
follow PyTorch's `nn.BatchNorm2d`, which the pre-trained weights and the reference code come
from, so that TWINS and its plain-BN baselines differ only in the method, never in the BN
arithmetic: normalisation uses the biased batch variance, the moving variance is updated with
the unbiased one (times n/(n-1), n = elements per channel), momentum 0.9 in Keras's
convention (PyTorch's 0.1), epsilon 1e-5.  With `synchronized=True` under `tf.distribute` the
batch statistics are `nn.SyncBatchNorm`'s: mean and variance over every replica's examples,
n the global count.  Statistics and the affine transform are computed in float32 under mixed
precision, as in Keras's BatchNormalization.  Both layers compute a training forward with the
one function `batch_norm_training`, which is why they share this module (over 400 lines).

Distribution: the twin layer's moving statistics are created with `aggregation="mean"`, so
under `tf.distribute` every replica's EMA update is averaged across replicas and the copies
stay identical (Keras's BN, and so the plain layer, keeps per-replica values that drift
apart unless `synchronized=True` gives every replica the same batch statistics, which is
how `build_model` builds a plain model for several replicas).  For the twin layer
`synchronized=True` additionally computes the Adaptive wing's batch statistics over all
replicas' halves.
"""

import keras
import tensorflow as tf
from keras import ops

from twins_tf.platform import keras_private

TWIN = "twin"
FROZEN = "frozen"
ADAPTIVE = "adaptive"
MODES = (TWIN, FROZEN, ADAPTIVE)


# --- a training-mode BatchNorm, shared by both layers ---------------------------------------
# Batch statistics run TensorFlow's FusedBatchNormV3 op, and FusedBatchNormGradV3 in the
# backward pass, where the layout allows it, instead of the elementwise graph of Keras 3's
# `ops.moments` + `ops.batch_normalization`: the fused kernels read the activations once or
# twice instead of five to eight times, and the fused gradient replaces the chain rule through
# mean and variance (every training forward of every method pays for BN).  The raw op is
# called because `tf.nn.fused_batch_norm` raises epsilon to at least 1.001e-5 (a cuDNN
# limit), which would move us off PyTorch's 1e-5.  It returns the *unbiased* batch variance
# (pinned in tests/test_layers.py), what the EMA needs, and normalises with the biased one,
# as PyTorch does.  What the op cannot take (a channel axis that is not the last, statistics
# across replicas, a mask, no gamma or beta, float64) keeps the composed ops, with the same
# numerics.
#
# Population statistics (inference, and the Frozen wing) stay the per-channel affine map
# `x * a + b`, `a = gamma / sqrt(var + eps)`, `b = beta - mean * a`
# (`ops.batch_normalization`), not the fused op in inference mode, on purpose: it is
# PyTorch's own eval-mode arithmetic, so the attack's input gradients keep their signs where
# they are close to zero (the fused op rounds differently and flipped 8 of 49152 PGD pixel
# steps in tests/test_trainer.py's ResNet-18 parity test), and its backward is one
# multiplication, where FusedBatchNormGradV3 would also reduce for the gamma and beta
# gradients an attack never uses.
def _fused_batch_norm(x, gamma, beta, epsilon):
    """(y, batch mean, unbiased batch variance): FusedBatchNormV3 in training mode on `x`
    with the channel axis last, any rank >= 2 (reshaped to rank 4 for the op)."""
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


def _sync_context(synchronized):
    """The replica context to all-reduce statistics in, or None for local statistics."""
    if not synchronized:
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _batch_moments(x, channel_axis, sync_context=None, mask=None):
    """(mean, biased variance, count) per channel; count = elements the statistics cover.

    With a replica context the sums run over every replica's elements (`nn.SyncBatchNorm`):
    the global mean first, then the global sum of squared deviations from it (two passes,
    not E[x^2] - E[x]^2, which cancels catastrophically when the mean is large).  Under
    `tf.distribute` the all-reduces are differentiable, so the backward pass is global too.
    With a mask (shape: `x`'s without the channel axis), masked-out elements count for
    nothing, as in Keras's BatchNormalization.
    """
    axes = [a for a in range(len(x.shape)) if a != channel_axis]
    if sync_context is None and mask is None:
        mean, variance = ops.moments(x, axes=axes)
        shape = ops.shape(x)
        count = 1
        for a in axes:
            count = count * shape[a]
        return mean, variance, ops.cast(count, x.dtype)
    ones = ops.ones_like(x)
    if mask is not None:
        ones = ones * ops.cast(ops.expand_dims(mask, channel_axis), x.dtype)
    sums = ops.stack([ops.sum(x * ones, axis=axes), ops.sum(ones, axis=axes)])
    if sync_context is not None:
        sums = sync_context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
    total, count = sums[0], sums[1]
    mean = ops.divide_no_nan(total, count)
    squares = ops.sum(ops.square(x - _broadcastable(mean, x, channel_axis)) * ones, axis=axes)
    if sync_context is not None:
        squares = sync_context.all_reduce(tf.distribute.ReduceOp.SUM, squares)
    return mean, ops.divide_no_nan(squares, count), count


def _broadcastable(per_channel, x, channel_axis):
    shape = [1] * len(x.shape)
    shape[channel_axis] = -1
    return ops.reshape(per_channel, shape)


def batch_norm_training(x, gamma, beta, *, axis, epsilon, synchronized=False, mask=None):
    """A training-mode BatchNorm as `nn.BatchNorm2d` (`nn.SyncBatchNorm` when synchronized).

    Args:
      x: float32 or float64 input.
      gamma, beta: per-channel scale and offset in `x`'s dtype, or None for none.
      axis: the channel axis.
      epsilon: added to the biased batch variance before the square root.
      synchronized: statistics over all replicas of a `tf.distribute` strategy (none without
        one).
      mask: optional, `x`'s shape without the channel axis; zeros leave elements out of the
        statistics.

    Returns:
      (y, batch mean, unbiased batch variance): y normalised with the biased variance; the
      unbiased one, times n/(n-1) with n the (global) elements per channel, is what the
      moving variance takes.  With n = 1 it is 0 (PyTorch refuses to train on one value).
    """
    channel_axis = axis % len(x.shape)
    sync_context = _sync_context(synchronized)
    if (
        channel_axis == len(x.shape) - 1
        and len(x.shape) >= 2
        and sync_context is None
        and mask is None
        and gamma is not None
        and beta is not None
        and x.dtype == "float32"
    ):
        # With one element per channel the kernel returns a zero variance, as the
        # composed path's n / max(n - 1, 1) does (pinned in tests/test_layers.py).
        return _fused_batch_norm(x, gamma, beta, epsilon)
    mean, variance, count = _batch_moments(x, channel_axis, sync_context, mask)
    unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
    y = ops.batch_normalization(
        x, mean, variance, axis=channel_axis, offset=beta, scale=gamma, epsilon=epsilon
    )
    return y, mean, unbiased


def _update_moving_statistics(layer, mean, unbiased_variance):
    """PyTorch's running-statistics EMA in Keras's momentum convention (0.9 = PyTorch 0.1)."""
    m = layer.momentum
    for variable, batch in ((layer.moving_mean, mean), (layer.moving_variance, unbiased_variance)):
        variable.assign(variable * m + ops.cast(batch, variable.dtype) * (1.0 - m))


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
        y, mean, unbiased = batch_norm_training(
            x,
            self.gamma,
            self.beta,
            axis=self._channel_axis,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
        )
        _update_moving_statistics(self, mean, unbiased)
        return y

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


# --- plain BatchNormalization -------------------------------------------------------------
@keras.saving.register_keras_serializable(package="twins_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras's BatchNormalization with `nn.BatchNorm2d`'s training step, for the baselines.

    The plain-BN methods (clean, AT, TRADES, L2-SP, AutoLoRa) are compared with TWINS and
    reproduce reference code written with `nn.BatchNorm2d`; Keras's own training step (the
    moving variance updated with the *biased* batch variance, (n-1)/n of PyTorch's) would
    confound both.  So the training forward is `batch_norm_training`, as the twin layer's
    Adaptive wing: the unbiased EMA, `synchronized=True` as `nn.SyncBatchNorm` under
    `tf.distribute`, the fused kernel where the layout allows it.  Build it with momentum 0.9
    for PyTorch's 0.1.  Inference (moving statistics, or `trainable=False`) is Keras's own
    affine map, the arithmetic of PyTorch's eval-mode BN.

    Everything else is Keras's layer: arguments, weights, config and files.  The class name is
    Keras's on purpose: `model.save_weights` files name a layer's group after its class
    (`batch_normalization_3`), so weights files of plain models interchange with those of
    Keras's BN both ways.  `renorm=True` is refused: PyTorch has no batch renormalisation to
    follow (use `keras.layers.BatchNormalization` for it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.renorm:
            raise ValueError(
                f"{self.name}: twins_tf's BatchNormalization follows nn.BatchNorm2d, which has "
                "no batch renormalisation; use keras.layers.BatchNormalization(renorm=True)."
            )

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=False, mask=mask)
        inputs = ops.convert_to_tensor(inputs)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        dtype = "float64" if inputs.dtype == "float64" else "float32"
        x = ops.cast(inputs, dtype)
        y, mean, unbiased = batch_norm_training(
            x,
            ops.cast(self.gamma, dtype) if self.scale else None,
            ops.cast(self.beta, dtype) if self.center else None,
            axis=self.axis,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            mask=mask,
        )
        _update_moving_statistics(self, mean, unbiased)
        return ops.cast(y, self.compute_dtype)
