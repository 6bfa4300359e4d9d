"""The benchmark scripts compare like with like, and say so in lines that cannot mislead.

The benchmarks' numbers are only meaningful if the two sides of a comparison build the same
network, run the methods that apply to it in the same precision, and ran on a quiet machine.
These checks guard the plumbing, not the timings.  vs_pytorch.py: twin methods are not asked
of an arch without BatchNormalization, the torch worker of a timm arch runs under the timm
environment's Python (timm does not import in the main one) and the ResNets' under this one, a
missing timm environment is a one-line error, the torch worker's timm model has exactly the
parameters of twins_tf's `build_model` model of the same arch and input size (a wrong timm
name, width or position-embedding length would change the count), and the bfloat16 variants
really compute in bfloat16 (PyTorch's autocast; twins_tf's attack in the model's policy), and
vs_pytorch pairs twins_tf's bf16_attack with torch bf16.  The comparing scripts: the summary
lines carry the ratio, both sides, the CPU and the loads, and withhold the ratio when the load
at the start is high -- with the load read from a replaced `machine.load_average`, never by
loading the machine.  profile_attack.py: its op times land in the layer kinds they ran for.

benchmarks/bfloat16_cost.py: its paired statistics on a case computed by hand, and one run of
the whole script at a tiny size (its runs are trained in the precision asked, its numbers are
its outcomes').
"""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import timm_testlib

from twins_tf.models import build_model

sys.path.insert(0, str(timm_testlib.REPO / "benchmarks"))
import autoattack as autoattack_bench  # noqa: E402
import bfloat16_cost  # noqa: E402
import machine  # noqa: E402
import profile_attack  # noqa: E402
import train_step  # noqa: E402
import vs_pytorch  # noqa: E402

# /proc/cpuinfo's first processor block, trimmed (an AVX-512 + BF16 CPU without AMX).
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni

processor\t: 1
model name\t: another block, not read
flags\t\t: amx_tile amx_bf16
"""
CPU = (
    "AMD EPYC 9B14 (family 25 model 17) [avx2 avx512f avx512_vnni avx512_bf16; "
    "no amx_tile amx_bf16]"
)


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
        variant="fp32",
        threads=2,
        omp_wait_policy="PASSIVE",
        timm_python="/the/timm/python",
    )
    vs_pytorch._launch(config, timeout=1)
    python = {"timm": "/the/timm/python", "main": sys.executable}[expected]
    assert seen["command"][0] == python
    assert ("PYTHONPATH" in seen["env"]) == (expected == "main")


def _run_worker(framework, variant, method="at", *, arch="resnet18", python=None, env=None):
    """The result of one vs_pytorch.py worker process at 32 px, batch 2, PGD-1, one timed
    step (`python` and `env`: the interpreter and environment to run it with)."""
    config = dict(
        framework=framework,
        arch=arch,
        method=method,
        variant=variant,
        image_size=32,
        upsample=1,
        batch=2,
        pgd_steps=1,
        threads=1,
        repeats=1,
        num_classes=7,
    )
    done = subprocess.run(
        [python or sys.executable, vs_pytorch.__file__, "--one", json.dumps(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ if env is None else env, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
        timeout=600,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(vs_pytorch.RESULT_PREFIX)]
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[0][len(vs_pytorch.RESULT_PREFIX) :])
    assert np.isfinite(result["step_times"]).all()
    return result


@pytest.mark.parametrize("arch", ["vit_s16", "convnext_tiny"])
def test_torch_worker_builds_the_same_network(arch):
    """One tiny step of the torch worker under the timm Python: it runs, and its network has
    as many parameters as twins_tf's (32 px: a 2 x 2 ViT grid, 5 position embeddings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = _run_worker("torch", "fp32", arch=arch, python=timm_testlib.timm_python(), env=env)
    assert "timm" in result["version"]
    model = build_model(arch, 7, input_shape=(32, 32, 3))
    ours = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert round(result["memory"]["parameters_mib"] * 2**20 / 4) == ours


# --- the machine line, the load gate and the summary line --------------------------------------
def _loads(monkeypatch, *values):
    """Make machine.load_average return `values` in turn (start, end)."""
    values = iter(values)
    monkeypatch.setattr(machine, "load_average", lambda: next(values))


def test_cpu_description_names_the_model_and_the_kernel_flags():
    assert machine.cpu_description(CPUINFO) == CPU
    bare = machine.cpu_description("model name : Intel Xeon\nflags : sse2 avx2 fma\n")
    assert bare == ("Intel Xeon [avx2; no avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16]")


def test_summary_line_carries_ratio_both_sides_cpu_and_loads(monkeypatch):
    _loads(monkeypatch, 0.12, 1.98)
    run = machine.Run(cpuinfo=CPUINFO)
    run.finish()
    line = run.summary(
        "resnet18 twins_at fused vs torch at fp32",
        machine.Side("twins_tf", 812.0),
        machine.Side("torch", 671.0),
        unit="ms",
        per="per step",
    )
    assert line == (
        "SUMMARY resnet18 twins_at fused vs torch at fp32: ratio 1.21 (twins_tf 812 ms, "
        f"torch 671 ms per step; CPU: {CPU}; load 0.12 -> 1.98)"
    )


@pytest.mark.parametrize("allow_load", [False, True])
def test_load_gate_withholds_the_ratio_on_a_loaded_machine(monkeypatch, allow_load):
    _loads(monkeypatch, 1.51, 2.40)
    run = machine.Run(allow_load=allow_load, cpuinfo=CPUINFO)
    run.finish()
    line = run.summary("x", machine.Side("a", 3.0), machine.Side("b", 2.0), unit="s", digits=1)
    assert "a 3.0 s, b 2.0 s" in line and CPU in line and "load 1.51 -> 2.40" in line
    assert "LOADED" in run.table_label() and "LOADED" in run.machine_line()
    if allow_load:
        assert line.startswith("SUMMARY LOADED x: ratio 1.50 (LOADED: load average 1.51")
    else:
        assert "ratio 1.50" not in line and "LOADED" not in line
        assert line.startswith(
            "SUMMARY x: ratio withheld: load average 1.51 at start > 1.5 (the machine is not "
            "quiet; rerun when it is)"
        )


def test_load_gate_passes_at_the_limit_and_names_a_failed_side(monkeypatch):
    _loads(monkeypatch, 1.5, 1.5)
    run = machine.Run(cpuinfo=CPUINFO)
    assert not run.loaded and run.table_label() == ""
    line = run.summary("x", machine.Side("a", None), machine.Side("b", 2.0), unit="s")
    assert line.startswith("SUMMARY x: no ratio (a failed)")


# --- the drivers' summaries, from made-up worker results ---------------------------------------
def _fake_vs_pytorch_run(monkeypatch, capsys, load, *extra):
    """vs_pytorch.main with made-up workers: torch fp32 500 ms, twins_tf 600 ms, and 0.7x
    those for the bfloat16 variants; returns the printed lines."""

    def launch(config, timeout):
        seconds = {"torch": 0.5, "tf": 0.6}[config["framework"]]
        seconds *= 0.7 if "bf16" in config["variant"] else 1.0
        memory = dict(imported=1, model=2, parameters_mib=1, attack=3, step=4)
        memory["resident_at_end"] = dict(anon=1, file=1)
        dtypes = dict(attack="float32", train="float32")
        return dict(
            config,
            step_times=[seconds],
            cpu_times=[seconds],
            first_s=1.0,
            peak_rss_mib=100.0,
            version="v",
            memory=memory,
            compute_dtypes=dtypes,
        )

    monkeypatch.setattr(vs_pytorch, "_launch", launch)
    monkeypatch.setattr(vs_pytorch, "arch_batch_norm", lambda archs, root: dict.fromkeys(archs, 1))
    monkeypatch.setattr(machine, "_cpuinfo_text", lambda: CPUINFO)
    _loads(monkeypatch, load, 1.9)
    argv = ["--archs", "resnet18", "--methods", "at,twins_at", "--rounds", "1", *extra]
    vs_pytorch.main(["--timm_python", sys.executable, *argv])
    return capsys.readouterr().out.splitlines()


def test_vs_pytorch_pairs_bf16_attack_with_torch_bf16(monkeypatch, capsys):
    out = _fake_vs_pytorch_run(
        monkeypatch,
        capsys,
        0.3,
        "--tf_variants",
        "fused,bf16,bf16_attack",
        "--torch_variants",
        "fp32,bf16",
    )
    summary = {line.split(":")[0][len("SUMMARY ") :]: line for line in out if "SUMMARY" in line}
    tail = f"per step; CPU: {CPU}; load 0.30 -> 1.90)"
    for method in ("at", "twins_at"):
        assert summary[f"resnet18 {method} bf16_attack vs torch at bf16"].endswith(
            f"ratio 1.20 (twins_tf 420 ms, torch 350 ms {tail}"
        )
        assert summary[f"resnet18 {method} fused vs torch at fp32"].endswith(
            f"ratio 1.20 (twins_tf 600 ms, torch 500 ms {tail}"
        )
        # bf16 keeps its attack in float32: compared with torch's float32 step
        assert summary[f"resnet18 {method} bf16 vs torch at fp32"].endswith(
            f"ratio 0.84 (twins_tf 420 ms, torch 500 ms {tail}"
        )
        assert f"resnet18 twins_tf {method} bf16_attack vs fused" in summary
    assert "resnet18 twins_tf twins_at vs at (fused)" in summary
    assert summary["resnet18 torch at bf16 vs fp32"].endswith(
        f"ratio 0.70 (torch bf16 350 ms, torch fp32 500 ms {tail}"
    )
    assert len(summary) == 6 + 4 + 3 + 1


def test_vs_pytorch_withholds_every_ratio_when_loaded(monkeypatch, capsys):
    out = _fake_vs_pytorch_run(monkeypatch, capsys, 2.5)
    summary = [line for line in out if line.startswith("SUMMARY")]
    assert summary and all("ratio withheld: load average 2.50 at start > 1.5" in x for x in summary)
    assert any(line.startswith("Setting:") and "[LOADED" in line for line in out)
    out = _fake_vs_pytorch_run(monkeypatch, capsys, 2.5, "--allow_load")
    summary = [line for line in out if line.startswith("SUMMARY")]
    assert summary and all(line.startswith("SUMMARY LOADED ") for line in summary)
    assert all(re.search(r": ratio \d\.\d\d \(LOADED", line) for line in summary)


def test_autoattack_report_shows_each_sides_batch(monkeypatch, capsys):
    _loads(monkeypatch, 0.2, 1.1)
    monkeypatch.setattr(machine, "_cpuinfo_text", lambda: CPUINFO)
    args = autoattack_bench.parse_args(["--examples", "8"])
    names = (*autoattack_bench.ATTACKS, "cascade")
    results = {
        "twins_tf": dict(
            seconds=dict.fromkeys(names, 3.0),
            batch=dict.fromkeys(names, 8),
            version="ours",
            label_agreement=1.0,
        ),
        "official": dict(
            seconds=dict.fromkeys(names, 4.0), batch=dict.fromkeys(names, 250), version="theirs"
        ),
    }
    run = machine.Run()
    run.finish()
    autoattack_bench.report(args, results, run)
    out = capsys.readouterr().out.splitlines()
    assert "| twins_tf batch | official bs |" in out[2]
    assert out[4].startswith("| apgd-ce | 20 steps | 8 | 250 | 3.0 | 4.0 | 0.75 |")
    summary = [line for line in out if line.startswith("SUMMARY")]
    assert len(summary) == len(names)
    assert summary[0] == (
        "SUMMARY autoattack apgd-ce (20 steps) twins_tf vs official: ratio 0.75 (twins_tf "
        f"3.0 s (batch 8), official 4.0 s (bs 250); CPU: {CPU}; load 0.20 -> 1.10)"
    )


def test_train_step_summaries_cover_its_ratios(monkeypatch):
    _loads(monkeypatch, 0.2, 1.1)
    args = train_step.parse_args(["--methods", "at,twins_at", "--jit", "off"])
    rows = [
        dict(arch="resnet18", method=m, precision=p, jit=False, step_s=t)
        for m, p, t in [
            ("at", "float32", 0.8),
            ("twins_at", "float32", 0.76),
            ("at", "mixed_bfloat16", 0.6),
        ]
    ]
    rows.append(dict(arch="resnet18", method="twins_at", precision="mixed_bfloat16", jit=False))
    rows[-1]["error"] = "exit 1: boom"
    run = machine.Run(cpuinfo=CPUINFO)
    run.finish()
    lines = train_step.summary_lines(args, rows, run)
    assert lines == [
        "SUMMARY train_step resnet18 twins_at vs at (float32, jit off): ratio 0.95 (twins_at "
        f"760 ms, at 800 ms per step; CPU: {CPU}; load 0.20 -> 1.10)",
        "SUMMARY train_step resnet18 twins_at vs at (mixed_bfloat16, jit off): no ratio "
        f"(twins_at failed) (twins_at failed, at 600 ms per step; CPU: {CPU}; load 0.20 -> 1.10)",
        "SUMMARY train_step resnet18 at mixed_bfloat16 (attack in float32) vs float32 (jit off): "
        "ratio 0.75 "
        f"(mixed_bfloat16 600 ms, float32 800 ms per step; CPU: {CPU}; load 0.20 -> 1.10)",
        "SUMMARY train_step resnet18 twins_at mixed_bfloat16 (attack in float32) vs float32 "
        "(jit off): no ratio "
        "(mixed_bfloat16 failed) (mixed_bfloat16 failed, float32 760 ms per step; CPU: "
        f"{CPU}; load 0.20 -> 1.10)",
    ]


# --- the bfloat16 variants, run for real at a tiny size ----------------------------------------
@pytest.mark.parametrize("variant, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_torch_bf16_variant_runs_attack_and_training_under_autocast(variant, dtype):
    assert _run_worker("torch", variant, "trades")["compute_dtypes"] == {
        "attack": dtype,
        "train": dtype,
    }


def test_tf_bf16_attack_variant_attacks_in_bfloat16():
    """The attack's convolutions run in bfloat16 (the models' head stays float32, hence the
    float32 matrix products) and the training step in the mixed_bfloat16 policy."""
    assert _run_worker("tf", "bf16_attack")["compute_dtypes"] == {
        "attack": "bfloat16+float32",
        "train": "bfloat16",
    }


# --- benchmarks/profile_attack.py ---------------------------------------------------------------


@pytest.mark.parametrize("worker", ["tensorflow", "torch"])
def test_profile_attack_puts_the_time_in_the_layers_it_was_spent_in(worker):
    """One attack iteration at a tiny size, profiled: the op times are attributed to layer
    kinds, not left in "other" (a profiler layout or naming change would leave them there),
    every kind that runs in a ResNet-18's forward and input gradient gets time, and the
    profiled op time is of the order of the unprofiled wall time."""
    args = profile_attack.parse_args(
        ["--image_size", "32", "--batch", "2", "--timed", "1", "--profiled", "1"]
    )
    result = profile_attack._launch(args, worker)
    times = result["times"]
    total = sum(times.values())
    by_kind = {kind: 0.0 for kind in profile_attack.KINDS}
    for key, seconds in times.items():
        by_kind[key.split("|")[0]] += seconds
    assert by_kind["other"] < 0.2 * total, times
    for kind in ("stem 7x7 conv", "3x3 convs", "batch norm", "relu", "max pool"):
        assert by_kind[kind] > 0, kind
    for direction in ("forward", "backward"):
        assert times.get(f"3x3 convs|{direction}", 0) > 0, direction
    assert 0.2 * result["wall"] < total < 20 * result["wall"]


# --- benchmarks/bfloat16_cost.py ---------------------------------------------------------------


def test_bfloat16_cost_statistics_of_a_hand_computed_case():
    """Ten examples: the float32 attack leaves the first five correct, the bfloat16 one none."""
    fp32, bf16 = [1] * 5 + [0] * 5, [0] * 10
    stats = bfloat16_cost.paired_examples(fp32, bf16, resamples=2000)
    assert (stats["robust_accuracy_float32"], stats["robust_accuracy_bfloat16"]) == (0.5, 0.0)
    assert stats["difference"] == -0.5
    assert (stats["robust_only_to_float32"], stats["robust_only_to_bfloat16"]) == (5, 0)
    # exact McNemar: 5 discordant examples all one way, two-sided 2 * (1/2)^5
    assert stats["mcnemar_exact_p"] == pytest.approx(2 * 0.5**5)
    low, high = stats["interval_95"]
    # a resample's difference is minus its share of the first five: in [-1, 0], around -0.5
    assert -1 <= low < -0.5 < high <= 0


@pytest.mark.slow  # 40-50 s on 2 cores: two training runs and six evaluations
def test_bfloat16_cost_runs_at_a_tiny_size(tmp_path):
    """The script end to end at a tiny size: each precision's run is trained in it (its
    config.json), both attacks see the test and validation examples, and the JSON it writes is
    what it returns (the per-example outcomes are checked against evaluate's reports inside
    the script, which raises on a mismatch)."""
    result = bfloat16_cost.main(
        [
            "--seeds=1",
            "--epochs=1",
            "--lr_decay_epochs=",
            "--batch_size=16",
            "--max_train_examples=16",
            "--train_attack_steps=1",
            "--eval_steps=1",
            "--max_examples=10",
            "--bootstrap=100",
            f"--workdir={tmp_path}",
            f"--output={tmp_path / 'cost.json'}",
        ]
    )
    assert json.loads((tmp_path / "cost.json").read_text()) == json.loads(json.dumps(result))
    attack, training = result["attack"], result["training"]
    assert attack["examples"] == 20  # 10 test + 10 validation
    for precision in ("float32", "bfloat16"):
        outcomes = attack["outcomes"][precision]
        assert len(outcomes) == 20
        (run,) = training["runs"][precision]
        config = json.loads((tmp_path / f"{precision}_seed0" / "config.json").read_text())
        assert (config["precision"], config["method"], config["seed"]) == (precision, "at", 0)
        assert run["examples"] == 10
    assert attack["model_dir"] == str(tmp_path / "float32_seed0")
    assert training["metrics"]["robust"]["interval_95"] is None  # one seed: no interval
