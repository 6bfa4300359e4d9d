"""twins_tf.weights: reading checkpoints, loading state dicts and Keras weights files.

Sections follow the package's modules; the wing mapping itself is tested in test_twinify.py.

The reference for every value is the PyTorch module that wrote the file (its own
`state_dict()`), or PyTorch's forward pass; nothing is compared with twins_tf's own output.
"""

import sys

import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors
from torch_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    robustness_state_dict,
    save_robustness_checkpoint,
    torch_logits,
    torch_resnet,
)

from twins_tf import weights
from twins_tf.layers import TwinBatchNormalization
from twins_tf.models import build_resnet

BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
FROZEN = ("frozen_gamma", "frozen_beta", "frozen_mean", "frozen_variance")
TORCH_BN = ("weight", "bias", "running_mean", "running_var")


@pytest.fixture(scope="module")
def net():
    return torch_resnet("resnet18", 1000, seed=3)


@pytest.fixture(scope="module")
def expected(net):
    """The torchvision state dict as numpy, straight from the module."""
    return {
        k: v.numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)
        assert actual[key].dtype == np.float32


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- reading files (twins_tf.weights.reading) -------------------------------------------------
@pytest.mark.parametrize(
    "style", ["robustness", "robustness_state_dict", "dataparallel", "torchvision"]
)
def test_torch_layouts_read_to_torchvision_keys(tmp_path, net, expected, style):
    path = save_robustness_checkpoint(net, tmp_path / "model.pt", prefix_style=style)
    assert_same_state(weights.read_torch_checkpoint(path), expected)


def test_robustness_metadata(tmp_path, net):
    path = save_robustness_checkpoint(net, tmp_path / "resnet18_l2_eps3.ckpt", epoch=42)
    checkpoint = weights.read_checkpoint(path)
    meta = checkpoint.metadata
    assert meta["format"] == "robustness" and meta["container"] == "model"
    assert meta["epoch"] == 42 and meta["arch"] == "resnet18"
    assert meta["eps"] == 3.0 and "file name" in meta["eps_source"]
    np.testing.assert_allclose(meta["normalizer_mean"], IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(meta["normalizer_std"], IMAGENET_STD, rtol=1e-6)
    # 2 normaliser duplicates + every attacker.model copy + every num_batches_tracked (x2)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert meta["dropped_keys"] == 2 + len(net.state_dict()) + bns


def test_pytorch_examples_checkpoint_keeps_its_entries_as_metadata(tmp_path, net, expected):
    """pytorch/examples' ImageNet script saves {'epoch', 'arch', 'state_dict', 'best_acc1', ...}."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet50",
            "state_dict": state,
            "best_acc1": 76.1,
            "optimizer": {"state": {}},
        },
        tmp_path / "model_best.pth.tar",
    )
    checkpoint = weights.read_checkpoint(tmp_path / "model_best.pth.tar")
    assert_same_state(checkpoint.state_dict, expected)
    meta = checkpoint.metadata
    assert meta["format"] == "torch" and meta["container"] == "state_dict"
    assert meta["arch"] == "resnet18" and meta["file_arch"] == "resnet50"  # the keys decide
    assert meta["epoch"] == 90 and meta["best_acc1"] == 76.1 and "eps" not in meta


def test_eps_from_the_file_wins_over_the_name_and_linf_names_are_in_255ths(tmp_path, net):
    path = save_robustness_checkpoint(net, tmp_path / "r_linf_eps8.0.ckpt", extra={"eps": 0.5})
    assert weights.read_checkpoint(path).metadata["eps"] == 0.5
    path = save_robustness_checkpoint(net, tmp_path / "resnet50_linf_eps4.0.ckpt")
    assert weights.read_checkpoint(path).metadata["eps"] == pytest.approx(4.0 / 255)


def test_safetensors_and_npz_read_without_torch(tmp_path, net, expected, monkeypatch):
    robust = {k: v.numpy() for k, v in robustness_state_dict(net).items()}
    st_path, npz_path = tmp_path / "w.safetensors", tmp_path / "w.npz"
    save_safetensors(robust, str(st_path))
    np.savez(npz_path, **expected)
    torch_path = save_robustness_checkpoint(net, tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert_same_state(weights.read_torch_checkpoint(st_path), expected)
    assert_same_state(weights.read_torch_checkpoint(npz_path), expected)
    with pytest.raises(ImportError, match=r"pip install twins_tf\[torch\]") as info:
        weights.read_torch_checkpoint(torch_path)
    one_line(info)


def test_non_imagenet_normaliser_is_reported(tmp_path, net):
    path = save_robustness_checkpoint(net, tmp_path / "m.ckpt", mean=(0.5, 0.5, 0.5))
    with pytest.warns(weights.CheckpointWarning, match="ImageNet"):
        checkpoint = weights.read_checkpoint(path)
    assert checkpoint.metadata["normalizer_mean"] == (0.5, 0.5, 0.5)


def test_imagenet_normaliser_is_not_reported(tmp_path, net, recwarn):
    weights.read_checkpoint(save_robustness_checkpoint(net, tmp_path / "m.ckpt"))
    assert not [w for w in recwarn if issubclass(w.category, weights.CheckpointWarning)]


# --- unsafe pickles (twins_tf.weights.reading) --------------------------------------------------
def _leave_marker(path):
    """What a malicious pickle would do: run code on load."""
    with open(path, "w") as f:
        f.write("code ran during unpickling")
    return "payload"


class CodeOnLoad:
    """Pickles as a call to `_leave_marker`: unpickling it runs that function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path, net, expected):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "dill_like.ckpt"
    torch.save({"model": robustness_state_dict(net), "args": CodeOnLoad(str(marker))}, path)

    with pytest.raises(weights.UnsafeCheckpointError) as info:
        weights.read_torch_checkpoint(path)
    message = one_line(info)
    assert "allow_pickle=True" in message and "--allow_pickle" in message
    assert "arbitrary code" in message and "_leave_marker" in message
    assert not marker.exists()

    # Opting in loads it, and shows why the default refuses: the file's code ran.
    assert_same_state(weights.read_torch_checkpoint(path, allow_pickle=True), expected)
    assert marker.exists()


def test_dill_pickled_robustness_checkpoint_loads_with_allow_pickle(
    tmp_path, net, expected, monkeypatch
):
    """MadryLab's robustness library saves with `pickle_module=dill`; what dill pickles (here a
    lambda in the run's arguments, which plain pickle cannot write) names `dill` functions,
    so reading it needs dill installed (the `torch` extra pins it) and allow_pickle=True."""
    import dill  # in the test and torch extras: a missing dill is a broken environment

    path = tmp_path / "robustness_dill.ckpt"
    torch.save(
        {
            "model": robustness_state_dict(net),
            "epoch": 7,
            "args": {"transform": lambda x: x, "eps": 4.0},
        },
        path,
        pickle_module=dill,
    )
    with pytest.raises(weights.UnsafeCheckpointError):
        weights.read_torch_checkpoint(path)
    assert_same_state(weights.read_torch_checkpoint(path, allow_pickle=True), expected)

    monkeypatch.setitem(sys.modules, "dill", None)  # as without the extra: dill not importable
    monkeypatch.setitem(sys.modules, "dill._dill", None)
    with pytest.raises(
        weights.CheckpointError,
        match="needs the Python module 'dill(._dill)?' to unpickle; install it",
    ):
        weights.read_torch_checkpoint(path, allow_pickle=True)


# --- bad files (twins_tf.weights.reading) -------------------------------------------------------
def _write(path, data):
    path.write_bytes(data)
    return path


def test_bad_files_are_one_line_errors(tmp_path, net):
    good = save_robustness_checkpoint(net, tmp_path / "good.pt").read_bytes()
    robust = {k: v.numpy() for k, v in robustness_state_dict(net).items()}
    save_safetensors(robust, str(tmp_path / "good.safetensors"))
    np.savez(tmp_path / "good.npz", **robust)
    cases = {
        "truncated torch": (_write(tmp_path / "t.pt", good[: len(good) // 2]), "corrupt"),
        "corrupt torch": (
            _write(tmp_path / "c.pt", good[:64] + bytes(200) + good[264:]),
            "corrupt",
        ),
        "legacy garbage": (_write(tmp_path / "g.pt", b"\x80\x02garbage" * 10), "corrupt"),
        "text file": (
            _write(tmp_path / "notes.txt", b"hello, not weights\n" * 5),
            "not a checkpoint",
        ),
        "empty file": (_write(tmp_path / "empty.pt", b""), "not a checkpoint"),
        "truncated safetensors": (
            _write(tmp_path / "t.safetensors", (tmp_path / "good.safetensors").read_bytes()[:5000]),
            "safetensors",
        ),
        "truncated npz": (
            _write(tmp_path / "t.npz", (tmp_path / "good.npz").read_bytes()[:5000]),
            "corrupt",
        ),
        "a list": (tmp_path / "list.pt", "not a state dict"),
        "optimizer only": (tmp_path / "opt.pt", "tensor"),
    }
    torch.save([1, 2, 3], cases["a list"][0])
    torch.save({"lr": 0.1, "momentum": 0.9}, cases["optimizer only"][0])
    for name, (path, expected_text) in cases.items():
        with pytest.raises(weights.CheckpointError) as info:
            weights.read_torch_checkpoint(path)
        assert expected_text in one_line(info), name
    with pytest.raises(FileNotFoundError, match="not found"):
        weights.read_torch_checkpoint(tmp_path / "missing.pt")


def test_keras_weights_file_is_pointed_to_load_pretrained(tmp_path):
    model = build_resnet("resnet18", 10, twin=False, input_shape=(None, None, 3))
    model.save_weights(tmp_path / "k.weights.h5")
    with pytest.raises(weights.CheckpointError, match="load_pretrained") as info:
        weights.read_torch_checkpoint(tmp_path / "k.weights.h5")
    one_line(info)


# --- load_torch_state_dict (twins_tf.weights.torch_names) ---------------------------------------
@pytest.fixture(scope="module")
def twin_model():
    return build_resnet("resnet18", 1000, twin=True, input_shape=(None, None, 3))


def test_conv_dense_and_both_wings_hold_the_torch_tensors(twin_model, net):
    weights.load_torch_state_dict(twin_model, net.state_dict(), head=True)  # torch tensors too
    torch_modules = dict(net.named_modules())
    # Check conv layout element by element: Keras kernel[h, w, i, o] == torch weight[o, i, h, w].
    conv_torch = torch_modules["layer2.0.downsample.0"].weight.detach().numpy()
    conv_keras = twin_model.get_layer("layer2_0_downsample_0").kernel.numpy()
    rng = np.random.default_rng(0)
    for _ in range(20):
        o, i = rng.integers(conv_torch.shape[0]), rng.integers(conv_torch.shape[1])
        assert conv_keras[0, 0, i, o] == conv_torch[o, i, 0, 0]
    stem = torch_modules["conv1"].weight.detach().numpy()
    assert twin_model.get_layer("conv1").kernel.numpy()[6, 2, 1, 5] == stem[5, 1, 6, 2]
    fc = torch_modules["fc"]
    fc_layer = twin_model.get_layer("fc")
    assert fc_layer.kernel.numpy()[300, 7] == fc.weight.detach().numpy()[7, 300]
    np.testing.assert_array_equal(fc_layer.bias.numpy(), fc.bias.detach().numpy())
    for layer in twin_model.layers:
        if isinstance(layer, TwinBatchNormalization):
            bn = torch_modules[layer.name.replace("_", ".")]
            for keras_names in (BN_WEIGHTS, FROZEN):
                for keras_name, torch_name in zip(keras_names, TORCH_BN):
                    np.testing.assert_array_equal(
                        getattr(layer, keras_name).numpy(), getattr(bn, torch_name).detach().numpy()
                    )


def _snapshot(model):
    return [w.numpy().copy() for w in model.weights]


def _unchanged(model, snapshot):
    return all(np.array_equal(a, w.numpy()) for a, w in zip(snapshot, model.weights))


def test_wrong_arch_lists_keys_and_loads_nothing(expected):
    model = build_resnet("resnet50", 10, twin=True, input_shape=(None, None, 3))
    before = _snapshot(model)
    with pytest.raises(weights.CheckpointError) as info:
        weights.load_torch_state_dict(model, expected)
    message = one_line(info)
    assert "holds a resnet18 but the model is a resnet50" in message
    assert "missing keys: " in message and "layer1.0.bn3.bias" in message
    assert _unchanged(model, before)


def test_missing_unexpected_and_misshapen_keys_are_listed(expected):
    model = build_resnet("resnet18", 10, twin=False, input_shape=(None, None, 3))
    before = _snapshot(model)
    broken = dict(expected)
    del broken["layer3.1.bn2.running_var"]
    broken["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(weights.CheckpointError) as info:
        weights.load_torch_state_dict(model, broken)
    message = one_line(info)
    assert "missing keys: layer3.1.bn2.running_var" in message
    assert "unexpected keys: layer5.0.conv1.weight" in message
    misshapen = dict(expected)
    misshapen["layer4.1.conv2.weight"] = expected["layer4.1.conv2.weight"][:, :100]
    with pytest.raises(weights.CheckpointError, match=r"layer4\.1\.conv2\.weight") as info:
        weights.load_torch_state_dict(model, misshapen)
    one_line(info)
    assert _unchanged(model, before)


def test_head_true_needs_the_same_number_of_classes(expected):
    model = build_resnet("resnet18", 10, twin=True, input_shape=(None, None, 3))
    before = _snapshot(model)
    with pytest.raises(weights.CheckpointError, match="1000 classes .* fc has 10") as info:
        weights.load_torch_state_dict(model, expected, head=True)
    one_line(info)
    assert _unchanged(model, before)
    # head=False keeps the fresh 10-class head and loads everything else.
    loaded = weights.load_torch_state_dict(model, expected)
    assert not any(k.startswith("fc.") for k in loaded)
    assert len(loaded) == len(expected) - 2
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), before[-2])


def test_models_not_from_build_model_are_refused(expected):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv1")(inputs))
    with pytest.raises(weights.CheckpointError, match="build_model") as info:
        weights.load_torch_state_dict(model, expected)
    one_line(info)


# --- load_pretrained, convert_checkpoint (weights.keras_files, weights.conversion) --------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory, net):
    directory = tmp_path_factory.mktemp("converted")
    checkpoint = save_robustness_checkpoint(net, directory / "r18.ckpt")
    output = directory / "r18.weights.h5"
    weights.convert_checkpoint(checkpoint, "resnet18", output)
    return output


def _features(model, x):
    return keras.Model(model.input, model.get_layer("avgpool").output)(x).numpy()


def _torch_features(net, x):
    head, net.fc = net.fc, torch.nn.Identity()
    try:
        return torch_logits(net, x)
    finally:
        net.fc = head


@pytest.mark.parametrize("twin", [True, False], ids=["twin", "plain"])
def test_converted_file_loads_with_a_fresh_head(converted, net, twin):
    model = build_resnet("resnet18", 10, twin=twin, input_shape=(32, 32, 3))
    head_before = model.get_layer("fc").kernel.numpy().copy()
    info = weights.load_pretrained(model, converted)
    assert info == {
        "arch": "resnet18",
        "source_twin": False,
        "source_classes": 1000,
        "head_loaded": False,
    }
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    reference = _torch_features(net, x)
    error = np.abs(_features(model, x) - reference).max()
    assert error <= 1e-4 * np.abs(reference).max()
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), head_before)


def test_converted_file_with_head_gives_pytorch_logits(converted, net):
    model = build_resnet("resnet18", 1000, twin=True, input_shape=(32, 32, 3), upsample=2)
    weights.load_pretrained(model, converted, head=True)
    x = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    reference = torch_logits(net, x, upsample=2)
    assert np.abs(model(x).numpy() - reference).max() <= 1e-4 * np.abs(reference).max()


def _distinct_wings(model, seed):
    """Give every twin BN's two wings different random values (so wings can be told apart)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, TwinBatchNormalization):
            for name in BN_WEIGHTS + FROZEN:
                variable = getattr(layer, name)
                variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(np.float32))


@pytest.mark.parametrize("target_twin", [True, False], ids=["to_twin", "to_plain"])
def test_save_weights_of_a_twin_model_loads_both_ways(tmp_path, target_twin):
    source = build_resnet("resnet18", 7, twin=True, input_shape=(None, None, 3))
    _distinct_wings(source, seed=4)
    source.save_weights(tmp_path / "pretrain.weights.h5")
    target = build_resnet("resnet18", 5, twin=target_twin, input_shape=(None, None, 3))
    info = weights.load_pretrained(target, tmp_path / "pretrain.weights.h5")
    assert info["source_twin"] and info["source_classes"] == 7
    for layer in source.layers:
        if isinstance(layer, TwinBatchNormalization):
            loaded = target.get_layer(layer.name)
            names = BN_WEIGHTS + FROZEN if target_twin else BN_WEIGHTS  # plain: Adaptive wing
            for name in names:
                np.testing.assert_array_equal(
                    getattr(loaded, name).numpy(), getattr(layer, name).numpy()
                )
        elif layer.name.startswith(("conv", "layer")) and layer.weights:
            np.testing.assert_array_equal(
                target.get_layer(layer.name).kernel.numpy(), layer.kernel.numpy()
            )


def test_save_weights_of_a_plain_model_fills_both_wings(tmp_path, expected):
    source = build_resnet("resnet18", 1000, twin=False, input_shape=(None, None, 3))
    weights.load_torch_state_dict(source, expected, head=True)
    source.save_weights(tmp_path / "plain.weights.h5")
    target = build_resnet("resnet18", 1000, twin=True, input_shape=(None, None, 3))
    weights.load_pretrained(target, tmp_path / "plain.weights.h5", head=True)
    layer = target.get_layer("layer3_1_bn2")
    for keras_names in (BN_WEIGHTS, FROZEN):
        for keras_name, torch_name in zip(keras_names, TORCH_BN):
            np.testing.assert_array_equal(
                getattr(layer, keras_name).numpy(), expected[f"layer3.1.bn2.{torch_name}"]
            )
    np.testing.assert_array_equal(target.get_layer("fc").bias.numpy(), expected["fc.bias"])


def test_load_pretrained_bad_input(tmp_path, converted, net):
    r50 = build_resnet("resnet50", 10, twin=True, input_shape=(None, None, 3))
    r18 = build_resnet("resnet18", 10, twin=True, input_shape=(None, None, 3))
    before = _snapshot(r18)
    data = converted.read_bytes()
    truncated = _write(tmp_path / "t.weights.h5", data[: len(data) // 3])
    text = _write(tmp_path / "text.weights.h5", b"not hdf5\n" * 100)
    torch_file = save_robustness_checkpoint(net, tmp_path / "r18.ckpt")
    cases = [
        (r50, converted, {}, "does not hold resnet50 weights: it has 20 conv layers (resnet18)"),
        (r18, truncated, {}, "corrupt, truncated or not a Keras weights file"),
        (r18, text, {}, "corrupt, truncated or not a Keras weights file"),
        (r18, torch_file, {}, "python -m twins_tf.convert"),
        (r18, converted, {"head": True}, "1000-class head but the model's fc has 10"),
    ]
    for model, path, kwargs, text_expected in cases:
        with pytest.raises(weights.CheckpointError) as info:
            weights.load_pretrained(model, path, **kwargs)
        assert text_expected in one_line(info), path
    assert _unchanged(r18, before)
    with pytest.raises(FileNotFoundError):
        weights.load_pretrained(r18, tmp_path / "missing.weights.h5")


def test_headless_checkpoint_converts_but_refuses_head_true(tmp_path, expected):
    backbone = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    np.savez(tmp_path / "backbone.npz", **backbone)
    summary = weights.convert_checkpoint(
        tmp_path / "backbone.npz", "resnet18", tmp_path / "b.weights.h5", num_classes=10
    )
    assert summary["head_from_checkpoint"] is False and summary["num_classes"] == 10
    model = build_resnet("resnet18", 10, twin=False, input_shape=(None, None, 3))
    with pytest.raises(weights.CheckpointError, match="without a head") as info:
        weights.load_pretrained(model, tmp_path / "b.weights.h5", head=True)
    one_line(info)
    weights.load_pretrained(model, tmp_path / "b.weights.h5")  # the backbone is fine
    np.testing.assert_array_equal(
        model.get_layer("layer1_0_bn1").moving_variance.numpy(),
        expected["layer1.0.bn1.running_var"],
    )


# --- the package's public names ------------------------------------------------------------
# Every public name of the single-module twins_tf/weights.py before the split into a package,
# written out by hand: callers (convert, train, evaluate, the README) use twins_tf.weights.X.
PUBLIC_NAMES_BEFORE_THE_SPLIT = (
    "HEAD_ATTRIBUTE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "UnsafeCheckpointError",
    "conv_layer_count",
    "convert_checkpoint",
    "infer_arch",
    "infer_arch_from_state_dict",
    "load_pretrained",
    "load_torch_state_dict",
    "read_checkpoint",
    "read_torch_checkpoint",
)


def test_every_old_public_name_is_still_in_twins_tf_weights():
    missing = [name for name in PUBLIC_NAMES_BEFORE_THE_SPLIT if not hasattr(weights, name)]
    assert not missing
    assert sorted(weights.__all__) == sorted(PUBLIC_NAMES_BEFORE_THE_SPLIT)
    assert issubclass(weights.UnsafeCheckpointError, weights.CheckpointError)
    assert issubclass(weights.CheckpointError, ValueError)
