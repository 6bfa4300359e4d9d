"""twins_tf.lora against numpy/PyTorch: AutoLoRa's branch, its switch, merge and main path.

References are written from the paper's parametrisation (Xu et al. 2024; docs/autolora.md):
conv W_nat = W + reshape(B @ A, (out, in, k, k)) / r with A (r*k, in*k), B (out*k, r*k);
dense W_nat = W + B @ A / r.  The convolution reference is PyTorch's F.conv2d on the torch
layout, so the Keras layout transposes are checked too.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

from twins_tf import lora
from twins_tf.models.resnet import build_resnet

RANK = 2


def _conv_model(stride=1, kernel=3, in_ch=3, out_ch=5, size=9):
    inputs = keras.Input((size, size, in_ch))
    x = keras.layers.Conv2D(4, 1, use_bias=False, name="stem")(inputs)
    y = keras.layers.Conv2D(out_ch, kernel, strides=stride, use_bias=False, name="conv")(x)
    h = keras.layers.Dense(6, name="hidden")(keras.layers.GlobalAveragePooling2D()(y))
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(h))


def _randomise_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for branch in lora.lora_branches(model):
        branch.lora_b.assign(rng.normal(size=branch.lora_b.shape).astype("float32"))


def test_conv_and_dense_branches_equal_the_merged_kernels_of_the_paper():
    """Natural forward == conv with W + reshape(B A)/r (PyTorch layout) and dense with
    W + (B A)^T / r; the main forward is the plain model."""
    model = _conv_model(stride=2)
    wrapped = lora.add_lora(model, RANK)
    _randomise_b(wrapped)
    x = np.random.default_rng(1).uniform(size=(2, 9, 9, 3)).astype("float32")
    branches = {b.target: b for b in lora.lora_branches(wrapped)}
    assert sorted(branches) == ["conv", "hidden"]  # not the stem, not the head

    conv = branches["conv"]
    a, b = conv.lora_a.numpy(), conv.lora_b.numpy()
    assert a.shape == (RANK * 3, 4 * 3) and b.shape == (5 * 3, RANK * 3)
    w_torch = model.get_layer("conv").kernel.numpy().transpose(3, 2, 0, 1)  # (out, in, k, k)
    merged_torch = w_torch + (b @ a).reshape(5, 4, 3, 3) / RANK
    stem = model.get_layer("stem")(x).numpy()
    y = (
        F.conv2d(torch.tensor(stem.transpose(0, 3, 1, 2)), torch.tensor(merged_torch), stride=2)
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    dense = branches["hidden"]
    hidden = model.get_layer("hidden")
    w_nat = hidden.kernel.numpy() + (dense.lora_b.numpy() @ dense.lora_a.numpy()).T / RANK
    h = y.mean(axis=(1, 2)) @ w_nat + hidden.bias.numpy()
    fc = model.get_layer("fc")
    expected = h @ fc.kernel.numpy() + fc.bias.numpy()

    with lora.natural_branch():
        natural = wrapped(x).numpy()
    np.testing.assert_allclose(natural, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(wrapped(x).numpy(), model(x).numpy(), rtol=0, atol=0)


def test_initialisation_is_the_papers():
    """conv A ~ N(0, 1), dense A ~ U(+-sqrt(6/in)) (kaiming_uniform_), B = 0: the natural
    path starts equal to the main one."""
    keras.utils.set_random_seed(0)
    model = build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3))
    wrapped = lora.add_lora(model, 8)
    a = np.concatenate([b.lora_a.numpy().ravel() for b in lora.lora_branches(wrapped)])
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1.0) < 0.01
    assert all(not b.lora_b.numpy().any() for b in lora.lora_branches(wrapped))
    dense = lora.add_lora(_conv_model(), RANK).get_layer("hidden_lora").lora_a.numpy()
    bound = np.sqrt(6.0 / 5)
    assert dense.min() >= -bound and dense.max() <= bound and dense.max() > 0.5 * bound
    x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype("float32")
    with lora.natural_branch():
        np.testing.assert_allclose(wrapped(x).numpy(), model(x).numpy(), atol=1e-6)


def test_resnet_targets_are_the_convolutions_inside_the_residual_blocks():
    """The authors' natural thread runs the blocks' convolutions only: not the stem (a plain
    nn.Conv2d), not the shortcuts (called without thread=), not the head."""
    model = build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3))
    targets = [b.target for b in lora.lora_branches(lora.add_lora(model, RANK))]
    assert targets == [
        f"layer{stage}_{block}_conv{conv}"
        for stage in (1, 2, 3, 4)
        for block in (0, 1)
        for conv in (1, 2)
    ]


def test_one_traced_function_runs_both_paths():
    """The switch is read at trace time: one tf.function holds the main and natural forward."""
    wrapped = lora.add_lora(_conv_model(), RANK)
    _randomise_b(wrapped)
    x = np.random.default_rng(2).uniform(size=(2, 9, 9, 3)).astype("float32")

    @tf.function
    def both(images):
        main = wrapped(images, training=True)
        with lora.natural_branch():
            natural = wrapped(images, training=True)
        return main, natural

    main, natural = both(x)
    np.testing.assert_allclose(main.numpy(), wrapped(x).numpy(), atol=1e-6)
    with lora.natural_branch():
        np.testing.assert_allclose(natural.numpy(), wrapped(x).numpy(), atol=1e-6)
    assert np.abs(main.numpy() - natural.numpy()).max() > 1e-3
    assert not lora.branch_active()


def test_merge_equals_the_natural_forward_and_main_branch_the_main_one():
    model = build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3))
    wrapped = lora.add_lora(model, RANK)
    for branch in lora.lora_branches(wrapped):
        branch.lora_b.assign(
            0.01 * np.random.default_rng(3).normal(size=branch.lora_b.shape).astype("float32")
        )
    x = np.random.default_rng(4).uniform(size=(3, 16, 16, 3)).astype("float32")
    with lora.natural_branch():
        natural = wrapped(x).numpy()
    merged = lora.merge_lora(wrapped)
    main = lora.main_branch(wrapped)
    assert not lora.lora_branches(merged) and not lora.lora_branches(main)
    np.testing.assert_allclose(merged(x).numpy(), natural, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(main(x).numpy(), model(x).numpy(), atol=0)
    assert np.abs(natural - model(x).numpy()).max() > 1e-3
    # main_branch shares the variables; merge_lora copies the adapted kernels
    kernel = model.get_layer("layer1_0_conv1").kernel
    kernel.assign(kernel.numpy() * 1.5)
    np.testing.assert_allclose(main(x).numpy(), model(x).numpy(), atol=0)
    assert np.abs(main(x).numpy() - natural).max() > 1e-3
    np.testing.assert_allclose(merged(x).numpy(), natural, rtol=1e-4, atol=1e-5)


def test_keras_file_round_trip_and_weights_load_as_the_plain_network(tmp_path):
    from twins_tf import weights

    model = build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3))
    wrapped = lora.add_lora(model, RANK)
    _randomise_b(wrapped)
    x = np.random.default_rng(5).uniform(size=(2, 16, 16, 3)).astype("float32")
    wrapped.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert len(lora.lora_branches(loaded)) == 16
    with lora.natural_branch():
        np.testing.assert_allclose(loaded(x).numpy(), wrapped(x).numpy(), atol=1e-6)
    # the run's weights file is the evaluated (main) network for every plain loader
    wrapped.save_weights(tmp_path / "m.weights.h5")
    plain = build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3))
    weights.load_pretrained(plain, tmp_path / "m.weights.h5", head=True)
    np.testing.assert_allclose(plain(x).numpy(), model(x).numpy(), atol=0)
    again = lora.add_lora(build_resnet("resnet18", 3, twin=False, input_shape=(16, 16, 3)), RANK)
    again.load_weights(tmp_path / "m.weights.h5")
    with lora.natural_branch():
        np.testing.assert_allclose(again(x).numpy(), wrapped(x).numpy(), atol=1e-6)


def test_errors():
    model = _conv_model()
    with pytest.raises(ValueError, match="positive integer"):
        lora.add_lora(model, 0)
    wrapped = lora.add_lora(model, RANK)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(wrapped, RANK)
    inputs = keras.Input((8, 8, 4))
    grouped = keras.Model(inputs, keras.layers.Conv2D(4, 3, groups=2)(inputs))
    with pytest.raises(ValueError, match="groups=2"):
        lora.add_lora(grouped, RANK, targets=grouped.layers[1:])
