"""`--init` (training.init_stage): the head probe on the frozen backbone before `--method`.

The probe's steps are compared with PyTorch steps written here (a torchvision-layout ResNet-18
with random BN statistics, the same weights and batches; SGD momentum 0.9 with coupled weight
decay on the head only, the cosine learning rate written out by hand); the run-level test reads
the weights files with h5py (not Keras) and compares them with the source weights and with the
head the main stage starts from.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from binaries_testlib import (
    FINETUNE_ARGS,
    evaluate_settings,
    file_snapshot,
    read_weights,
    settings,
    source_run,
)
from torch_resnet import TorchPixelResNet, torch_pgd, torch_resnet

from twins_tf import evaluation, serving
from twins_tf.models.heads import head_layer
from twins_tf.training import init_stage, loop, runs
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import Settings, SetupError

CLASSES = 5
# h5 paths of the head in a build_resnet .weights.h5 (its only Dense layer): kernel, bias
HEAD_KEYS = ("layers/dense/vars/0", "layers/dense/vars/1")


def _probe_settings(tmp_path, init, **changes):
    main = Settings(
        dataset="digits_5_9",
        image_size=16,
        arch="resnet18",
        method="twins_at",
        pretrained="source.weights.h5",
        model_dir=str(tmp_path),
        init=init,
        init_epochs=1,
        init_lr=0.05,
        init_weight_decay=0.01,
        attack_eps=8 / 255,
        attack_step=2 / 255,
        attack_steps=2,
        batch_size=8,
        num_classes=CLASSES,
        **changes,
    )
    return init_stage.init_settings(main)


@pytest.mark.parametrize("init", ["robust_linear_probe", "linear_probe"])
def test_a_probe_step_matches_pytorch_and_leaves_the_backbone_alone(tmp_path, init):
    from twins_tf.attacks.pgd import PGD
    from twins_tf.models import build_resnet
    from twins_tf.training.trainer_setup import make_trainer
    from twins_tf.weights import load_torch_state_dict

    sub = _probe_settings(tmp_path, init)
    assert (sub.method, sub.stage, sub.twin) == (
        {"robust_linear_probe": "at", "linear_probe": "clean"}[init],
        "init",
        False,
    )
    source = torch_resnet("resnet18", num_classes=CLASSES, seed=3)
    model = build_resnet("resnet18", CLASSES, twin=False, input_shape=(16, 16, 3))
    load_torch_state_dict(model, {k: v.numpy() for k, v in source.state_dict().items()}, head=True)
    # 4 steps per epoch, 1 epoch: the cosine lr from init_lr at step 0 to 0 at step 4
    trainer = make_trainer(model, sub, steps_per_epoch=4)
    for step, expected in enumerate(
        [
            0.05,
            0.05 * (1 + math.cos(math.pi / 4)) / 2,
            0.025,
            0.05 * (1 + math.cos(3 * math.pi / 4)) / 2,
            0.0,
        ]
    ):
        trainer.optimizer.iterations.assign(step)
        assert float(trainer.optimizer.learning_rate) == pytest.approx(expected, abs=1e-8)
    trainer.optimizer.iterations.assign(0)
    assert [v.path for v in model.trainable_variables] == ["fc/kernel", "fc/bias"]
    if init == "robust_linear_probe":
        assert trainer.attack.random_start  # RoLI's training PGD starts at random...
        # ...which PyTorch cannot replay: the same PGD from the clean image on both sides
        trainer.attack = PGD(sub.attack_eps, sub.attack_step, sub.attack_steps, random_start=False)
    frozen_before = {v.path: v.numpy().copy() for v in model.weights if "fc" not in v.path}
    start_kernel = model.get_layer("fc").get_weights()[0].copy()

    net = TorchPixelResNet(source).eval()  # frozen: BN in eval mode throughout
    head = [net.net.fc.weight, net.net.fc.bias]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(head, lr=0.05, momentum=0.9, weight_decay=0.01)
    rng = np.random.default_rng(5)
    for _ in range(1):  # one step: Keras's momentum keeps lr inside the velocity,
        # PyTorch's outside, which differ once the lr changes (equal at the first step)
        images = rng.uniform(size=(8, 16, 16, 3)).astype("float32")
        labels = rng.integers(0, CLASSES, 8)
        trainer.train_on_batch(images, labels)
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        y = torch.from_numpy(labels).long()
        if init == "robust_linear_probe":
            x = torch_pgd(net, x, y, 8 / 255, 2 / 255, 2)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    kernel, bias = model.get_layer("fc").get_weights()
    np.testing.assert_allclose(kernel, net.net.fc.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias, net.net.fc.bias.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(kernel - start_kernel).max() > 1e-3  # the head moved
    for v in model.weights:  # conv kernels, BN gamma/beta and moving statistics: unchanged
        if "fc" not in v.path:
            np.testing.assert_array_equal(v.numpy(), frozen_before[v.path], err_msg=v.path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return source_run(tmp_path_factory) / run_files.BEST_WEIGHTS


def test_a_run_probes_first_starts_from_that_head_and_reuses_it(tmp_path, pretrained, monkeypatch):
    """End to end on tiny data through the train binary's flags: the sub-run exists and
    loads, its backbone is the source's, the main stage starts from its best head, a restarted
    main run reuses the finished probe, and evaluate and export take the sub-run."""
    heads = []
    make_trainer = loop.make_trainer

    def spy(model, s, steps_per_epoch):  # the head each stage's trainer starts from
        heads.append((s.stage, [w.copy() for w in head_layer(model).get_weights()]))
        return make_trainer(model, s, steps_per_epoch)

    monkeypatch.setattr(loop, "make_trainer", spy)
    model_dir = tmp_path / "run"
    args = [
        *FINETUNE_ARGS,
        f"--pretrained={pretrained}",
        f"--model_dir={model_dir}",
        "--init=robust_linear_probe",
        "--init_epochs=2",
        "--init_lr=0.005",
        "--epochs=1",
    ]
    loop.run(settings("train", args), verbose=0)

    assert [stage for stage, _ in heads] == ["init", "main"]
    sub = model_dir / init_stage.INIT_DIR
    for name in (
        "config.json",
        "best.weights.h5",
        "last.weights.h5",
        "metrics.csv",
        "summary.json",
    ):
        assert (sub / name).is_file(), name
    assert (sub / "tensorboard").is_dir() and (sub / "backup").is_dir()
    assert len((sub / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    sub_config = json.loads((sub / "config.json").read_text())
    assert (
        sub_config["stage"],
        sub_config["method"],
        sub_config["epochs"],
        sub_config["lr"],
        sub_config["twin"],
    ) == ("init", "at", 2, 0.005, False)
    main_config = json.loads((model_dir / "config.json").read_text())
    assert (
        main_config["init"],
        main_config["init_epochs"],
        main_config["init_lr"],
        main_config["stage"],
        main_config["method"],
    ) == ("robust_linear_probe", 2, 0.005, "main", "twins_at")
    assert runs.load_run(str(sub)).output_shape[-1] == 5

    best, source = read_weights(sub / "best.weights.h5"), read_weights(pretrained)
    assert sorted(best) == sorted(source)
    moved = [k for k in best if k not in HEAD_KEYS and not np.array_equal(best[k], source[k])]
    assert not moved, f"the probe changed the backbone: {moved[:3]}"
    main_head = heads[1][1]
    for got, key in zip(main_head, HEAD_KEYS):
        np.testing.assert_array_equal(got, best[key])
    assert not np.allclose(main_head[0], heads[0][1][0])  # the probe trained its head

    # a main run that has not finished an epoch (killed in its first) next to a finished
    # probe: the probe is reused, not redone, and the main stage starts from its head again
    restarted = tmp_path / "restarted"
    shutil.copytree(sub, restarted / init_stage.INIT_DIR)
    snapshot = file_snapshot(restarted / init_stage.INIT_DIR)
    heads.clear()
    loop.run(
        settings(
            "train",
            [f"--model_dir={restarted}" if a.startswith("--model_dir=") else a for a in args],
        ),
        verbose=0,
    )
    assert [stage for stage, _ in heads] == ["main"]
    assert file_snapshot(restarted / init_stage.INIT_DIR) == snapshot  # not probed again
    for got, key in zip(heads[0][1], HEAD_KEYS):
        np.testing.assert_array_equal(got, best[key])

    # the other binaries take the probe as a run of its own
    report = evaluation.evaluate(
        evaluate_settings(
            [f"--model_dir={sub}", "--attacks=clean", "--max_examples=8", "--batch_size=8"]
        )
    )
    assert report["results"]["clean"]["examples"] == 8
    serving.export_run(str(sub), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(binary="pretrain", pretrained=None, method="at"),
            "pretrain trains from scratch: drop --init",
        ),
        (
            dict(pretrained=None, method="at"),
            "--init=robust_linear_probe trains a head on the "
            "frozen --pretrained backbone but no --pretrained",
        ),
        (dict(init_epochs=0), "--init_epochs must be at least 1"),
        (dict(init_lr=0.0), "--init_lr must be positive"),
        (dict(init_weight_decay=-1e-3), "--init_weight_decay must be >= 0"),
        (dict(init="warm"), "--init='warm' is not one of random, linear_probe"),
        (dict(init_epochs=1.5), "--init_epochs must be an integer"),
        (dict(stage="init", method="twins_at"), "stage='init' is the head-probing sub-run"),
    ],
)
def test_every_wrong_init_setting_is_a_one_line_setup_error(tmp_path, change, message):
    values = dict(
        dataset="cifar10",
        model_dir=str(tmp_path),
        pretrained="x.weights.h5",
        method="twins_at",
        init="robust_linear_probe",
    )
    values.update(change)
    with pytest.raises(SetupError, match=message) as error:
        Settings(**values)
    assert "\n" not in str(error.value)


def test_random_init_with_allow_random_init_and_a_probe_dir_of_other_settings(tmp_path):
    """--allow_random_init lets a probe start from a random backbone; an init/ holding a probe
    of other settings is refused before anything is written."""
    s = Settings(
        dataset="cifar10",
        model_dir=str(tmp_path),
        method="at",
        init="linear_probe",
        allow_random_init=True,
        num_classes=10,
    )
    assert init_stage.check(s) == "new"
    other = init_stage.init_settings(s.replace(init_lr=0.5))
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text(json.dumps(other.to_dict()))
    before = file_snapshot(tmp_path)
    with pytest.raises(
        SetupError,
        match=r"init holds a run with different settings \(init_lr: "
        r"0\.5 in the run, 0\.1 now; lr: 0\.5 in the run, "
        r"0\.1 now\)",
    ) as error:
        init_stage.check(s)
    assert "\n" not in str(error.value) and file_snapshot(tmp_path) == before


def test_an_autolora_run_probes_the_plain_network_and_compare_checks_the_probe_up_front(tmp_path):
    """The probe of `--method=autolora --lora_rank=8 --init=...` is method at without a LoRA
    branch (only autolora trains one); compare checks every row's probe before any work."""
    from twins_tf import comparison

    main = Settings(
        dataset="digits_5_9",
        method="autolora",
        lora_rank=8,
        num_classes=CLASSES,
        init="robust_linear_probe",
        pretrained="source.weights.h5",
        model_dir=str(tmp_path),
    )
    sub = init_stage.init_settings(main)
    assert (sub.method, sub.lora_rank, sub.stage) == ("at", 0, "init")
    base = Settings(
        dataset="digits_5_9",
        method="at",
        num_classes=CLASSES,
        pretrained="source.weights.h5",
        model_dir=str(tmp_path),
    )
    plan, _ = comparison.plan_rows(
        base, ["autolora+lora_rank=8+init=robust_linear_probe"], [0], str(tmp_path)
    )
    assert list(plan) == [comparison.parse_variant("autolora+lora_rank=8+init=robust_linear_probe")]
