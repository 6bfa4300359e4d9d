"""`python -m twins_tf.convert` end to end, and `weights.convert_checkpoint`'s argument checks.

The binary runs in a subprocess, as a user runs it (absl flags are process-global, so importing
binaries into the test process could clash with other binaries' flags).  The written file is
checked against PyTorch's logits for the network that wrote the checkpoint.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from binaries_testlib import REPO_ROOT
from torch_resnet import (
    robustness_state_dict,
    save_robustness_checkpoint,
    torch_logits,
    torch_resnet,
)

from twins_tf import weights
from twins_tf.models import build_resnet


@pytest.fixture(scope="module")
def net():
    return torch_resnet("resnet18", 1000, seed=11)


def run_convert(*flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "twins_tf.convert", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def error_line(result):
    """The binary's error: exit 1, no traceback, one 'convert: error:' line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("convert: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_converts_a_robustness_checkpoint_and_reports_it(tmp_path, net):
    checkpoint = save_robustness_checkpoint(net, tmp_path / "resnet18_linf_eps4.0.ckpt", epoch=90)
    output = tmp_path / "out" / "robust_r18.weights.h5"
    result = run_convert(f"--checkpoint={checkpoint}", "--arch=resnet18", f"--output={output}")
    assert result.returncode == 0, result.stderr
    report = result.stdout
    for text in (
        "format: robustness, entry 'model'",
        "arch in file: resnet18",
        "epoch: 90",
        "eps: 0.0156863 (from the file name: linf eps4.0/255)",
        "normaliser in file: mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)",
        f"tensors: {sum(1 for k in net.state_dict() if 'num_batches' not in k)} loaded",
        "head: 1000 classes, from the checkpoint",
        f"wrote {output}",
    ):
        assert text in report, report

    # The file gives PyTorch's logits in a twin model with the checkpoint's head.
    model = build_resnet("resnet18", 1000, twin=True, input_shape=(64, 64, 3))
    weights.load_pretrained(model, output, head=True)
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    reference = torch_logits(net, x)
    assert np.abs(model(x).numpy() - reference).max() <= 1e-4 * np.abs(reference).max()


def test_refuses_unsafe_pickles_unless_allowed(tmp_path, net):
    marker = tmp_path / "created_by_unpickling"

    class MakeDirOnLoad:  # a stand-in for malicious code: unpickling calls os.mkdir(marker)
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    checkpoint = tmp_path / "dill_pickled.ckpt"
    torch.save(
        {"model": robustness_state_dict(net), "epoch": 1, "extra": MakeDirOnLoad()}, checkpoint
    )
    output = tmp_path / "r18.weights.h5"

    refused = run_convert(f"--checkpoint={checkpoint}", "--arch=resnet18", f"--output={output}")
    line = error_line(refused)
    assert "--allow_pickle" in line and "arbitrary code" in line and "mkdir" in line
    assert not marker.exists() and not output.exists()

    allowed = run_convert(
        f"--checkpoint={checkpoint}", "--arch=resnet18", f"--output={output}", "--allow_pickle"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert output.exists()
    assert marker.exists()  # the file's code ran: exactly why it is opt-in


def test_convert_checkpoint_argument_checks(tmp_path, net):
    checkpoint = save_robustness_checkpoint(net, tmp_path / "r18.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    cases = [
        ((checkpoint, "resnet18", tmp_path / "out.h5"), {}, "must end in .weights.h5"),
        ((checkpoint, "resnet20", tmp_path / "o.weights.h5"), {}, "unknown arch"),
        (
            (checkpoint, "resnet18", tmp_path / "o.weights.h5"),
            {"num_classes": 10},
            "1000-class head, not the 10 classes",
        ),
        ((text, "resnet18", tmp_path / "o.weights.h5"), {}, "not a checkpoint"),
        (
            (checkpoint, "resnet50", tmp_path / "o.weights.h5"),
            {},
            "the checkpoint holds a resnet18 but the model is a resnet50",
        ),
    ]
    for args, kwargs, expected in cases:
        with pytest.raises(weights.CheckpointError) as info:
            weights.convert_checkpoint(*args, **kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.weights.h5").exists()
    summary = weights.convert_checkpoint(
        checkpoint, "resnet18", tmp_path / "o.weights.h5", num_classes=1000
    )
    assert summary["num_classes"] == 1000 and summary["head_from_checkpoint"]


@pytest.mark.parametrize(
    "binary", ["compare", "convert", "demo", "evaluate", "export", "pretrain", "train"]
)
def test_help_shows_the_docstring_command_lines_as_written(binary):
    """`--help` prints the module docstring: a shell continuation must survive (raw string)."""
    import ast
    import importlib

    path = REPO_ROOT / "twins_tf" / f"{binary}.py"
    source = path.read_text()
    literal = ast.get_source_segment(source, ast.parse(source).body[0].value)
    shown = [
        line.strip() for line in importlib.import_module(f"twins_tf.{binary}").__doc__.splitlines()
    ]
    for line in literal.splitlines():
        if line.rstrip().endswith("\\"):
            assert line.strip().lstrip('r"') in shown, f"{binary}: {line.strip()!r} is mangled"
