"""benchmarks/vs_pytorch.py compares like with like: which worker runs where, and what.

The benchmark's numbers are only meaningful if its two sides build the same network and run
the methods that apply to it.  These checks guard its plumbing, not its timings: twin methods
are not asked of an arch without BatchNormalization, the torch worker of a timm arch runs under
the timm environment's Python (timm does not import in the main one) and the ResNets' under
this one, a missing timm environment is a one-line error, and the torch worker's timm model
has exactly the parameters of twins_tf's `build_model` model of the same arch and input size
(a wrong timm name, width or position-embedding length would change the count).
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import timm_testlib

from twins_tf.models import build_model

sys.path.insert(0, str(timm_testlib.REPO / "benchmarks"))
import vs_pytorch  # noqa: E402


def _args(*argv):
    return vs_pytorch.parse_args(["--timm_python", sys.executable, *argv])


def test_twin_methods_only_for_archs_with_batch_norm():
    args = _args("--archs", "resnet18,vit_s16,convnext_tiny", "--methods", "at,twins_at,trades")
    batch_norm = {"resnet18": True, "vit_s16": False, "convnext_tiny": False}
    runs = {(c["arch"], c["framework"], c["method"]) for c in vs_pytorch._configs(args, batch_norm)}
    for arch in batch_norm:
        assert {(arch, "torch", "at"), (arch, "torch", "trades")} <= runs
        assert {(arch, "tf", "at"), (arch, "tf", "trades")} <= runs
    assert ("resnet18", "tf", "twins_at") in runs
    assert not {(a, "tf", "twins_at") for a in ("vit_s16", "convnext_tiny")} & runs


def test_registry_says_which_archs_have_batch_norm():
    """The driver asks the registry (in a child process) rather than keeping its own list."""
    answer = vs_pytorch.arch_batch_norm(["resnet18", "vit_s16", "convnext_tiny"])
    assert answer == {"resnet18": True, "vit_s16": False, "convnext_tiny": False}


def test_missing_timm_environment_is_a_one_line_error(capsys, tmp_path):
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(SystemExit):
        vs_pytorch.parse_args(["--archs", "vit_s16", "--timm_python", missing])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert missing in error and "make test" in error and "timm_requirements.txt" in error
    # ResNets alone do not need it.
    vs_pytorch.parse_args(["--archs", "resnet18", "--timm_python", missing])


@pytest.mark.parametrize(
    "arch, framework, expected",
    [("vit_s16", "torch", "timm"), ("resnet18", "torch", "main"), ("vit_s16", "tf", "main")],
)
def test_worker_python(monkeypatch, arch, framework, expected):
    """Only the torch side of a timm arch runs under the timm Python, without this
    environment's PYTHON* variables (its PYTHONPATH would shadow the timm environment's)."""
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        return types.SimpleNamespace(stdout=vs_pytorch.RESULT_PREFIX + "{}", stderr="")

    monkeypatch.setattr(vs_pytorch.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    config = dict(
        framework=framework,
        arch=arch,
        method="at",
        variant="torch",
        threads=2,
        omp_wait_policy="PASSIVE",
        timm_python="/the/timm/python",
    )
    vs_pytorch._launch(config, timeout=1)
    python = {"timm": "/the/timm/python", "main": sys.executable}[expected]
    assert seen["command"][0] == python
    assert ("PYTHONPATH" in seen["env"]) == (expected == "main")


@pytest.mark.parametrize("arch", ["vit_s16", "convnext_tiny"])
def test_torch_worker_builds_the_same_network(arch):
    """One tiny step of the torch worker under the timm Python: it runs, and its network has
    as many parameters as twins_tf's (32 px: a 2 x 2 ViT grid, 5 position embeddings)."""
    config = dict(
        framework="torch",
        arch=arch,
        method="at",
        variant="torch",
        image_size=32,
        upsample=1,
        batch=2,
        pgd_steps=1,
        threads=1,
        repeats=1,
        num_classes=7,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [timm_testlib.timm_python(), vs_pytorch.__file__, "--one", json.dumps(config)],
        capture_output=True,
        text=True,
        env=dict(env, CUDA_VISIBLE_DEVICES=""),
        timeout=600,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(vs_pytorch.RESULT_PREFIX)]
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[0][len(vs_pytorch.RESULT_PREFIX) :])
    assert "timm" in result["version"]
    assert np.isfinite(result["step_times"]).all()
    model = build_model(arch, 7, input_shape=(32, 32, 3))
    ours = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert round(result["memory"]["parameters_mib"] * 2**20 / 4) == ours
