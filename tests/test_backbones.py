"""The LayerNorm backbones through the binaries: refusals before any file, and a ViT from a
pre-training run to a compare of AT and AT + robust linear probe, evaluated and exported.

The networks themselves are checked against timm in test_vit.py and test_convnext.py; this
file checks that every run kind takes them.  A ViT-S/16 on 16-pixel digits is one patch and
a class token, so its runs take seconds.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from binaries_testlib import TINY, settings

from twins_tf import comparison, serving
from twins_tf.models import build_model
from twins_tf.training import loop
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import Settings, SetupError

VIT = [arg for arg in TINY if not arg.startswith("--arch=")] + ["--arch=vit_s16"]


def test_a_twin_method_on_a_layernorm_backbone_is_one_line_and_writes_nothing(tmp_path):
    """What `train` runs (the binary prints the SetupError's one line and exits 1, as
    test_train checks for every SetupError)."""
    model_dir = tmp_path / "run"
    for arch, method in (("vit_s16", "twins_at"), ("convnext_tiny", "twins_trades")):
        args = ["--dataset=digits_5_9", *VIT, f"--arch={arch}", f"--method={method}"]
        with pytest.raises(SetupError) as error:
            loop.run(settings("train", [*args, f"--model_dir={model_dir}"]), verbose=0)
        message = str(error.value)
        assert "\n" not in message
        assert f"{arch} has no BatchNormalization: TWINS needs BN's population statistics" in (
            message
        )
        assert "use one of clean, at, trades, l2sp, autolora" in message
        assert not model_dir.exists()


def test_an_image_size_the_patch_does_not_divide_is_one_line():
    args = ["--dataset=digits_5_9", *VIT, "--method=at", "--image_size=20"]
    with pytest.raises(SetupError, match=r"--image_size=20 .*16.*32") as error:
        Settings.from_dict(settings("train", args))
    assert "\n" not in str(error.value)


def test_compare_at_and_robust_linear_probe_on_a_small_vit_then_export(tmp_path):
    # The source: a ViT-S/16's weights as `model.save_weights` writes them (a pre-training
    # run writes the same file; its training is not what this test is about).
    pretrained = tmp_path / "source.weights.h5"
    build_model("vit_s16", 5, input_shape=(16, 16, 3)).save_weights(pretrained)
    base = settings(
        "train",
        [
            "--dataset=digits_5_9",
            *VIT,
            "--epochs=1",
            "--lr=0.01",
            "--validation=none",  # a ViT's every traced function costs ~10 s here
            f"--pretrained={pretrained}",
        ],
    )
    summary, _ = comparison.compare(
        base,
        methods=["at", "at+init=robust_linear_probe+init_epochs=1"],
        seeds=[0],
        baseline="at",
        output_dir=tmp_path,
        attacks=["clean", "pgd1"],
        max_examples=32,
        batch_size=16,
        log=lambda *_: None,
    )
    for row in ("at", "at+init=robust_linear_probe+init_epochs=1"):
        cells = summary["methods"][row]
        for attack in ("clean", "pgd1"):
            (accuracy,) = cells[attack]["values"]
            assert 0.0 <= accuracy <= 1.0
        assert cells["pgd1"]["values"][0] <= cells["clean"]["values"][0]
    run = next(p for p in (tmp_path / "runs").iterdir() if "robust_linear_probe" in p.name)
    config = run_files.read_config(run)
    assert config["arch"] == "vit_s16" and config["init"] == "robust_linear_probe"
    assert json.loads((run / "summary.json").read_text())["trained_epochs"] == 1

    exported = tmp_path / "exported"
    serving.export_run(run, exported)
    from twins_tf.training.runs import load_run

    model = load_run(run)
    images = np.random.default_rng(0).random((3, 16, 16, 3)).astype("float32")
    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    served = signature(images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(served, model(images, training=False).numpy(), rtol=1e-5, atol=1e-5)
