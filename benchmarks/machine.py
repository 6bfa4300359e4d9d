"""What every comparing benchmark says about the machine, and its one-line summaries.

A ratio of two timings is only worth quoting from a quiet machine: on a shared one the two
sides of a comparison see different loads and the ratio moves by up to 2x between rounds
(docs/benchmarks.md).  So each script (vs_pytorch.py, autoattack.py, train_step.py,
profile_attack.py) opens a `Run` before measuring, which reads the CPU and the 1-minute load
average, and ends with one `SUMMARY` line per comparison: the ratio, both sides' values and
units, the CPU and the load at the start and end of the run.  When the load at the start
exceeds `LOAD_LIMIT` the summary lines withhold the ratio (the tables still print, labelled as
loaded); `--allow_load` shows it anyway, and every line then says LOADED.  The load at the end
is printed but not gated on: a benchmark running its two threads on a 2-core machine brings
the load near 2 by itself.

The CPU is named with the instruction-set flags that decide which oneDNN kernels TensorFlow
and PyTorch run (AVX2 against AVX-512 roughly halves a convolution's time; AVX512_BF16 and AMX
decide whether bfloat16 is fast at all), since a "Model name" alone is often just "AMD EPYC".
"""

import dataclasses
import os
import subprocess

LOAD_LIMIT = 1.5
# The flags that select oneDNN's kernel families (and TensorFlow's default of oneDNN on/off).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def load_average():
    """The 1-minute load average.  The one source of load of the comparing scripts (the others,
    bfloat16_cost.py and profile_step.py, only print it): tests replace it
    (monkeypatch `machine.load_average`) rather than loading the machine."""
    return os.getloadavg()[0]


def _cpuinfo_text():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        pass
    try:  # not Linux, or no procfs: lscpu prints the same fields as "Name: value"
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_description(cpuinfo=None):
    """'<model name> (family F model M) [present flags; no absent flags]' from /proc/cpuinfo
    (or `cpuinfo`, its text); the family and model identify the generation when the model
    name does not (a virtual machine often reports a bare vendor name)."""
    text = _cpuinfo_text() if cpuinfo is None else cpuinfo
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:  # the first processor's block
            fields[key] = value.strip()
    name = fields.get("model name") or "unknown CPU"
    family, model = fields.get("cpu family"), fields.get("model")
    if family and model:
        name += f" (family {family} model {model})"
    flags = set(fields.get("flags", "").lower().split())
    present = [flag for flag in ISA_FLAGS if flag in flags]
    absent = [flag for flag in ISA_FLAGS if flag not in flags]
    listed = " ".join(present) or "none of " + " ".join(ISA_FLAGS)
    if present and absent:
        listed += "; no " + " ".join(absent)
    return f"{name} [{listed}]"


def add_allow_load_flag(parser):
    parser.add_argument(
        "--allow_load",
        action="store_true",
        help=f"print the summary ratios even if the 1-minute load average at the start "
        f"exceeds {LOAD_LIMIT} (every summary line then says LOADED)",
    )


@dataclasses.dataclass
class Side:
    """One side of a comparison: who (e.g. "twins_tf"), its value in the comparison's unit
    (None: that side failed) and optional words after the value (e.g. "(batch 50)")."""

    name: str
    value: float | None
    detail: str = ""


class Run:
    """The machine and load of one benchmark run; `summary` formats its comparison lines.

    Created at the start of the run (it reads the load then); `finish()` reads the load at
    the end, before the summaries are printed."""

    def __init__(self, allow_load=False, cpuinfo=None):
        self.cpu = cpu_description(cpuinfo)
        self.load_start = load_average()
        self.load_end = None
        self.allow_load = allow_load

    @property
    def loaded(self):
        return self.load_start > LOAD_LIMIT

    def finish(self):
        self.load_end = load_average()

    def _loads(self):
        end = "?" if self.load_end is None else f"{self.load_end:.2f}"
        return f"load {self.load_start:.2f} -> {end}"

    def machine_line(self):
        """The header line: CPU, cores and the load at the start (and whether it is too high)."""
        line = (
            f"Machine: CPU {self.cpu}, {os.cpu_count()} cores; 1-min load average "
            f"{self.load_start:.2f} at start"
        )
        if self.loaded:
            line += f" -- LOADED (> {LOAD_LIMIT}): the times below are not a quiet machine's"
        return line

    def table_label(self):
        """Words to put beside a table's title: empty on a quiet machine."""
        if not self.loaded:
            return ""
        return f" [LOADED: load average {self.load_start:.2f} at start > {LOAD_LIMIT}]"

    def summary(self, comparison, first, second, *, unit, per="", digits=0):
        """'SUMMARY <comparison>: ratio R (<first> V unit, <second> V unit <per>; CPU: ...;
        load a -> b)', the ratio being first / second; or the same line with the ratio
        withheld (loaded machine) or missing (a side failed)."""
        sides = ", ".join(
            f"{s.name} {'failed' if s.value is None else f'{s.value:.{digits}f} {unit}'}"
            + (f" {s.detail}" if s.detail else "")
            for s in (first, second)
        )
        context = f"{sides}{' ' + per if per else ''}; CPU: {self.cpu}; {self._loads()}"
        failed = [s.name for s in (first, second) if s.value is None]
        if failed:
            return f"SUMMARY {comparison}: no ratio ({' and '.join(failed)} failed) ({context})"
        if self.loaded and not self.allow_load:
            return (
                f"SUMMARY {comparison}: ratio withheld: load average {self.load_start:.2f} at "
                f"start > {LOAD_LIMIT} (the machine is not quiet; rerun when it is) ({context})"
            )
        ratio = f"ratio {first.value / second.value:.2f}"
        if self.loaded:
            return (
                f"SUMMARY LOADED {comparison}: {ratio} (LOADED: load average "
                f"{self.load_start:.2f} at start > {LOAD_LIMIT}, not for quoting; {context})"
            )
        return f"SUMMARY {comparison}: {ratio} ({context})"
