"""AdversarialTrainer against a PyTorch implementation of the same steps, written here from spec.

The reference (PyTorch, below) implements spec §1-6 independently: a two-wing BN module, PGD in
eval mode, the five objectives with their reductions, and `torch.optim.SGD(lr, momentum=0.9,
weight_decay=wd)` (coupled decay); L2-SP from Li et al.'s formula, alpha/2 ||w_S - w_S^0||^2 +
wd/2 ||w_head||^2 added to the loss and no other decay. Each parity case loads the same weights
into both frameworks, runs two training steps on the same batches (`random_start=False`) and
compares the step-1 adversarial examples, the losses, the metrics and every weight and moving
statistic.  Distribution is compared against a reference that simulates the replicas (each
replica attacks, normalises and differentiates its own slice; gradients and moving statistics
are averaged), XLA against the same reference.

A small conv net (conv-BN-ReLU twice, GAP, dense) built identically in both frameworks keeps
the cases fast; one case runs ResNet-18 loaded through `twins_tf.weights`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from torch import nn
from torch_resnet import TorchPixelResNet, torch_pgd, torch_resnet

from twins_tf import AdversarialTrainer
from twins_tf.attacks import PGD
from twins_tf.layers import BatchNormalization, TwinBatchNormalization, set_twin_mode

LR, MOMENTUM, WD = 0.01, 0.9, 1e-3
EPS, ALPHA, PGD_STEPS = 8 / 255, 2 / 255, 3
LAMBDA, BETA, L2SP_ALPHA = 0.4, 6.0, 20.0
CLASSES, SIZE, BATCH = 4, 10, 8


# === the PyTorch reference ====================================================================
class TorchTwinBN(nn.Module):
    """Spec §1-2: train mode normalises rows [0, B/2) with the frozen population statistics and
    frozen affine, rows [B/2, B) with their batch statistics (EMA 0.1 of the unbiased variance
    into the running statistics); eval mode uses the Adaptive wing's running statistics."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.frozen_weight = nn.Parameter(torch.ones(channels))
        self.frozen_bias = nn.Parameter(torch.zeros(channels))
        for name in ("running_mean", "frozen_mean"):
            self.register_buffer(name, torch.zeros(channels))
        for name in ("running_var", "frozen_var"):
            self.register_buffer(name, torch.ones(channels))

    @classmethod
    def from_batchnorm(cls, bn):
        twin = cls(bn.num_features)
        with torch.no_grad():
            for a, f, source in (
                ("weight", "frozen_weight", bn.weight),
                ("bias", "frozen_bias", bn.bias),
                ("running_mean", "frozen_mean", bn.running_mean),
                ("running_var", "frozen_var", bn.running_var),
            ):
                getattr(twin, a).copy_(source)
                getattr(twin, f).copy_(source)
        return twin

    def forward(self, x):
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5
            )
        half = x.shape[0] // 2
        frozen = F.batch_norm(
            x[:half],
            self.frozen_mean,
            self.frozen_var,
            self.frozen_weight,
            self.frozen_bias,
            False,
            0.1,
            1e-5,
        )
        adaptive = F.batch_norm(
            x[half:], self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, 1e-5
        )
        return torch.cat([frozen, adaptive])


class TorchSmallNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.bn1 = norm(6)
        self.conv2 = nn.Conv2d(6, 8, 3, 2, 1, bias=False)
        self.bn2 = norm(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _kl_sum(z_nat, z_adv):
    return F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1), reduction="sum")


def torch_objective(method, net, x, x_adv, y, anchors, wd=WD):
    """Spec §5 in train mode (adversarial forward first); returns (loss, adversarial logits)."""
    net.train()
    b, h = len(y), len(y) // 2
    z_adv = net(x_adv) if method != "clean" else None
    z_nat = net(x) if method in ("clean", "trades", "twins_trades") else None
    ce = F.cross_entropy
    if method == "clean":
        loss = ce(z_nat, y)
    elif method in ("at", "l2sp"):
        loss = ce(z_adv, y)
    elif method == "trades":
        loss = ce(z_nat, y) + BETA * _kl_sum(z_nat, z_adv) / b
    elif method == "twins_at":
        loss = LAMBDA * ce(z_adv[:h], y[:h]) + ce(z_adv[h:], y[h:])
    else:  # twins_trades
        loss = (
            LAMBDA * ce(z_nat[:h], y[:h])
            + ce(z_nat[h:], y[h:])
            + BETA
            * (LAMBDA * _kl_sum(z_nat[:h], z_adv[:h]) / b + _kl_sum(z_nat[h:], z_adv[h:]) / b)
        )
    if method == "l2sp":  # Li et al. 2018: Omega = alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_new||^2
        loss = loss + L2SP_ALPHA / 2 * sum(((p - a) ** 2).sum() for p, a in anchors)
        loss = loss + wd / 2 * sum((p**2).sum() for p in net.fc.parameters())
    return loss, z_adv if z_adv is not None else z_nat


def torch_inference(net, x, y):
    """(cross-entropy, accuracy) of `net` in eval mode on (x, y): what every method's
    `clean_*` / `adv_*` metrics are, whatever its training forwards."""
    net.eval()
    with torch.no_grad():
        z = net(x)
    return F.cross_entropy(z, y).item(), (z.argmax(1) == y).float().mean().item()


def torch_train(net, batches, method, replicas=1, pgd_steps=PGD_STEPS, wd=WD):
    """Reference steps; returns per step: x_adv (NHWC numpy), loss, the inference metrics
    before the update (`clean_loss`, `clean_acc`, `adv_loss`, `adv_acc`), each wing's
    adversarial accuracy in the training forward, and the state."""
    # L2-SP's regulariser is in its loss: no decay towards zero on top of it
    coupled = 0.0 if method == "l2sp" else wd
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=coupled)
    anchors = [
        (p, p.detach().clone()) for n, p in net.named_parameters() if n.split(".")[-2] != "fc"
    ]  # L2-SP: every pre-trained weight, not the head
    buffers = [b for n, b in net.named_buffers() if "running" in n]
    records = []
    for x_nhwc, y_np in batches:
        x = torch.tensor(x_nhwc.transpose(0, 3, 1, 2))
        y = torch.tensor(y_np)
        optimizer.zero_grad()
        start = [b.clone() for b in buffers]
        ends, losses, advs, logits, inference = [], [], [], [], []
        for xr, yr in zip(x.chunk(replicas), y.chunk(replicas)):
            for b, s in zip(buffers, start):
                b.copy_(s)
            x_adv = torch_pgd(net, xr, yr, EPS, ALPHA, pgd_steps) if method != "clean" else xr
            inference.append([*torch_inference(net, xr, yr), *torch_inference(net, x_adv, yr)])
            loss, z = torch_objective(method, net, xr, x_adv, yr, anchors, wd)
            (loss / replicas).backward()
            ends.append([b.clone() for b in buffers])
            losses.append(loss.item())
            advs.append(x_adv.detach())
            logits.append(z.detach())
        with torch.no_grad():
            for i, b in enumerate(buffers):  # mean-aggregated moving statistics
                b.copy_(torch.stack([e[i] for e in ends]).mean(0))
        optimizer.step()
        correct = [(z.argmax(1) == yr).float() for z, yr in zip(logits, y.chunk(replicas))]
        halves = [(c[: len(c) // 2], c[len(c) // 2 :]) for c in correct]
        clean_loss, clean_acc, adv_loss, adv_acc = np.mean(inference, axis=0)  # equal slices
        records.append(
            dict(
                x_adv=torch.cat(advs).numpy().transpose(0, 2, 3, 1),
                loss=float(np.mean(losses)),
                clean_loss=clean_loss,
                clean_acc=clean_acc,
                adv_loss=adv_loss,
                adv_acc=adv_acc,
                frozen_adv_acc=torch.cat([f for f, _ in halves]).mean().item(),
                adaptive_adv_acc=torch.cat([a for _, a in halves]).mean().item(),
                state=torch_state(net),
            )
        )
    return records


# === the two frameworks' state, side by side =================================================
def _pairs(layer, module):
    """(Keras variable, torch tensor mapped to Keras layout) for one layer/module pair."""
    if isinstance(module, nn.Conv2d):
        return [(layer.kernel, lambda m: m.weight.permute(2, 3, 1, 0))]
    if isinstance(module, nn.Linear):
        return [(layer.kernel, lambda m: m.weight.T), (layer.bias, lambda m: m.bias)]
    pairs = [
        (layer.gamma, lambda m: m.weight),
        (layer.beta, lambda m: m.bias),
        (layer.moving_mean, lambda m: m.running_mean),
        (layer.moving_variance, lambda m: m.running_var),
    ]
    if isinstance(module, TorchTwinBN):
        pairs += [
            (layer.frozen_gamma, lambda m: m.frozen_weight),
            (layer.frozen_beta, lambda m: m.frozen_bias),
            (layer.frozen_mean, lambda m: m.frozen_mean),
            (layer.frozen_variance, lambda m: m.frozen_var),
        ]
    return pairs


def _modules(net):
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, TorchTwinBN)
    for name, module in net.named_modules():
        if isinstance(module, kinds):
            yield name.removeprefix("net.").replace(".", "_"), module


def torch_state(net):
    """{"<keras layer>/<keras variable>": value in Keras layout} for every tensor of `net`."""

    class VariableNames:  # stands in for a Keras layer: attribute -> its own name
        def __getattr__(self, item):
            return item

    return {
        f"{name}/{variable_name}": fn(module).detach().numpy().copy()
        for name, module in _modules(net)
        for variable_name, fn in _pairs(VariableNames(), module)
    }


def keras_state(model):
    state = {}
    for layer in model.layers:
        for name, _ in _pairs_for_layer(layer):
            state[f"{layer.name}/{name}"] = np.asarray(getattr(layer, name)).copy()
    return state


def _pairs_for_layer(layer):
    if isinstance(layer, keras.layers.Conv2D):
        return [("kernel", None)]
    if isinstance(layer, keras.layers.Dense):
        return [("kernel", None), ("bias", None)]
    if isinstance(layer, (keras.layers.BatchNormalization, TwinBatchNormalization)):
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        if isinstance(layer, TwinBatchNormalization) and layer.mode == "twin":
            names += ["frozen_gamma", "frozen_beta", "frozen_mean", "frozen_variance"]
        return [(n, None) for n in names]
    return []


def load_torch_into_keras(net, model):
    for name, module in _modules(net):
        layer = model.get_layer(name)
        for variable, fn in _pairs(layer, module):
            variable.assign(fn(module).detach().numpy())


def assert_same_state(model, reference, rtol, before=None, update_rtol=None):
    """Every weight and moving statistic within `rtol`; with `before`, the step's change of each
    tensor also within `update_rtol` of the reference change (relative to its norm)."""
    got = keras_state(model)
    assert set(got) == set(reference), sorted(set(got) ^ set(reference))
    for key, expected in reference.items():
        np.testing.assert_allclose(got[key], expected, rtol=rtol, atol=1e-6, err_msg=key)
        if before is not None:
            change, expected_change = got[key] - before[key], expected - before[key]
            scale = np.linalg.norm(expected_change)
            if scale > 1e-7:
                assert np.linalg.norm(change - expected_change) <= update_rtol * scale, key


# === model pairs =============================================================================
def small_pair(kind, seed=0):
    """Keras and PyTorch small nets with identical random weights.

    kind: "twin" (twin BN, the two wings deliberately different so a swapped wing shows),
    "plain" (`twins_tf.layers.BatchNormalization`, the plain-BN methods' layer, vs PyTorch's
    own BatchNorm2d), "plain_synchronized" (the same with `synchronized=True`, as `train`
    builds a plain model for several replicas: under a strategy, one BatchNorm2d over the
    global batch, nn.SyncBatchNorm's semantics), "adaptive" (twin layers in adaptive mode vs
    BatchNorm2d).
    """
    torch.manual_seed(seed)
    norm = TorchTwinBN if kind == "twin" else nn.BatchNorm2d
    net = TorchSmallNet(norm)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in net.modules():
            if hasattr(module, "running_var"):
                for name in ("weight", "frozen_weight"):
                    if hasattr(module, name):
                        getattr(module, name).copy_(
                            0.5 + torch.rand(module.weight.shape, generator=generator)
                        )
                for name in ("bias", "running_mean", "frozen_bias", "frozen_mean"):
                    if hasattr(module, name):
                        t = getattr(module, name)
                        t.copy_(0.2 * torch.randn(t.shape, generator=generator))
                for name in ("running_var", "frozen_var"):
                    if hasattr(module, name):
                        t = getattr(module, name)
                        t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=generator))

    def keras_norm(name):
        if kind.startswith("plain"):
            return BatchNormalization(
                momentum=0.9, epsilon=1e-5, synchronized=kind == "plain_synchronized", name=name
            )
        return TwinBatchNormalization(name=name)

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.ZeroPadding2D(1)(inputs)
    x = keras.layers.Conv2D(6, 3, use_bias=False, name="conv1")(x)
    x = keras.layers.ReLU()(keras_norm("bn1")(x))
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="conv2")(x)
    x = keras.layers.ReLU()(keras_norm("bn2")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))
    if kind == "adaptive":
        set_twin_mode(model, "adaptive")
    load_torch_into_keras(net, model)
    return model, net


def make_batches(count=2, batch=BATCH, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = np.clip(rng.uniform(-0.05, 1.05, size=(batch, size, size, 3)), 0, 1).astype("float32")
        batches.append((x, rng.integers(0, CLASSES, batch)))
    return batches


def make_trainer(
    model, method, jit_compile=False, pgd_steps=PGD_STEPS, attack="pgd", wd=WD, **kwargs
):
    if attack == "pgd":
        attack = PGD(EPS, ALPHA, pgd_steps) if method != "clean" else None
    trainer = AdversarialTrainer(
        model,
        method=method,
        attack=attack,
        lambda_twins=LAMBDA,
        beta=BETA,
        weight_decay=wd,
        l2sp_alpha=L2SP_ALPHA,
        **kwargs,
    )
    trainer.compile(keras.optimizers.SGD(LR, momentum=MOMENTUM), jit_compile=jit_compile)
    return trainer


def run_parity(
    model,
    net,
    method,
    *,
    jit_compile=False,
    strategy=None,
    batches=None,
    pgd_steps=PGD_STEPS,
    wd=WD,
    reference_replicas=None,
):
    """Two steps (or as many as `batches`): 1e-4 relative on the first, 1e-3 on the second.

    The reference simulates the strategy's replicas, or `reference_replicas` of them (1: one
    network over the global batch, what synchronized BN computes under any strategy)."""
    batches = batches or make_batches()
    replicas = strategy.num_replicas_in_sync if strategy else 1
    if reference_replicas is None:
        reference_replicas = replicas
    if strategy is not None:
        with strategy.scope():
            trainer = make_trainer(model, method, jit_compile, pgd_steps, wd=wd)
    else:
        trainer = make_trainer(model, method, jit_compile, pgd_steps, wd=wd)
    before = keras_state(model)
    reference = torch_train(
        net, batches, method, replicas=reference_replicas, pgd_steps=pgd_steps, wd=wd
    )
    if method != "clean":  # the step-1 attack, in inference mode, before any update
        x_adv = tf.function(trainer.attack)(model, batches[0][0], batches[0][1])
        np.testing.assert_allclose(x_adv.numpy(), reference[0]["x_adv"], atol=1e-6)

    for step, ((x, y), expected) in enumerate(zip(batches, reference)):
        # fit, not train_on_batch: only fit splits a batch across replicas
        history = trainer.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
        logs = {key: values[0] for key, values in history.history.items()}
        np.testing.assert_allclose(logs["loss"], expected["loss"], rtol=1e-4 * (1 + 9 * step))
        if step == 0:
            # one meaning per metric name, whatever the method's training forwards
            names = ["clean_loss", "clean_acc"] + (
                ["adv_loss", "adv_acc"] if method != "clean" else []
            )
            if method.startswith("twins"):
                names += ["frozen_adv_acc", "adaptive_adv_acc"]
            assert set(logs) == {"loss", *names}
            for name in names:
                tolerance = dict(rtol=1e-4) if name.endswith("loss") else dict(atol=1e-6)
                np.testing.assert_allclose(logs[name], expected[name], err_msg=name, **tolerance)
            assert_same_state(model, expected["state"], 1e-4, before, update_rtol=1e-3)
        else:
            assert_same_state(model, expected["state"], 1e-3)
    return trainer


_STRATEGY = []


def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole module.

    Reduction through one device rather than collective ops: TensorFlow numbers collective
    instances per strategy object, so two strategies over the same devices in one process
    (another test file's, then ours) clash with "Shape mismatch in the collective instance"
    (tensorflow/tensorflow#62790).  The arithmetic (sum of the replicas' gradients, mean of
    their moving statistics) is the same.
    """
    if not _STRATEGY:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
        assert len(devices) == 2, "conftest configures two logical CPU devices"
        _STRATEGY.append(
            tf.distribute.MirroredStrategy(
                devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
            )
        )
    return _STRATEGY[0]


# === parity ==================================================================================
@pytest.mark.parametrize(
    "method,kind",
    [
        ("twins_at", "twin"),
        ("twins_trades", "twin"),
        ("at", "plain"),
        ("trades", "plain"),
        ("l2sp", "plain"),
        ("clean", "plain"),
        ("at", "adaptive"),
    ],
)
def test_two_steps_match_pytorch(method, kind):
    model, net = small_pair(kind)
    run_parity(model, net, method)


def test_l2sp_pulls_the_backbone_to_its_start_and_decays_only_the_head():
    """Li et al.'s L2-SP with a weight decay large enough that decaying the backbone as well
    (today's coupled decay on every weight) would move it visibly: four steps, so the pull
    alpha * (w - w_S^0), zero at the first step, acts on the later ones."""
    model, net = small_pair("plain", seed=3)
    trainer = run_parity(model, net, "l2sp", batches=make_batches(count=4, seed=3), wd=0.5)
    head = {id(v) for v in model.get_layer("fc").weights}
    assert {id(v) for v in trainer._l2sp_new} == head
    assert not head & {id(v) for v in trainer._l2sp_variables}


@pytest.mark.parametrize("method", ["twins_trades", "trades"])
def test_xla_matches_pytorch(method):
    model, net = small_pair("twin" if method.startswith("twins") else "plain", seed=1)
    run_parity(model, net, method, jit_compile=True)


@pytest.mark.parametrize("method,kind", [("twins_trades", "twin"), ("at", "adaptive")])
def test_mirrored_strategy_matches_replicated_reference(method, kind):
    """Two replicas, global batch 8: each replica splits its own 4 rows into 2 + 2."""
    strategy = mirrored_strategy()
    with strategy.scope():
        model, net = small_pair(kind, seed=2)
    run_parity(model, net, method, strategy=strategy)


@pytest.mark.parametrize("method", ["at", "trades"])
def test_mirrored_synchronized_plain_bn_matches_one_batchnorm2d_over_the_global_batch(method):
    """Two replicas of 4 rows with synchronized plain BN (what `train` builds for a plain
    method on several replicas): nn.SyncBatchNorm's semantics, so the reference is one
    BatchNorm2d over all 8 rows: global batch statistics, the EMA with the unbiased variance of
    the global count, gradients through the global statistics."""
    strategy = mirrored_strategy()
    with strategy.scope():
        model, net = small_pair("plain_synchronized", seed=2)
    run_parity(model, net, method, strategy=strategy, reference_replicas=1)


def test_resnet18_twins_trades_matches_pytorch():
    """The real network, weights loaded through twins_tf.weights, both wings from one BN.

    One step: this randomly initialised ResNet (random BN statistics) takes updates as large
    as its weights, so float32 round-off (oneDNN vs PyTorch convolutions) leaves ~1e-4 of the
    update as difference, enough to flip some gradient signs of the *next* PGD (measured: 5%
    of step-2 pixels); the two-step comparison is done on the small net.  Batch 16 at 32 px:
    layer4 is 1x1, so the Adaptive half has 8 values per channel for its batch statistics
    (with 4 the variance estimate is ill-conditioned and round-off reaches 0.3% of the
    update)."""
    from twins_tf.models import build_resnet
    from twins_tf.weights import load_torch_state_dict

    source = torch_resnet("resnet18", num_classes=CLASSES, seed=3)
    model = build_resnet("resnet18", CLASSES, twin=True, input_shape=(32, 32, 3))
    load_torch_state_dict(model, {k: v.numpy() for k, v in source.state_dict().items()}, head=True)
    for name, module in list(source.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent_name, _, child = name.rpartition(".")
            parent = source.get_submodule(parent_name) if parent_name else source
            setattr(parent, child, TorchTwinBN.from_batchnorm(module))
    net = TorchPixelResNet(source)
    rng = np.random.default_rng(4)
    batches = [(rng.uniform(size=(16, 32, 32, 3)).astype("float32"), rng.integers(0, CLASSES, 16))]
    run_parity(model, net, "twins_trades", batches=batches, pgd_steps=2)


def test_resnet18_plain_at_matches_pytorch_batchnorm2d():
    """`build_resnet(twin=False)`, the network of every plain-BN method, in an AT step against
    torchvision's ResNet-18 with its own BatchNorm2d.  Batch 16 at 32 px leaves layer4 16
    values per channel, where the moving variance's unbiased update differs from a biased one
    by 16/15; one step, as in the twin case above."""
    from twins_tf.models import build_resnet
    from twins_tf.weights import load_torch_state_dict

    source = torch_resnet("resnet18", num_classes=CLASSES, seed=3)
    model = build_resnet("resnet18", CLASSES, twin=False, input_shape=(32, 32, 3))
    load_torch_state_dict(model, {k: v.numpy() for k, v in source.state_dict().items()}, head=True)
    rng = np.random.default_rng(4)
    batches = [(rng.uniform(size=(16, 32, 32, 3)).astype("float32"), rng.integers(0, CLASSES, 16))]
    run_parity(model, TorchPixelResNet(source), "at", batches=batches, pgd_steps=2)


# === evaluation ==============================================================================
def test_evaluate_reports_clean_and_pgd_accuracy_in_inference_mode():
    model, net = small_pair("twin", seed=5)
    trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1, batch=16, seed=5)
    trainer.attack = PGD(EPS, ALPHA, PGD_STEPS, random_start=True, seed=0)
    trainer.eval_attack = PGD(EPS, ALPHA, PGD_STEPS)  # what "auto" derives (no random start)
    logs = trainer.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    xt, yt = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(y)
    net.eval()
    with torch.no_grad():
        clean = (net(xt).argmax(1) == yt).float().mean().item()
        loss = F.cross_entropy(net(xt), yt).item()
    adv_x = torch.cat(
        [torch_pgd(net, xt[i : i + 8], yt[i : i + 8], EPS, ALPHA, PGD_STEPS) for i in (0, 8)]
    )
    with torch.no_grad():
        adversarial = (net(adv_x).argmax(1) == yt).float().mean().item()
    with torch.no_grad():
        adversarial_loss = F.cross_entropy(net(adv_x), yt).item()
    assert set(logs) == {"clean_loss", "clean_acc", "adv_loss", "adv_acc"}
    assert abs(logs["clean_acc"] - clean) < 1e-6
    assert abs(logs["adv_acc"] - adversarial) < 1e-6
    assert abs(logs["clean_loss"] - loss) < 1e-4
    assert abs(logs["adv_loss"] - adversarial_loss) < 1e-4


def test_default_eval_attack_drops_the_random_start():
    model, _ = small_pair("twin")
    attack = PGD(EPS, ALPHA, 10, random_start=True, restarts=2, seed=1)
    trainer = AdversarialTrainer(model, method="twins_at", attack=attack)
    assert trainer.eval_attack.get_config() == dict(
        attack.get_config(), random_start=False, restarts=1
    )
    assert (
        AdversarialTrainer(model, method="twins_at", attack=attack, eval_attack=None).eval_attack
        is None
    )


# === fit: XLA, mixed precision, resume ========================================================
def _dataset(batches):
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    return tf.data.Dataset.from_tensor_slices((xs, ys)).batch(
        len(batches[0][1]), drop_remainder=True
    )


@pytest.mark.parametrize("method", ["twins_trades"])
def test_fit_with_xla_and_mixed_bfloat16(method):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, _ = small_pair("twin" if method.startswith("twins") else "plain", seed=6)
        trainer = make_trainer(model, method, jit_compile=True)
        history = trainer.fit(
            _dataset(make_batches(3, seed=6)),
            epochs=2,
            verbose=0,
            validation_data=_dataset(make_batches(1, seed=7)),
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1").kernel.dtype == "float32"
    inference = {"clean_loss", "clean_acc", "adv_loss", "adv_acc"}
    expected = {"loss", *inference, *(f"val_{name}" for name in inference)}
    if method.startswith("twins"):
        expected |= {"frozen_adv_acc", "adaptive_adv_acc"}
    assert set(history.history) == expected
    assert np.isfinite(history.history["loss"]).all()


ALL_METHODS = ["clean", "at", "trades", "l2sp", "twins_at", "twins_trades"]


def _fixed_perturbation(model, images, labels):
    """A deterministic 8/255 sign pattern: the attack's own XLA behaviour is tested in
    test_pgd; a PGD sign can flip on a near-zero gradient between XLA and graph mode."""
    pattern = tf.sign(tf.sin(tf.range(tf.size(images[0]), dtype=tf.float32) * 1.7))
    return tf.clip_by_value(images + EPS * tf.reshape(pattern, tf.shape(images)[1:]), 0.0, 1.0)


def _calibrated_resnet18(twin, size, rng):
    """A ResNet-18 whose BN statistics are those of its own activations (both wings alike), as
    after loading a pre-trained BN; with the initial 0/1 statistics a random ResNet's Frozen
    wing does not normalise and one SGD step blows the weights up."""
    from twins_tf.layers import set_twin_mode
    from twins_tf.models import build_resnet

    model = build_resnet("resnet18", CLASSES, twin=twin, input_shape=(size, size, 3))
    if twin:
        set_twin_mode(model, "adaptive")
    forward = tf.function(lambda x: model(x, training=True))
    for _ in range(30):
        forward(tf.constant(rng.uniform(size=(16, size, size, 3)).astype("float32")))
    if twin:
        set_twin_mode(model, "twin")
        for layer in model.layers:
            if isinstance(layer, TwinBatchNormalization):
                layer.frozen_mean.assign(layer.moving_mean)
                layer.frozen_variance.assign(layer.moving_variance)
    return model


@pytest.mark.parametrize(
    "method",
    [m if m == "twins_trades" else pytest.param(m, marks=pytest.mark.slow) for m in ALL_METHODS],
)
def test_resnet18_fit_with_xla_matches_fit_without(method):
    """Every method trains a ResNet-18 under `fit` with jit_compile=True and its first step
    gives the weights and moving statistics of the same step in plain graph mode;
    a second step must stay finite."""
    from twins_tf.models import build_resnet

    rng = np.random.default_rng(9)
    keras.utils.set_random_seed(9)
    twin = method.startswith("twins")
    start = [np.asarray(w) for w in _calibrated_resnet18(twin, 32, rng).weights]
    ((x, y),) = make_batches(1, batch=8, size=32, seed=9)
    trained = []
    for jit_compile in (False, True):
        model = build_resnet("resnet18", CLASSES, twin=twin, input_shape=(32, 32, 3))
        model.set_weights(start)
        trainer = make_trainer(
            model,
            method,
            jit_compile=jit_compile,
            attack=_fixed_perturbation if method != "clean" else None,
        )
        trainer.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
        trained.append((model, [np.asarray(w) for w in model.weights], trainer))
    (graph, graph_weights, _), (xla, xla_weights, xla_trainer) = trained
    assert not np.allclose(graph_weights[0], start[0])  # conv1 moved
    # XLA and oneDNN convolutions round differently; through 20 BN layers' backward passes
    # that reaches ~1e-4 of a tensor's scale (measured), far below what one step moves.
    for variable, a, b in zip(graph.weights, graph_weights, xla_weights):
        np.testing.assert_allclose(
            b, a, rtol=0, atol=5e-4 * np.abs(a).max() + 1e-7, err_msg=variable.path
        )
    history = xla_trainer.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_backup_and_restore_resumes_exactly(tmp_path):
    """An interrupted run resumed by BackupAndRestore ends with the weights of an
    uninterrupted one: model weights, SGD momentum and the step counter that seeds the
    random start are all in the backup."""
    data = _dataset(make_batches(3, seed=8))

    def new_trainer():
        model, _ = small_pair("twin", seed=8)
        trainer = AdversarialTrainer(
            model,
            method="twins_at",
            weight_decay=WD,
            attack=PGD(EPS, ALPHA, 2, random_start=True, seed=5),
        )
        trainer.compile(keras.optimizers.SGD(LR, momentum=MOMENTUM))
        return trainer

    straight = new_trainer()
    straight.fit(data, epochs=2, verbose=0)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        new_trainer().fit(data, epochs=2, verbose=0, callbacks=[backup, Interrupt()])
    resumed = new_trainer()
    resumed.fit(data, epochs=2, verbose=0, callbacks=[backup])
    assert int(resumed.optimizer.iterations) == 6
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=a.path
        )


# === bad input ===============================================================================
def test_twin_method_needs_twin_model_and_plain_method_refuses_one():
    plain, _ = small_pair("plain")
    twin, _ = small_pair("twin")
    attack = PGD(EPS, ALPHA, 1)
    with pytest.raises(ValueError, match="needs a twin model.*twinify"):
        AdversarialTrainer(plain, method="twins_at", attack=attack)
    with pytest.raises(ValueError, match="'twin' mode.*untwin"):
        AdversarialTrainer(twin, method="at", attack=attack)
    set_twin_mode(twin, "adaptive")
    AdversarialTrainer(twin, method="at", attack=attack)  # plain BN with PyTorch numerics
    with pytest.raises(ValueError, match="every TwinBatchNormalization in 'twin' mode"):
        AdversarialTrainer(twin, method="twins_trades", attack=attack)


def test_constructor_and_compile_errors():
    model, _ = small_pair("plain")
    with pytest.raises(ValueError, match="pass an attack"):
        AdversarialTrainer(model, method="at")
    with pytest.raises(ValueError, match="unknown method"):
        AdversarialTrainer(model, method="fgsm", attack=PGD(EPS, ALPHA, 1))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        AdversarialTrainer(model, method="clean", weight_decay=-1.0)
    trainer = AdversarialTrainer(model, method="clean")
    with pytest.raises(ValueError, match="takes no loss="):
        trainer.compile("sgd", loss="mse")


def test_dataset_errors_are_raised_outside_compiled_code():
    """XLA drops runtime assertions: the checks run in the tf.data pipeline instead."""
    model, _ = small_pair("twin")
    trainer = make_trainer(model, "twins_at", jit_compile=True)
    ((x, y),) = make_batches(1)
    bad_labels = tf.data.Dataset.from_tensor_slices((x, y + CLASSES)).batch(4)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"labels must be class ids in \[0, 4\)"
    ):
        trainer.fit(bad_labels, verbose=0)
    bright = tf.data.Dataset.from_tensor_slices((x * 2, y)).batch(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must lie in \[0, 1\]"):
        trainer.fit(bright, verbose=0)
    ragged_tail = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(4)  # 4, then 3
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of 2 x 1"):
        trainer.fit(ragged_tail, verbose=0)


def test_static_errors_before_training():
    model, _ = small_pair("twin")
    trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1)
    before = keras_state(model)
    with pytest.raises(ValueError, match="floats in"):
        trainer.fit(tf.data.Dataset.from_tensor_slices(((x * 255).astype("uint8"), y)).batch(4))
    with pytest.raises(ValueError, match="integer class ids"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch(4))
    with pytest.raises(ValueError, match="got batch 3"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(3, drop_remainder=True))
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 4\)"):
        trainer.fit(x, y - 1, batch_size=4)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        trainer.fit(x - 0.5, y, batch_size=4)
    with pytest.raises(ValueError, match="got batch 3"):
        trainer.fit(x[:7], y[:7], batch_size=4)  # batches of 4 and 3
    with pytest.raises(ValueError, match="per-replica batch of 3"):
        trainer.train_step((tf.constant(x[:3]), tf.constant(y[:3])))
    for key, value in keras_state(model).items():
        np.testing.assert_array_equal(value, before[key])  # nothing trained


def test_odd_per_replica_batch_under_mirrored_strategy():
    strategy = mirrored_strategy()
    with strategy.scope():
        model, _ = small_pair("twin")
        trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1)
    six = tf.data.Dataset.from_tensor_slices((x[:6], y[:6])).batch(6, drop_remainder=True)
    with pytest.raises(ValueError, match=r"multiple of 2 x 2 replica\(s\); got batch 6"):
        trainer.fit(six, verbose=0)


def _one_line(error):
    text = str(error.value)
    assert "\n" not in text and "Graph execution error" not in text, text
    return text


def test_one_hot_labels_of_the_models_width_train_as_their_class_ids():
    """One-hot rows of the model's width (integer or float, numpy or tf.data) are taken by
    argmax, as the attacks take them: training on them gives the weights of training on the
    class ids.  Soft rows and other widths are refused in one line."""
    ((x, y),) = make_batches(1)
    trained = []
    for labels in (y, np.eye(CLASSES, dtype="int64")[y], np.eye(CLASSES, dtype="float32")[y]):
        model, _ = small_pair("twin", seed=4)
        trainer = make_trainer(model, "twins_at")
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, labels)).batch(4), verbose=0)
        trainer.fit(x, labels, batch_size=4, shuffle=False, verbose=0)
        trained.append(keras_state(model))
    for state in trained[1:]:
        for key, value in trained[0].items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)

    soft = np.full((BATCH, CLASSES), 1.0 / CLASSES, "float32")
    with pytest.raises(ValueError, match="not one-hot") as error:
        trainer.fit(x, soft, batch_size=4, verbose=0)
    _one_line(error)
    with pytest.raises(ValueError, match="not one-hot") as error:
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, soft)).batch(4), verbose=0)
    _one_line(error)
    with pytest.raises(
        ValueError,
        match=r"class ids, shape \(batch,\), or one-hot rows of the "
        r"model's 4 classes, got shape \(8, 3\)",
    ) as error:
        trainer.evaluate(x, np.eye(3, dtype="int64")[y % 3], batch_size=4, verbose=0)
    _one_line(error)
    trainer.evaluate(x, y[:, None], batch_size=4, verbose=0)  # (batch, 1) class ids are fine


def test_unbatched_data_is_refused_with_the_fix():
    model, _ = small_pair("twin")
    trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1)
    with pytest.raises(
        ValueError,
        match=r"the dataset is not batched.*dataset.batch\(batch_size"
        r"\)",
    ) as error:
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0)
    _one_line(error)
    with pytest.raises(ValueError, match=r"one image, not a batch.*images\[None\]"):
        trainer.evaluate(x[0], y[:1], verbose=0)


def test_odd_last_batch_of_a_pipeline_is_found_before_training():
    """batch(4) over 7 examples ends with a batch of 3, which a twin method cannot split: found
    from the batch size and the cardinality before any step (the weights do not move), through
    the map/prefetch a pipeline adds after batch()."""
    model, _ = small_pair("twin")
    trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1)
    before = keras_state(model)
    tail = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(4)
    for dataset in (tail, tail.map(lambda a, b: (a, b)).prefetch(2)):
        with pytest.raises(
            ValueError,
            match=r"multiple of 2 x 1 replica\(s\); got batch 3.*"
            r"drop_remainder=True",
        ) as error:
            trainer.fit(dataset, verbose=0)
        _one_line(error)
    for key, value in keras_state(model).items():
        np.testing.assert_array_equal(value, before[key])  # nothing trained
    trainer.fit(tf.data.Dataset.from_tensor_slices((x[:6], y[:6])).batch(4), verbose=0)  # 4, 2


def test_odd_batch_found_while_training_is_one_line():
    """Where tf.data does not tell the sizes (a filter makes the cardinality unknown), the
    pipeline's own check fires at the odd batch: one line from twins_tf, not TF's graph error
    (still an InvalidArgumentError, as before)."""
    from twins_tf.trainer.checks import InputCheckError

    model, _ = small_pair("twin")
    trainer = make_trainer(model, "twins_at")
    ((x, y),) = make_batches(1)
    unknown = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).filter(lambda a, b: True)
    for data in (unknown.batch(4), tf.data.Dataset.from_tensor_slices((x * 2, y)).batch(4)):
        with pytest.raises(InputCheckError) as error:
            trainer.fit(data, verbose=0)
        assert isinstance(error.value, ValueError)
        assert isinstance(error.value, tf.errors.InvalidArgumentError)
        assert "multiple of 2 x 1 replica(s)" in _one_line(
            error
        ) or "images must lie in [0, 1]" in _one_line(error)


def test_an_attack_in_0_255_units_is_refused():
    model, _ = small_pair("twin")

    class ShiftAttack:
        norm, epsilon, step_size = "linf", 8, 2

        def __call__(self, model, images, labels):
            return images

    with pytest.raises(ValueError, match=r"attack epsilon=8 is in 0-255 units.*8/255") as error:
        AdversarialTrainer(model, method="twins_at", attack=ShiftAttack())
    _one_line(error)
    with pytest.raises(ValueError, match="255"):
        AdversarialTrainer(model, method="twins_at", attack=PGD(8, 2, 1))
    with pytest.raises(ValueError, match=r"eval_attack step_size=2 is in 0-255 units"):
        ShiftAttack.epsilon = 8 / 255
        AdversarialTrainer(
            model, method="twins_at", attack=PGD(EPS, ALPHA, 1), eval_attack=ShiftAttack()
        )
    l2 = PGD(3.0, 0.5, 1, norm="l2")  # an L2 budget above 1 is ordinary (ImageNet: 3.0)
    assert AdversarialTrainer(model, method="twins_at", attack=l2).attack is l2
