"""AutoLoRa in the engine against references written here from the paper and its code.

* The training step: a PyTorch AutoLoRa step on the torchvision-layout ResNet-18 of
  tests/torch_resnet.py with the paper's ConvLoRA branch on every residual-stage conv, its
  gradient routing done the authors' way (`requires_grad` switched between the natural and
  the adversarial forward), `SGD(lr, momentum=0.9, weight_decay=wd)`; same weights, same
  batch, PGD without random start.  Every weight after the step (main path, BN statistics,
  head, LoRA A and B) is compared.
* The automated scalars and learning rate: the paper's formulas / the authors' epoch loop
  transcribed in numpy, on given accuracies.
* Settings errors, the train binary end to end on tiny data, export / load_run round trip.
"""

import binaries_testlib as testlib
import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from torch import nn
from torch_resnet import TorchPixelResNet, torch_pgd, torch_resnet

from twins_tf import AdversarialTrainer, lora, methods
from twins_tf.attacks import PGD
from twins_tf.models.resnet import build_resnet
from twins_tf.training.settings import Settings, SetupError

LR, WD, EPS, ALPHA, STEPS = 0.01, 1e-3, 8 / 255, 2 / 255, 2
CLASSES, RANK, SIZE, BATCH = 4, 2, 32, 8
NATURAL = [False]  # the torch reference's branch switch (the paper's thread='nat')


# === the PyTorch reference ====================================================================
class TorchLoRAConv(nn.Module):
    """The paper's ConvLoRA: natural thread W + (B @ A).view(W.shape) / r, else W.

    follows_thread=False is the authors' downsampling shortcut: a ConvLoRA their blocks call
    as `self.downsample(x)`, without `thread=`, so it always runs the main thread."""

    def __init__(self, conv, rank, follows_thread=True):
        super().__init__()
        self.conv = conv
        self.follows_thread = follows_thread
        out_ch, in_ch, k, _ = conv.weight.shape
        self.lora_A = nn.Parameter(torch.zeros(rank * k, in_ch * k))
        self.lora_B = nn.Parameter(torch.zeros(out_ch * k, rank * k))
        self.scaling = 1.0 / rank

    def forward(self, x):
        weight = self.conv.weight
        if NATURAL[0] and self.follows_thread:
            weight = weight + (self.lora_B @ self.lora_A).view(weight.shape) * self.scaling
        return F.conv2d(x, weight, None, self.conv.stride, self.conv.padding)


def _replace(net, kind, make):
    for name, module in list(net.named_modules()):
        if isinstance(module, kind) and name:
            parent, _, child = name.rpartition(".")
            owner = net.get_submodule(parent) if parent else net
            setattr(owner, child, make(name, module))


def torch_autolora_net(seed):
    net = torch_resnet("resnet18", num_classes=CLASSES, seed=seed)  # torchvision's BatchNorm2d
    _replace(
        net,
        nn.Conv2d,
        lambda name, conv: (
            conv
            if name == "conv1"
            else TorchLoRAConv(conv, RANK, follows_thread="downsample" not in name)
        ),
    )
    return net


def torch_autolora_step(net, x_nhwc, y_np, lambda1, lambda2):
    """One step of the authors' loop: PGD on the main thread in eval mode, the natural forward
    with only the LoRA branch and the head trainable, the adversarial forward with everything
    but the branch trainable, the objective, backward, SGD."""
    pixel = TorchPixelResNet(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    x, y = torch.tensor(x_nhwc.transpose(0, 3, 1, 2)), torch.tensor(y_np)
    NATURAL[0] = False
    x_adv = torch_pgd(pixel, x, y, EPS, ALPHA, STEPS).detach()
    pixel.train()
    for n, p in net.named_parameters():
        p.requires_grad_("lora" in n or n.startswith("fc."))
    NATURAL[0] = True
    z_nat = pixel(x)
    NATURAL[0] = False
    for n, p in net.named_parameters():
        p.requires_grad_("lora" not in n)
    z_adv = pixel(x_adv)
    kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1))
    loss = (
        lambda1 * F.cross_entropy(z_nat, y)
        + (1 - lambda1) * F.cross_entropy(z_adv, y)
        + lambda2 * kl / len(y)
    )
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), x_adv.numpy().transpose(0, 2, 3, 1)


# === both frameworks' state ==================================================================
def _state(net, wrapped=None):
    """{key: value in Keras layout}: of the torch net, or (wrapped given) of the Keras model."""
    out = {}
    for name, module in net.named_modules():
        key = name.replace(".", "_")
        if isinstance(module, TorchLoRAConv) and not module.follows_thread:
            pairs = {f"{key}/kernel": module.conv.weight.permute(2, 3, 1, 0)}
        elif isinstance(module, TorchLoRAConv):
            pairs = {
                f"{key}_lora/lora_a": module.lora_A,
                f"{key}_lora/lora_b": module.lora_B,
                f"{key}/kernel": module.conv.weight.permute(2, 3, 1, 0),
            }
        elif isinstance(module, nn.Conv2d) and name == "conv1":
            pairs = {f"{key}/kernel": module.weight.permute(2, 3, 1, 0)}
        elif isinstance(module, nn.BatchNorm2d):
            pairs = {
                f"{key}/gamma": module.weight,
                f"{key}/beta": module.bias,
                f"{key}/moving_mean": module.running_mean,
                f"{key}/moving_variance": module.running_var,
            }
        elif isinstance(module, nn.Linear):
            pairs = {f"{key}/kernel": module.weight.T, f"{key}/bias": module.bias}
        else:
            continue
        for k, v in pairs.items():
            if wrapped is None:
                out[k] = v.detach().numpy().copy()
            else:
                layer, variable = k.split("/")
                out[k] = np.asarray(getattr(wrapped.get_layer(layer), variable)).copy()
    return out


def keras_pair(seed=3, b_scale=0.02):
    """The torch AutoLoRa net and the Keras LoRA ResNet-18 with the same weights; B nonzero so
    the natural path differs from the main one from the first step."""
    from twins_tf.weights import load_torch_state_dict

    net = torch_autolora_net(seed)
    plain_keys = {
        k.replace(".conv.weight", ".weight"): v
        for k, v in net.state_dict().items()
        if "lora" not in k
    }
    model = build_resnet("resnet18", CLASSES, twin=False, input_shape=(SIZE, SIZE, 3))
    load_torch_state_dict(model, {k: v.numpy() for k, v in plain_keys.items()}, head=True)
    wrapped = lora.add_lora(model, RANK)
    rng = np.random.default_rng(seed)
    modules = dict(net.named_modules())
    for branch in lora.lora_branches(wrapped):
        module = modules[branch.target.replace("_", ".")]
        a = rng.normal(size=branch.lora_a.shape).astype("float32")
        b = b_scale * rng.normal(size=branch.lora_b.shape).astype("float32")
        branch.lora_a.assign(a)
        branch.lora_b.assign(b)
        with torch.no_grad():
            module.lora_A.copy_(torch.tensor(a))
            module.lora_B.copy_(torch.tensor(b))
    return wrapped, net


def _batch(seed=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(BATCH, SIZE, SIZE, 3)).astype("float32"), rng.integers(
        0, CLASSES, BATCH
    )


def _trainer(wrapped, lambda1, lambda2):
    trainer = AdversarialTrainer(
        wrapped, method="autolora", attack=PGD(EPS, ALPHA, STEPS), weight_decay=WD
    )
    trainer.compile(keras.optimizers.SGD(LR, momentum=0.9))
    trainer.autolora_lambda1.assign(lambda1)
    trainer.autolora_lambda2.assign(lambda2)
    return trainer


# === the step ================================================================================
def test_autolora_step_matches_the_authors_pytorch_step():
    """All weights (main path, BN statistics, head, LoRA A/B) after one step, the loss and the
    step's adversarial examples.  One step on a random ResNet-18: see test_trainer's
    ResNet-18 case for why a second step is not compared at this depth."""
    wrapped, net = keras_pair()
    x, y = _batch()
    lambda1, lambda2 = methods.autolora_lambdas(0.25)
    trainer = _trainer(wrapped, lambda1, lambda2)
    before = _state(net, wrapped)
    assert before.keys() == _state(net).keys()
    for key, value in _state(net).items():
        np.testing.assert_allclose(before[key], value, atol=1e-6, err_msg=key)

    torch_loss, torch_adv = torch_autolora_step(net, x, y, lambda1, lambda2)
    x_adv = tf.function(trainer.attack)(wrapped, x, y)
    np.testing.assert_allclose(x_adv.numpy(), torch_adv, atol=1e-6)
    logs = trainer.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], torch_loss, rtol=1e-4)

    got, expected = _state(net, wrapped), _state(net)
    moved = {"lora": 0, "main": 0}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
        change, expected_change = got[key] - before[key], value - before[key]
        scale = np.linalg.norm(expected_change)
        if scale > 1e-7:
            moved["lora" if "_lora/" in key else "main"] += 1
            assert np.linalg.norm(change - expected_change) <= 1e-3 * scale, key
    assert moved["lora"] == 2 * 16 and moved["main"] > 40
    shortcuts = [m for m in net.modules() if isinstance(m, TorchLoRAConv) and not m.follows_thread]
    assert len(shortcuts) == 3  # the authors' shortcut branches: never trained, B stays 0
    assert all(m.lora_B.grad is None and not m.lora_B.any() for m in shortcuts)


def test_natural_branch_accuracy_and_lambdas_follow_the_papers_formula():
    """lambda1 = 1 - a, lambda2 = 6 a, a the natural path's clean accuracy in eval mode (the
    authors' test_nat_branch), here against the torch natural thread's predictions."""
    for a in (0.0, 0.3, 0.875, 1.0):
        np.testing.assert_allclose(methods.autolora_lambdas(a), (1 - a, 6 * a))
    np.testing.assert_allclose(methods.autolora_lambdas(0.5, beta=2.0), (0.5, 1.0))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        methods.autolora_lambdas(1.5)

    wrapped = _tiny_lora_model()
    rng = np.random.default_rng(6)
    branch = lora.lora_branches(wrapped)[0]
    branch.lora_b.assign(rng.normal(size=branch.lora_b.shape).astype("float32"))
    x = rng.uniform(size=(12, 8, 8, 3)).astype("float32")
    predictions = _torch_tiny_natural_logits(wrapped, x).argmax(1)
    main_predictions = wrapped(x).numpy().argmax(1)
    assert (main_predictions != predictions).sum() >= 3  # the paths disagree: a real check
    y = predictions.copy()
    y[:5] = (y[:5] + 1) % CLASSES  # 7 of 12 right
    trainer = _trainer(wrapped, 0.0, 0.0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    assert np.mean(main_predictions == y) != pytest.approx(7 / 12)
    assert trainer.update_autolora_lambdas(data) == pytest.approx(7 / 12)
    np.testing.assert_allclose(
        [trainer.autolora_lambda1.numpy(), trainer.autolora_lambda2.numpy()],
        [1 - 7 / 12, 6 * 7 / 12],
        rtol=1e-6,
    )
    assert trainer.natural_branch_accuracy(data, steps=1) == pytest.approx(
        np.mean(predictions[:5] == y[:5])
    )


def _torch_tiny_natural_logits(wrapped, x):
    """`_tiny_lora_model`'s natural path in inference mode, in PyTorch from its weights: stem
    conv, BN (moving statistics), ReLU, conv with W + reshape(B A)/r, mean, dense."""

    def t(a):
        return torch.tensor(np.asarray(a))

    branch = lora.lora_branches(wrapped)[0]
    stem, conv = wrapped.get_layer("stem").kernel, wrapped.get_layer("conv").kernel
    bn, fc = wrapped.get_layer("bn"), wrapped.get_layer("fc")
    w = t(conv).permute(3, 2, 0, 1)
    w = w + (t(branch.lora_b) @ t(branch.lora_a)).view(w.shape) / branch.rank
    h = F.conv2d(t(x).permute(0, 3, 1, 2), t(stem).permute(3, 2, 0, 1))
    h = F.relu(
        F.batch_norm(
            h,
            t(bn.moving_mean),
            t(bn.moving_variance),
            t(bn.gamma),
            t(bn.beta),
            False,
            0.0,
            bn.epsilon,
        )
    )
    h = F.conv2d(h, w).mean((2, 3))
    return (h @ t(fc.kernel) + t(fc.bias)).numpy()


def test_autolora_objective_against_numpy():
    rng = np.random.default_rng(0)
    z_nat, z_adv = rng.normal(size=(2, 6, 5)).astype("float32")
    y = rng.integers(0, 5, 6)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ce = lambda z: -log_softmax(z)[np.arange(6), y].mean()  # noqa: E731
    p = np.exp(log_softmax(z_nat))
    kl = (p * (log_softmax(z_nat) - log_softmax(z_adv))).sum() / 6
    expected = 0.3 * ce(z_nat) + 0.7 * ce(z_adv) + 2.5 * kl
    got = methods.autolora(z_nat, z_adv, y, lambda1=0.3, lambda2=2.5)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# === the automated learning rate ===============================================================
def paper_schedule(accuracies, max_epoch=60):
    """The authors' epoch loop, transcribed: per epoch (eta multiplier, reloaded?)."""
    windows = list(range(0, 57, 4))
    loss_list = np.zeros(max_epoch + 1)
    loss_min = [0.0] * len(windows)
    eta_list = [0.0] * len(windows)
    eta, w, max_acc = 1.0, 1, -1.0
    eta_list[0] = eta
    out = []
    for epoch, acc in enumerate(accuracies, start=1):
        reloaded = False
        loss_list[epoch - 1] = acc
        if acc > max_acc:
            loss_min[w] = acc
            max_acc = acc
        if epoch - 1 == windows[w]:
            count = sum(loss_list[j + 1] > loss_list[j] for j in range(windows[w - 1], windows[w]))
            if count < 0.75 * (windows[w] - windows[w - 1]):
                eta /= 2
                eta_list[w] = eta
                reloaded = True
            elif eta_list[w] == eta_list[w - 1] and loss_min[w] == loss_min[w - 1]:
                eta /= 2
                eta_list[w] = eta
                reloaded = True
            if w < len(windows) - 1:
                w += 1
                loss_min[w] = loss_min[w - 1]
                eta_list[w] = eta_list[w - 1]
        out.append((eta, reloaded))
    return out


def _run_schedule(accuracies):
    from twins_tf.autolora import AUTOLORA_WINDOWS, autolora_schedule

    n = len(AUTOLORA_WINDOWS)
    state = dict(
        history=np.zeros(AUTOLORA_WINDOWS[-1] + 2),
        window=1,
        max_acc=-1.0,
        best=np.zeros(n),
        etas=np.eye(1, n)[0],
        eta=1.0,
    )
    out = []
    for epoch, acc in enumerate(accuracies, start=1):
        state, actions = autolora_schedule(state, epoch, acc)
        out.append((state["eta"], actions["halve"]))
    return out


@pytest.mark.parametrize("kind", ["random", "rising", "flat", "rising_then_noisy"])
def test_learning_rate_windows_match_the_authors_loop(kind):
    rng = np.random.default_rng({"random": 0, "rising": 1, "flat": 2, "rising_then_noisy": 3}[kind])
    accuracies = {
        "random": rng.uniform(0.2, 0.5, 60),
        "rising": np.linspace(0.1, 0.6, 60),
        "flat": np.full(60, 0.3),
        "rising_then_noisy": np.concatenate(
            [np.linspace(0.1, 0.4, 20), 0.4 + 0.05 * rng.standard_normal(40)]
        ),
    }[kind]
    expected = paper_schedule(accuracies)
    assert _run_schedule(accuracies) == expected
    if kind == "rising":
        assert all(eta == 1.0 for eta, _ in expected)
    else:
        assert any(reloaded for _, reloaded in expected)


def test_epoch_end_keeps_the_best_weights_and_restores_them_when_halving():
    wrapped, _ = keras_pair(seed=7)
    trainer = _trainer(wrapped, 0.5, 0.5)
    kernel = wrapped.get_layer("fc").kernel
    best = kernel.numpy().copy()
    assert trainer.autolora_epoch_end(0, 0.40)["new_best"]
    for epoch, acc in enumerate([0.30, 0.35, 0.20, 0.25], start=1):  # 2 rises of 4 < 3
        kernel.assign(best + epoch)
        actions = trainer.autolora_epoch_end(epoch, acc)
        assert not actions["new_best"] and actions["halve"] == (epoch == 4)
    np.testing.assert_array_equal(kernel.numpy(), best)
    assert float(trainer.autolora_lr_scale.numpy()) == 0.5


def _tiny_lora_model():
    keras.utils.set_random_seed(11)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    x = keras.layers.Conv2D(5, 3, use_bias=False, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    wrapped = lora.add_lora(keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x)), 2)
    branch = lora.lora_branches(wrapped)[0]
    branch.lora_b.assign(0.1 * np.ones(branch.lora_b.shape, "float32"))
    return wrapped


def test_the_automated_lr_multiplier_scales_every_update():
    """A halved multiplier moves every variable (main, BN, head, LoRA) half as far in a first
    step (zero momentum), decay included."""
    rng = np.random.default_rng(8)
    x, y = rng.uniform(size=(4, 8, 8, 3)).astype("float32"), rng.integers(0, CLASSES, 4)
    updates = []
    for scale in (1.0, 0.5):
        wrapped = _tiny_lora_model()
        trainer = _trainer(wrapped, 0.4, 1.2)
        trainer.autolora_lr_scale.assign(scale)
        before = [v.numpy().copy() for v in wrapped.trainable_variables]
        trainer.train_on_batch(x, y)
        updates.append([v.numpy() - b for v, b in zip(wrapped.trainable_variables, before)])
    for full, half in zip(*updates):
        assert np.abs(full).max() > 0
        np.testing.assert_allclose(
            half, 0.5 * full, rtol=1e-4, atol=3e-7
        )  # float32 ulps of the weights


def test_export_of_a_branched_model_serves_the_main_path(tmp_path):
    from twins_tf import serving

    wrapped = _tiny_lora_model()
    exported = serving.export_saved_model(wrapped, str(tmp_path / "saved"), image_size=8)
    assert not lora.lora_branches(exported)
    x = np.random.default_rng(9).uniform(size=(3, 8, 8, 3)).astype("float32")
    served = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    logits = served(images=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(logits, wrapped(x).numpy(), rtol=1e-5, atol=1e-6)
    with lora.natural_branch():
        assert np.abs(wrapped(x).numpy() - logits).max() > 1e-4


# === settings, binaries ========================================================================
def _settings(**changes):
    base = dict(
        dataset="cifar10",
        model_dir="/tmp/x",
        method="autolora",
        lora_rank=4,
        pretrained="/tmp/p.weights.h5",
    )
    return Settings(**{**base, **changes})


def test_setup_errors():
    assert _settings().lora_rank == 4 and not _settings().twin
    with pytest.raises(SetupError, match="--lora_rank=R > 0"):
        _settings(lora_rank=0)
    with pytest.raises(SetupError, match="only --method=autolora trains it"):
        _settings(method="at")
    with pytest.raises(SetupError, match="only --method=autolora trains it"):
        _settings(method="twins_at")
    with pytest.raises(SetupError, match="--lora_rank must be >= 0"):
        _settings(method="at", lora_rank=-1)
    with pytest.raises(SetupError, match="--lora_rank must be an integer"):
        _settings(lora_rank=2.5)
    # config.json: a run without a branch keeps its old keys, an AutoLoRa run records it
    assert "lora_rank" not in _settings(method="at", lora_rank=0).to_dict()
    assert _settings().to_dict()["lora_rank"] == 4
    assert Settings.from_dict(_settings(method="at", lora_rank=0).to_dict()).lora_rank == 0


# The paper's optimisation, read from the authors' code (RobustSSL_Benchmark,
# Finetuning_Methods/AutoLoRa/high_resolution): `eta = 0.01` set in Trainer.train, the SGD's
# `weight_decay=args.weight_decay` with src/argument.py's default 1e-4, and no lr scheduler
# (the rate only changes by the windows' `eta /= 2`).
PAPER_LR, PAPER_WD, PAPER_DECAY = 0.01, 1e-4, ()
FLAGFILES = sorted(p.name for p in (testlib.REPO_ROOT / "flags").glob("*.flags"))
CIFAR10_FLAGS = testlib.REPO_ROOT / "flags" / "cifar10.flags"


def _from_flags(*args):
    values = testlib.settings(
        "train", [*args, "--pretrained=/tmp/p.weights.h5", "--model_dir=/tmp/x"]
    )
    return Settings.from_dict(values)


@pytest.mark.parametrize("flagfile", [None, *FLAGFILES])
def test_autolora_runs_the_papers_schedule_unless_the_command_line_sets_one(flagfile):
    """Every flagfile carries the TWINS recipe (lr 0.003, x0.1 at 30 and 50, its weight decay):
    AutoLoRa takes the paper's instead, a TWINS method keeps the flagfile's, and a value typed
    on the command line is AutoLoRa's too."""
    task = [f"--flagfile={testlib.REPO_ROOT / 'flags' / flagfile}"] if flagfile else []
    task = task or ["--dataset=cifar10"]
    autolora = [*task, "--method=autolora", "--lora_rank=8"]
    s = _from_flags(*autolora)
    assert (s.lr, s.weight_decay, s.lr_decay_epochs) == (PAPER_LR, PAPER_WD, PAPER_DECAY)
    twins = _from_flags(*task, "--method=twins_trades")
    assert (twins.lr, twins.lr_decay_epochs) == (0.003, (30, 50))
    typed = _from_flags(*autolora, "--lr=0.02", "--lr_decay_epochs=20")
    assert (typed.lr, typed.weight_decay, typed.lr_decay_epochs) == (0.02, PAPER_WD, (20,))
    assert _from_flags(*autolora, "--weight_decay", "0.003").weight_decay == 0.003
    # a value typed before the flagfile is overridden by it, so it is not the run's choice
    if flagfile:
        assert _from_flags("--lr=0.02", *autolora).lr == PAPER_LR


def test_the_binaries_read_what_was_typed_from_their_own_command_line(monkeypatch, tmp_path):
    """`train` and `compare` parse sys.argv into the global FLAGS and call
    `settings_from_flags(FLAGS, binary)`: without argv it reads sys.argv."""
    from absl import flags

    from twins_tf.training.flags import define_flags, settings_from_flags

    argv = ["train", f"--flagfile={CIFAR10_FLAGS}", "--method=autolora", "--lora_rank=8"]
    argv += ["--weight_decay=0.002", "--pretrained=/p.h5", f"--model_dir={tmp_path}"]
    flag_values = flags.FlagValues()
    define_flags(flag_values, "train")
    flag_values(argv)
    monkeypatch.setattr("sys.argv", argv)
    s = Settings.from_dict(settings_from_flags(flag_values, "train"))
    assert (s.lr, s.weight_decay, s.lr_decay_epochs) == (PAPER_LR, 0.002, PAPER_DECAY)


def test_the_train_binary_refuses_autolora_without_validation_in_one_line(tmp_path):
    model_dir = tmp_path / "run"
    result = testlib.run_binary(
        "train",
        [
            f"--flagfile={CIFAR10_FLAGS}",
            "--method=autolora",
            "--lora_rank=8",
            "--validation=none",
            "--pretrained=/p.weights.h5",
            f"--model_dir={model_dir}",
        ],
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "train: error: --method=autolora halves its learning rate on the validation robust "
            "accuracy (val_adv_acc)"
        )
    )
    assert not model_dir.exists()


def test_a_flagfile_written_for_autolora_sets_its_schedule(tmp_path):
    """A flagfile whose own lines set --method=autolora chooses the values it sets; the TWINS
    flagfile it includes does not."""
    flagfile = tmp_path / "autolora.flags"
    flagfile.write_text(
        f"# AutoLoRa on CIFAR-10\n--flagfile={CIFAR10_FLAGS}\n--method=autolora\n"
        "--lora_rank=8\n--lr=0.005\n"
    )
    s = _from_flags(f"--flagfile={flagfile}")
    assert (s.lr, s.weight_decay, s.lr_decay_epochs) == (0.005, PAPER_WD, PAPER_DECAY)


def test_library_settings_and_compare_rows_take_the_papers_schedule(tmp_path):
    """`Settings(method="autolora")` without a schedule, a `replace` to it, and an AutoLoRa row
    of compare on a TWINS flagfile take the paper's; what is given explicitly stays."""
    from twins_tf import comparison

    assert (_settings().lr, _settings().weight_decay, _settings().lr_decay_epochs) == (
        PAPER_LR,
        PAPER_WD,
        PAPER_DECAY,
    )
    assert _settings(lr=0.02).lr == 0.02
    base = _from_flags(f"--flagfile={CIFAR10_FLAGS}")
    moved = base.replace(method="autolora", lora_rank=8)
    assert (moved.lr, moved.weight_decay, moved.lr_decay_epochs) == (0.01, 1e-4, ())
    assert moved.replace(lr=0.03).lr == 0.03
    rows = ["twins_trades", "autolora+lora_rank=8", "autolora+lora_rank=8+lr=0.02"]
    for given in (
        testlib.settings("train", [f"--flagfile={CIFAR10_FLAGS}", "--pretrained=/p.h5"]),
        base,
    ):
        plan, _ = comparison.plan_rows(given, rows, [0], str(tmp_path))
        got = {
            v.name: Settings.from_dict(runs[0]) for v, runs in plan.items()
        }  # what each run trains with
        assert (got["twins_trades"].lr, got["twins_trades"].weight_decay) == (0.003, 1e-5)
        schedule = got["autolora+lora_rank=8"]
        assert (schedule.lr, schedule.weight_decay, schedule.lr_decay_epochs) == (0.01, 1e-4, ())
        assert got["autolora+lora_rank=8+lr=0.02"].lr == 0.02


def test_autolora_without_validation_is_refused_before_anything_is_written(tmp_path):
    """The lr halving reads val_adv_acc after every epoch: no validation split, no halving."""
    from twins_tf.training import loop

    model_dir = tmp_path / "run"
    values = testlib.settings(
        "train",
        [
            "--dataset=digits_5_9",
            *testlib.TINY,
            "--method=autolora",
            "--lora_rank=2",
            "--validation=none",
            "--pretrained=/tmp/p.weights.h5",
            f"--model_dir={model_dir}",
        ],
    )
    with pytest.raises(
        SetupError, match="--method=autolora halves its learning rate.*--validation=carve"
    ) as error:
        loop.run(values, verbose=0)
    assert "\n" not in str(error.value) and not model_dir.exists()
    # the library trainer: fit without validation data would never halve either
    trainer = _trainer(_tiny_lora_model(), 0.5, 0.5)
    x = np.zeros((4, 8, 8, 3), "float32")
    y = np.zeros(4, "int64")
    with pytest.raises(ValueError, match="pass validation_data="):
        trainer.fit(x, y, batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="drop validation_freq"):
        trainer.fit(
            x, y, batch_size=4, epochs=1, verbose=0, validation_data=(x, y), validation_freq=2
        )


def test_trainer_refuses_a_model_without_branches_and_a_twin_model():
    plain = build_resnet("resnet18", CLASSES, twin=False, input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="add_lora"):
        AdversarialTrainer(plain, method="autolora", attack=PGD(EPS, ALPHA, 1))
    twin = build_resnet("resnet18", CLASSES, twin=True, input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="plain-BN model"):
        AdversarialTrainer(lora.add_lora(twin, RANK), method="autolora", attack=PGD(EPS, ALPHA, 1))


def test_train_binary_end_to_end_then_load_run_and_export(tmp_path_factory, tmp_path):
    """`train --method=autolora --lora_rank=2` on tiny digits; load_run and export give the
    main path (what the paper evaluates), identical to the trained model's main forward."""
    from twins_tf import serving
    from twins_tf.training import loop, runs
    from twins_tf.training import model_dir as run_files

    pretrained = testlib.source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    model_dir = tmp_path / "run"
    args = [
        "--dataset=digits_5_9",
        *testlib.TINY,
        "--method=autolora",
        "--lora_rank=2",
        "--epochs=1",
        "--lr=0.01",
        "--weight_decay=1e-4",
        f"--pretrained={pretrained}",
        f"--model_dir={model_dir}",
    ]
    summary = loop.run(testlib.settings("train", args), verbose=0)
    metrics = (model_dir / "metrics.csv").read_text()
    assert "natural_branch_acc" in metrics and "autolora_lambda1" in metrics
    assert summary["final"]["autolora_lr_scale"] == 1.0  # no window check before epoch 5
    schedule = summary["schedule"]  # what it ran: here the paper's, typed on the command line
    assert (schedule["lr"], schedule["weight_decay"], schedule["lr_decay_epochs"]) == (
        PAPER_LR,
        PAPER_WD,
        list(PAPER_DECAY),
    )
    assert schedule["as_published"] is True
    assert schedule["automated"]["halved_after_epochs"] == []
    assert run_files.read_config(str(model_dir))["lora_rank"] == 2

    loaded = runs.load_run(model_dir)
    assert not lora.lora_branches(loaded)
    trained = lora.add_lora(build_resnet("resnet18", 5, twin=False, input_shape=(16, 16, 3)), 2)
    trained.load_weights(model_dir / run_files.BEST_WEIGHTS)
    assert any(np.asarray(b.lora_b).any() for b in lora.lora_branches(trained))
    x = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x).numpy(), trained(x).numpy(), atol=1e-6)
    with lora.natural_branch():
        assert np.abs(trained(x).numpy() - loaded(x).numpy()).max() > 1e-6

    serving.export_run(model_dir, tmp_path / "saved")
    served = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    out = served(tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(out, loaded(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_run_stopped_by_the_lr_floor_is_finished_not_resumed(tmp_path_factory, tmp_path):
    """AutoLoRa stops when lr x scale < 1e-5 (the authors' rule): the run is then finished,
    a restart with the same flags trains nothing, and more epochs are refused."""
    from twins_tf.training import loop
    from twins_tf.training import model_dir as run_files
    from twins_tf.training.settings import SetupError

    pretrained = testlib.source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    model_dir = tmp_path / "run"
    args = [
        "--dataset=digits_5_9",
        *testlib.TINY,
        "--method=autolora",
        "--lora_rank=2",
        "--epochs=3",
        "--lr=5e-6",
        "--weight_decay=1e-4",
        f"--pretrained={pretrained}",
        f"--model_dir={model_dir}",
    ]
    summary = loop.run(testlib.settings("train", args), verbose=0)
    assert (summary["epochs"], summary["trained_epochs"]) == (3, 1)
    schedule = summary["schedule"]
    assert (schedule["lr"], schedule["as_published"]) == (5e-6, False)
    assert schedule["automated"]["stopped_early"] and schedule["automated"]["trained_epochs"] == 1
    files = testlib.file_snapshot(model_dir)
    assert loop.run(testlib.settings("train", args), verbose=0) == summary
    assert testlib.file_snapshot(model_dir) == files  # nothing trained or rewritten
    with pytest.raises(SetupError, match="stopped early after 1 of its 3 epochs"):
        loop.run(testlib.settings("train", [*args, "--epochs=4"]), verbose=0)
    assert testlib.file_snapshot(model_dir) == files
