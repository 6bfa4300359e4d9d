"""build_resnet against a PyTorch torchvision-layout ResNet (tests/torch_resnet.py).

The reference network runs in PyTorch with random weights and random BN statistics; its
checkpoint is saved the way the robustness library saves it, read and loaded through
twins_tf.weights, and the Keras logits must equal PyTorch's to 1e-4 relative to the largest
logit.  An element-wise relative tolerance would be meaningless for logits
near zero, so the criterion is max|keras - torch| <= 1e-4 * max|torch|.
"""

import copy
import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from torch_resnet import (
    ARCH_SPECS,
    TorchPixelResNet,
    save_robustness_checkpoint,
    torch_logits,
    torch_resnet,
)

from twins_tf.layers import TwinBatchNormalization
from twins_tf.models import (
    FoldedConvBatchNormalization,
    build_resnet,
    fold_batch_norm,
)
from twins_tf.models.resnet import ARCHITECTURES
from twins_tf.weights import load_torch_state_dict, read_torch_checkpoint

RELATIVE_TOLERANCE = 1e-4
BATCH = 2

# torchvision's published parameter counts (torchvision.models documentation).
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """arch -> (torch net, state dict read back from a robustness-format checkpoint), cached."""
    directory = tmp_path_factory.mktemp("checkpoints")

    @functools.lru_cache(maxsize=None)
    def get(arch):
        net = torch_resnet(arch, 1000, seed=sorted(ARCH_SPECS).index(arch))
        path = save_robustness_checkpoint(net, directory / f"{arch}.ckpt")
        return net, read_torch_checkpoint(path)

    return get


def images(size, seed=0):
    """Batch of NHWC images, slightly outside [0, 1] so the clamp is exercised too."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.05, 1.05, (BATCH, size, size, 3)).astype(np.float32)


def assert_logits_close(actual, expected):
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= RELATIVE_TOLERANCE * scale, f"max error {error:.3g} vs max logit {scale:.3g}"


def loaded_model(reference, arch, size, twin, upsample=1):
    net, state_dict = reference(arch)
    model = build_resnet(arch, 1000, twin=twin, input_shape=(size, size, 3), upsample=upsample)
    load_torch_state_dict(model, state_dict, head=True)
    return net, model


@pytest.mark.parametrize("twin", [True, False], ids=["twin", "plain"])
@pytest.mark.parametrize(
    "arch,size,upsample",
    [
        ("resnet18", 64, 1),
        ("resnet18", 224, 1),
        ("resnet18", 32, 7),
        ("resnet50", 64, 1),
        ("resnet50", 224, 1),
        ("resnet50", 32, 7),
    ],
)
def test_inference_logits_match_pytorch(reference, arch, size, upsample, twin):
    net, model = loaded_model(reference, arch, size, twin, upsample)
    x = images(size)
    assert_logits_close(model(x, training=False).numpy(), torch_logits(net, x, upsample))


@pytest.mark.parametrize("arch", ["resnet34", "wide_resnet50_2"])
def test_other_architectures_match_pytorch(reference, arch):
    net, model = loaded_model(reference, arch, 64, twin=False)
    x = images(64, seed=1)
    assert_logits_close(model(x, training=False).numpy(), torch_logits(net, x))


def test_twin_training_forward_matches_pytorch_eval_and_train_halves(reference):
    """Training forward: first half = Frozen wing = PyTorch eval; second half = PyTorch BN with
    batch statistics of that half.  Proves both wings received the checkpoint's BN."""
    net, model = loaded_model(reference, "resnet18", 64, twin=True)
    x = images(64, seed=2)
    x = np.concatenate([x, images(64, seed=3)])  # 4 images: halves of 2
    keras_out = model(x, training=True).numpy()
    frozen_reference = torch_logits(net, x[:2])
    wrapper = TorchPixelResNet(copy.deepcopy(net)).train()  # BN on batch statistics
    with torch.no_grad():
        adaptive_reference = wrapper(torch.from_numpy(x[2:].transpose(0, 3, 1, 2))).numpy()
    assert_logits_close(keras_out[:2], frozen_reference)
    assert_logits_close(keras_out[2:], adaptive_reference)


def test_input_gradients_match_pytorch_including_saturated_pixels(reference):
    """Attacks need the clamp's gradient: 1 on the closed interval [0, 1], as torch.clamp."""
    net, model = loaded_model(reference, "resnet18", 32, twin=True, upsample=2)
    x = images(32, seed=4)
    x[:, :4] = 0.0  # exactly on the clamp's boundaries
    x[:, 4:8] = 1.0
    x[:, 8:10] = 1.5  # outside: zero gradient in both
    weights = np.random.default_rng(5).normal(size=(BATCH, 1000)).astype(np.float32)

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        objective = tf.reduce_sum(model(xt, training=False) * weights)
    keras_grad = tape.gradient(objective, xt).numpy()

    wrapper = TorchPixelResNet(net, upsample=2).eval()
    xp = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    (wrapper(xp) * torch.from_numpy(weights)).sum().backward()
    torch_grad = xp.grad.numpy().transpose(0, 2, 3, 1)

    assert np.count_nonzero(torch_grad[:, :8]) > 0.9 * torch_grad[:, :8].size  # test has teeth
    scale = np.abs(torch_grad).max()
    assert np.abs(keras_grad - torch_grad).max() <= RELATIVE_TOLERANCE * scale
    assert np.all(keras_grad[:, 8:10] == 0.0)
    assert np.sign(keras_grad[:, :8]).tolist() == np.sign(torch_grad[:, :8]).tolist()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameters_and_layer_names_match_torchvision(arch):
    model = build_resnet(arch, 1000, twin=False, input_shape=(None, None, 3))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == TORCHVISION_PARAMETERS[arch]
    # Every torchvision module with weights has its layer, named by replacing "." with "_".
    module_names = {k.rsplit(".", 1)[0] for k in torch_resnet(arch, 1000).state_dict()}
    layer_names = {l.name for l in model.layers if l.weights}
    assert {n.replace(".", "_") for n in module_names} == layer_names


def test_twin_model_uses_twin_layers_with_pytorch_constants():
    twin = build_resnet("resnet18", 10, twin=True, input_shape=(32, 32, 3))
    plain = build_resnet("resnet18", 10, twin=False, input_shape=(32, 32, 3))
    twin_bns = [l for l in twin.layers if isinstance(l, TwinBatchNormalization)]
    plain_bns = [l for l in plain.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(twin_bns) == len(plain_bns) == 20
    for layer in twin_bns + plain_bns:
        assert layer.momentum == pytest.approx(0.9) and layer.epsilon == pytest.approx(1e-5)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in twin.layers)


@pytest.mark.parametrize("arch,fan_in", [("resnet18", 512), ("resnet50", 2048)])
def test_head_is_initialised_uniform_one_over_sqrt_fan_in(arch, fan_in):
    keras.utils.set_random_seed(0)
    model = build_resnet(arch, 300, twin=False, input_shape=(None, None, 3))
    bound = 1.0 / math.sqrt(fan_in)
    kernel, bias = (w.numpy() for w in model.get_layer("fc").weights)
    assert kernel.shape == (fan_in, 300) and bias.shape == (300,)
    for values in (kernel, bias):
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.95 * bound  # spread over the whole interval
    # U(-b, b) has standard deviation b / sqrt(3); 600k samples pin it to well under 1%.
    assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_upsample_is_nearest_neighbour_repetition():
    model = build_resnet("resnet18", 10, twin=False, input_shape=(8, 8, 3), upsample=7)
    x = images(8, seed=6)
    upsampled = keras.Model(model.input, model.get_layer("upsample").output)(x).numpy()
    np.testing.assert_array_equal(upsampled, np.repeat(np.repeat(x, 7, axis=1), 7, axis=2))
    assert "upsample" not in {l.name for l in build_resnet("resnet18", 10).layers}


def test_model_config_round_trip():
    model = build_resnet("resnet18", 10, twin=True, input_shape=(32, 32, 3), upsample=2)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = images(32, seed=7)
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(arch="resnet20", num_classes=10), "unknown arch"),
        (dict(arch="resnet18", num_classes=0), "num_classes"),
        (dict(arch="resnet18", num_classes=10, upsample=0), "upsample"),
        (dict(arch="resnet18", num_classes=10, upsample=1.5), "upsample"),
        (dict(arch="resnet18", num_classes=10, input_shape=(32, 32)), "input_shape"),
        (dict(arch="resnet18", num_classes=10, input_shape=(3, 32, 32)), "input_shape"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    arch = kwargs.pop("arch")
    num_classes = kwargs.pop("num_classes")
    with pytest.raises(ValueError, match=message) as info:
        build_resnet(arch, num_classes, **kwargs)
    assert "\n" not in str(info.value)


def _one_at_step_moving_means(strategy, synchronized, batch):
    """Moving means of every BN after one AT step of a plain ResNet-18 under `strategy`:
    one array per replica per layer."""
    from twins_tf import AdversarialTrainer
    from twins_tf.attacks import PGD

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_resnet(
            "resnet18", 4, twin=False, input_shape=(16, 16, 3), synchronized=synchronized
        )
        trainer = AdversarialTrainer(model, method="at", attack=PGD(8 / 255, 2 / 255, 1))
        trainer.compile(keras.optimizers.SGD(0.01, momentum=0.9))
    dataset = tf.data.Dataset.from_tensor_slices(batch).batch(len(batch[0]))
    trainer.fit(dataset, epochs=1, verbose=0)
    return {
        layer.name: [
            np.asarray(copy)
            for copy in strategy.experimental_local_results(layer.moving_mean.value)
        ]
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def test_plain_model_on_two_replicas_keeps_equal_moving_statistics():
    """Keras BN keeps one moving-statistics copy per replica, each updated from its own
    replica's batch; `synchronized=True` (what `train` uses for plain models on several
    replicas) must keep the copies equal, and equal to a one-device step on the global batch
    (unsynchronized copies fail both: each replica saw other images)."""
    rng = np.random.default_rng(0)
    batch = (
        rng.uniform(size=(8, 16, 16, 3)).astype("float32"),
        rng.integers(0, 4, size=8).astype("int32"),
    )
    # Reduction through one device, not collective ops: TensorFlow numbers collective
    # instances per strategy, so several strategies over the same devices in one process
    # clash ("Shape mismatch in the collective instance", tensorflow/tensorflow#62790).
    mirrored = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    one_device = _one_at_step_moving_means(tf.distribute.get_strategy(), False, batch)
    synced = _one_at_step_moving_means(mirrored, True, batch)
    for name, (reference,) in one_device.items():
        first, second = synced[name]
        np.testing.assert_allclose(first, second, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-5, err_msg=name)


# --- the BN-folded inference view (twins_tf.models.folding) -------------------------------------
def _input_gradient_keras(model, x, weights):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        objective = tf.reduce_sum(model(xt, training=False) * weights)
    return tape.gradient(objective, xt).numpy()


def _input_gradient_torch(net, x, weights, upsample):
    wrapper = TorchPixelResNet(net, upsample=upsample).eval()
    xp = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    (wrapper(xp) * torch.from_numpy(weights)).sum().backward()
    return xp.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("twin", [True, False], ids=["twin", "plain"])
@pytest.mark.parametrize("arch,size,upsample", [("resnet18", 32, 2), ("resnet50", 64, 1)])
def test_folded_model_matches_pytorch_logits_and_input_gradients(
    reference, arch, size, upsample, twin
):
    """What the attack needs from the folded view: PyTorch's eval-mode logits and input
    gradients, with every conv + BN pair folded (none left unfolded).

    The input gradient is held to a looser bound than the unfolded model's: with oneDNN on
    (TensorFlow's default on x86), the folded ResNet-50's gradient differs from PyTorch's by
    1.5e-4 of the largest entry on average and 2.5e-3 at most (measured on this test's data;
    the unfolded model: 2e-6).  With TF_ENABLE_ONEDNN_OPTS=0 the folded model is as close as
    the unfolded one, so it is the kernels oneDNN picks for the folded graph, not the folding.
    A wrong fold (a kernel scaled on the wrong axis, a missing bias, the wrong statistics) is
    off by O(1).  The sign, which an L-inf attack steps along, may flip only where the
    reference's entry is within that rounding of zero: wherever it exceeds the error bound
    asserted here, the signs must agree, on any CPU's kernels."""
    net, model = loaded_model(reference, arch, size, twin, upsample)
    folded = fold_batch_norm(model)
    assert sum(isinstance(l, FoldedConvBatchNormalization) for l in folded.layers) == len(
        [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    )
    assert not any(
        isinstance(l, (TwinBatchNormalization, keras.layers.BatchNormalization))
        for l in folded.layers
    )
    x = images(size, seed=8)
    assert_logits_close(folded(x, training=False).numpy(), torch_logits(net, x, upsample))
    weights = np.random.default_rng(9).normal(size=(BATCH, 1000)).astype(np.float32)
    keras_grad = _input_gradient_keras(folded, x, weights)
    torch_grad = _input_gradient_torch(net, x, weights, upsample)
    error, scale = np.abs(keras_grad - torch_grad), np.abs(torch_grad).max()
    assert error.max() <= 1e-2 * scale and error.mean() <= 1e-3 * scale
    away_from_zero = np.abs(torch_grad) > 1e-2 * scale
    # most entries are that far from zero (85-87 % here): a bound that left most unchecked
    # would test nothing
    assert away_from_zero.mean() > 0.5
    assert np.array_equal(np.sign(keras_grad[away_from_zero]), np.sign(torch_grad[away_from_zero]))


def test_folded_model_follows_the_source_weights_and_the_frozen_mode(reference):
    """The view shares the source's variables: new moving statistics (training) and the
    Frozen wing (mode "frozen") show up without re-folding."""
    _, model = loaded_model(reference, "resnet18", 32, twin=True)
    folded = fold_batch_norm(model)
    x = images(32, seed=10)
    rng = np.random.default_rng(11)
    for layer in model.layers:
        if isinstance(layer, TwinBatchNormalization):
            channels = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, channels).astype(np.float32))
            layer.frozen_variance.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    assert_logits_close(folded(x).numpy(), model(x, training=False).numpy())
    for layer in model.layers:
        if isinstance(layer, TwinBatchNormalization):
            layer.mode = "frozen"
    frozen = fold_batch_norm(model)
    assert_logits_close(frozen(x).numpy(), model(x, training=False).numpy())
    with pytest.raises(ValueError, match="inference-only"):
        folded(x, training=True)


def test_fold_batch_norm_needs_a_functional_model():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional"):
        fold_batch_norm(Subclassed())


def test_folded_model_refuses_to_be_saved(tmp_path):
    folded = fold_batch_norm(build_resnet("resnet18", 10, input_shape=(16, 16, 3)))
    with pytest.raises(NotImplementedError, match="save the source model"):
        folded.save(str(tmp_path / "folded.keras"))


# --- .keras files ----------------------------------------------------------------------------
@pytest.mark.parametrize("twin", [True, False], ids=["twin", "plain"])
def test_keras_file_round_trip_gives_identical_outputs(tmp_path, twin):
    """Every custom layer of build_resnet is registered and fully configured: a saved and
    reloaded model computes the same logits, in inference and (twin) training mode."""
    keras.utils.set_random_seed(12)
    model = build_resnet("resnet18", 10, twin=twin, input_shape=(16, 16, 3), upsample=2)
    rng = np.random.default_rng(13)
    for layer in model.layers:  # non-default statistics, so a lost weight shows
        if isinstance(layer, (TwinBatchNormalization, keras.layers.BatchNormalization)):
            channels = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, channels).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: registration does it
    assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
    assert loaded.get_layer("normalize").get_config() == model.get_layer("normalize").get_config()
    x = images(16, seed=14)
    np.testing.assert_array_equal(
        loaded(x, training=False).numpy(), model(x, training=False).numpy()
    )
    if twin:
        np.testing.assert_array_equal(
            loaded(x, training=True).numpy(), model(x, training=True).numpy()
        )
