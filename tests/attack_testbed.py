"""A small adversarially trained classifier, in Keras and in PyTorch, for the attack tests.

The AutoAttack tests compare our TensorFlow attacks with the official implementation
(fra31/auto-attack, PyPI `pyautoattack`, PyTorch) on the *same* network.  Robust accuracy only
means something on a model that is somewhat robust, so the network is adversarially trained here
(PGD-AT, Madry et al. 2018) for a few seconds on scikit-learn's `load_digits` (1,797 real 8x8
digits shipped with scikit-learn, no download), upsampled to 16x16 and copied to three channels.
The trained Keras weights are then copied into an identically defined PyTorch module.

Public helpers (the test modules of the attacks import them):
  * `robust_digits(num_train=1400)`: a cached `Testbed` with the Keras model, its PyTorch
    twin, and the held-out images (1,797 - num_train; NHWC, float32, [0, 1]) and labels.  The
    default split (397 test images) is shared by the attack tests; the full-budget oracle test
    needs >= 500 examples and trains on 1,197.
  * `epsilon(norm)`: the attack radius the tests use (L-inf 0.15, L2 2.0; the model is
    trained at L-inf 0.1, so robust accuracy sits around 60 % and attacks differ).
  * `TORCH_NORM`: our norm names to the official code's.
  * `torch_threads(n)`: context manager; PyTorch on this small network is >10x faster
    with one thread than with two (thread hand-off dominates), restored on exit.
  * `torch_nchw(images)`: NHWC numpy images to an NCHW float32 torch tensor.
  * `torch_predict(module, images)`: labels the PyTorch copy predicts for NHWC numpy images
    (an independent judge of whether a returned point is misclassified).
  * `keras_logits(model, images)`, `keras_predict(model, images)`: numpy logits and labels
    of the Keras model in inference mode.
  * `keras_accuracy(model, images, labels)`: accuracy of the Keras model.
  * `hyperplane_problems(n, d, seed)`: random problems for FAB's box-constrained projection
    (`test_fab.py` against scipy, `test_autoattack_official.py` against the official code).
"""

import contextlib
import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf
import torch
from sklearn.datasets import load_digits
from torch import nn

TRAIN_EPSILON = 0.1  # L-inf radius of adversarial training (pixels in [0, 1])
ATTACK_EPSILON = {"linf": 0.15, "l2": 2.0}
TORCH_NORM = {"linf": "Linf", "l2": "L2"}
IMAGE_SIZE = 16
NUM_TRAIN = 1400


@dataclasses.dataclass
class Testbed:
    keras_model: keras.Model
    torch_model: nn.Module
    x_test: np.ndarray  # (n, 16, 16, 3) float32 in [0, 1]
    y_test: np.ndarray  # (n,) int64


def digit_images():
    """All 1,797 digits as (n, 16, 16, 3) float32 images in [0, 1] and int64 labels, shuffled."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    scale = IMAGE_SIZE // 8
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], digits.target[order].astype(np.int64)


def keras_convnet(num_classes=10):
    """Three 3x3 convs (explicit symmetric padding, as PyTorch pads) and two dense layers."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = inputs
    for filters, stride in ((16, 1), (32, 2), (32, 2)):
        x = keras.layers.ZeroPadding2D(1)(x)
        x = keras.layers.Conv2D(filters, 3, strides=stride, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


class TorchConvnet(nn.Module):
    """The PyTorch twin of `keras_convnet` (NCHW input; flattens in NHWC order like Keras)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 16, 3, stride=1, padding=1),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.Conv2d(32, 32, 3, stride=2, padding=1),
            ]
        )
        self.dense = nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.head(torch.relu(self.dense(x)))


def copy_keras_to_torch(model, module):
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    denses = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    with torch.no_grad():
        for layer, conv in zip(convs, module.convs):
            kernel, bias = layer.get_weights()
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(bias))
        for layer, dense in zip(denses, (module.dense, module.head)):
            kernel, bias = layer.get_weights()
            dense.weight.copy_(torch.from_numpy(kernel.T.copy()))
            dense.bias.copy_(torch.from_numpy(bias))
    return module.eval()


def adversarially_train(model, images, labels, *, epsilon, epochs, seed=0):
    """PGD-AT: 5-step L-inf PGD with a random start, Adam, batch 64."""
    keras.utils.set_random_seed(seed)
    optimizer = keras.optimizers.Adam(2e-3)
    step_size = 2.5 * epsilon / 5

    def pgd(x, y):
        x_adv = tf.clip_by_value(x + tf.random.uniform(tf.shape(x), -epsilon, epsilon), 0.0, 1.0)
        for _ in range(5):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = tf.reduce_sum(
                    keras.losses.sparse_categorical_crossentropy(
                        y, model(x_adv, training=False), from_logits=True
                    )
                )
            x_adv = x_adv + step_size * tf.sign(tape.gradient(loss, x_adv))
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)
        return x_adv

    @tf.function
    def train_step(x, y):
        x_adv = pgd(x, y)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, model(x_adv, training=True), from_logits=True
                )
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(images) - 63, 64):
            batch = order[start : start + 64]
            train_step(tf.constant(images[batch]), tf.constant(labels[batch]))
    return model


@functools.lru_cache(maxsize=None)
def robust_digits(epochs=30, num_train=NUM_TRAIN):
    images, labels = digit_images()
    keras.utils.set_random_seed(0)
    model = keras_convnet()
    adversarially_train(
        model, images[:num_train], labels[:num_train], epsilon=TRAIN_EPSILON, epochs=epochs
    )
    module = copy_keras_to_torch(model, TorchConvnet())
    return Testbed(model, module, images[num_train:], labels[num_train:])


def torch_nchw(images):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def keras_logits(model, images):
    return model(tf.constant(images), training=False).numpy()


def keras_predict(model, images):
    return keras_logits(model, images).argmax(-1)


def keras_accuracy(model, images, labels):
    return float(np.mean(keras_predict(model, images) == np.asarray(labels)))


def epsilon(norm):
    return ATTACK_EPSILON[norm]


@contextlib.contextmanager
def torch_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_predict(module, images):
    with torch_threads(1), torch.no_grad():
        return module(torch_nchw(images)).argmax(1).numpy()


def hyperplane_problems(n, d, seed):
    """Points in the box, normals with some zero entries, offsets near and far (some
    unreachable inside the box)."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(size=(n, d))
    w = rng.normal(size=(n, d))
    w[:, :3] = 0.0
    b = np.sum(w * t, 1) + rng.normal(size=n) * rng.choice([0.1, 1.0, 30.0], size=n)
    return t.astype(np.float32), w.astype(np.float32), b.astype(np.float32)
