"""A comparison's grid as work for many machines: `--shard=K/N` slices and `--plan` commands.

A grid of methods x seeds is a list of independent runs, each an ordinary `train` run in its
own directory, so any scheduler can spread it: `compare --shard=K/N` trains the K-th of N
slices (run index mod N == K - 1, in the grid's order), and `compare --plan` prints one
standalone `python -m twins_tf.train ...` command per run for a SLURM array, Kubernetes jobs
or a shell loop.  Either way a later `compare` with the same flags finds the runs finished and
only evaluates them and writes the report.
"""

import shlex

from twins_tf.training.settings import PATH_KEYS, SCHEDULE_SETTINGS, Settings, SetupError

# Settings keys that are no flag of the run binaries (derived, or how the flags were given).
NOT_FLAGS = ("binary", "twin", "num_classes", "replicas", "explicit_schedule")


def parse_shard(spelling):
    """`--shard=K/N` as (K, N); SetupError unless it is K/N with 1 <= K <= N."""
    index, slash, count = str(spelling).partition("/")
    try:
        k, n = int(index), int(count)
    except ValueError:
        k = n = 0
    if not slash or not 1 <= k <= n:
        raise SetupError(
            f"--shard={spelling} is not K/N with 1 <= K <= N: e.g. --shard=2/4 trains "
            "the second of four slices of the grid."
        )
    return k, n


def shard_runs(runs, shard):
    """The runs of slice `shard` = (K, N): those at an index i with i mod N == K - 1."""
    if shard is None:
        return list(runs)
    k, n = shard
    return [run for index, run in enumerate(runs) if index % n == k - 1]


def _flag_text(name, value):
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        return f"--{name}={','.join(str(v) for v in value)}"
    return f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}"


def _chosen_schedule(values):
    """The schedule settings chosen for a run (`Settings.explicit_schedule`'s rule)."""
    chosen = values.get("explicit_schedule")
    if chosen is None:
        return {n for n in SCHEDULE_SETTINGS if values.get(n) is not None}
    return set(chosen)


def run_args(values):
    """The flags of `python -m twins_tf.<binary>` that make the run `values` (a settings dict):
    every flag whose value differs from the binary's default, with paths absolute.

    A schedule setting (`--lr`, ...) of a method with its own schedule is written only when it
    was chosen for the run: written, it would count as chosen and replace the method's value.

    Raises:
      RuntimeError: the flags would not make the same run (a setting no flag can express).
    """
    from absl import flags

    from twins_tf import methods as methods_lib
    from twins_tf.training.flags import define_flags, settings_from_args

    binary = values["binary"]
    resolved = Settings.from_dict(values)
    flag_values = flags.FlagValues()
    names = define_flags(flag_values, binary)
    own_schedule = methods_lib.get(resolved.method).schedule is not None
    chosen = _chosen_schedule(values)
    args = []
    for name in names:
        if name in NOT_FLAGS or name not in values:
            continue
        value = getattr(resolved, name) if name in PATH_KEYS else values[name]
        default = flag_values[name].default
        if name in SCHEDULE_SETTINGS and own_schedule:
            if name in chosen:
                args.append(_flag_text(name, value))
            continue
        if value is None or _same(value, default):
            continue
        args.append(_flag_text(name, value))
    again = Settings.from_dict(settings_from_args(binary, args)).to_dict()
    if again != resolved.to_dict():
        differing = sorted(k for k in again if again[k] != resolved.to_dict().get(k))
        raise RuntimeError(f"the flags of a planned run would change {', '.join(differing)}.")
    return args


def _same(value, default):
    if isinstance(value, (list, tuple)) or isinstance(default, (list, tuple)):
        return [str(v) for v in value or ()] == [str(v) for v in default or ()]
    return value == default


def run_command(values, python="python"):
    """The shell command line of the run `values`: `python -m twins_tf.<binary> <flags>`."""
    words = [python, "-m", f"twins_tf.{values['binary']}", *run_args(values)]
    return " ".join(shlex.quote(w) for w in words)
