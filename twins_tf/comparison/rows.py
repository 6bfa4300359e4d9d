"""The rows of a comparison: methods, their variants, interpolation rows, and where runs live.

A row is a method or a *variant* of one, `METHOD+KEY=VALUE...` (`at+init=robust_linear_probe`,
`autolora+lora_rank=8`): the method with some train settings changed, checked through
`Settings` like the flags, so a mistyped `--methods` entry fails before anything trains.  A row
`wise(VARIANT)` is the weight-space interpolation of that variant's runs.  Every (row, seed) is
an ordinary run in `output_dir/runs/<row dir name>_seed<seed>`, and what compare learns of it
is a `RunResult`.
"""

import dataclasses
import hashlib
import json
import os
import re

from twins_tf.training.settings import (
    EXECUTION_KEYS,
    LOCATION_KEYS,
    SCHEDULE_SETTINGS,
    TRAIN,
    Settings,
    SetupError,
)

RUNS_DIR = "runs"
# Variants: METHOD+KEY=VALUE...; the train settings compare itself sets per run are no KEY.
VARIANT_SEPARATOR = "+"
PER_RUN_KEYS = ("method", "seed", "model_dir")
# A list-valued KEY separates its items with this (a comma separates --methods entries).
LIST_ITEM_SEPARATOR = ":"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


@dataclasses.dataclass
class RunResult:
    """One (method, seed) run: where it lives, its per-epoch metrics and its evaluation."""

    method: str
    seed: int
    model_dir: str
    settings: dict
    metrics: list
    evaluation: dict
    # wise(...) rows: {"alpha", "endpoints", "validation"} of the interpolation; else None.
    interpolation: dict = None

    def accuracy(self, attack):
        result = self.evaluation["results"].get(attack)
        return None if result is None else result["accuracy"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A method with some train settings changed: `METHOD+KEY=VALUE...` of `--methods`.

    `overrides` holds (key, value as spelled) sorted by key, so `at+b=1+a=2` and `at+a=2+b=1`
    are one variant; a plain method has none.
    """

    method: str
    overrides: tuple = ()

    @property
    def name(self):
        """The canonical spelling: the table's row label."""
        return VARIANT_SEPARATOR.join([self.method, *(f"{k}={v}" for k, v in self.overrides)])

    @property
    def dir_name(self):
        """The spelling as a directory name: `=` becomes `-`; other characters outside
        [A-Za-z0-9._+-] (a `/` in `attack_eps=8/255`) become `_`, and then a hash of the
        spelling keeps two spellings apart.  A plain method is its own name (`at`), so run
        dirs of earlier comparisons are reused."""
        name = self.name.replace("=", "-")
        safe = _SAFE_NAME.sub("_", name)
        if safe != name:
            safe += "-" + hashlib.sha256(self.name.encode()).hexdigest()[:8]
        return safe


def variant_keys():
    """The KEYs a variant may set: every `train` flag but those compare sets per run."""
    from absl import flags

    from twins_tf.training.flags import define_flags

    names = define_flags(flags.FlagValues(), TRAIN)
    return [n for n in names if n not in PER_RUN_KEYS]


def parse_variant(spelling):
    """`METHOD[+KEY=VALUE...]` as a `Variant` (keys checked; values are checked against a
    run's settings by `variant_settings`).

    Raises:
      SetupError: an empty part, a part without `=`, a repeated or unknown key.
    """
    method, *parts = spelling.strip().split(VARIANT_SEPARATOR)
    if not method:
        raise SetupError(
            f"--methods entry {spelling!r} names no method: write METHOD or "
            "METHOD+KEY=VALUE..., e.g. at+init=robust_linear_probe."
        )
    overrides = {}
    for part in parts:
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise SetupError(
                f"--methods entry {spelling!r}: {part!r} is not KEY=VALUE "
                "(e.g. at+init=robust_linear_probe)."
            )
        keys = variant_keys()
        if key not in keys:
            per_run = " (compare sets it per run)" if key in PER_RUN_KEYS else ""
            raise SetupError(
                f"--methods entry {spelling!r}: {key!r} is no variant key"
                f"{per_run}; KEY is a train flag: {', '.join(keys)}."
            )
        if key in overrides:
            raise SetupError(f"--methods entry {spelling!r} sets {key} twice.")
        overrides[key] = value
    return Variant(method, tuple(sorted(overrides.items())))


def _override_values(variant):
    """The variant's VALUEs parsed as the train flags parse them (8/255, true, 10:20)."""
    from absl import flags

    from twins_tf.training.flags import define_flags, settings_from_flags

    if not variant.overrides:
        return {}
    flag_values = flags.FlagValues()
    define_flags(flag_values, TRAIN)
    args = []
    for key, value in variant.overrides:
        if isinstance(flag_values[key].parser, flags.ListParser):
            value = value.replace(LIST_ITEM_SEPARATOR, ",")
        args.append(f"--{key}={value}")
    try:
        flag_values([TRAIN, *args])
    except flags.Error as error:
        message = str(error).splitlines()[0]
        raise SetupError(f"--methods entry {variant.name!r}: {message}") from None
    parsed = settings_from_flags(flag_values, TRAIN, argv=[TRAIN, *args])
    return {key: parsed[key] for key, _ in variant.overrides}


def variant_settings(variant, base_settings, *, model_dir, seed):
    """The settings dict of one run of `variant`: `base_settings` with the variant's values,
    method, seed and model_dir, checked through `Settings`.

    Raises:
      SetupError: a value the train flag refuses, or settings `Settings` refuses (prefixed
        with the variant's spelling).
    """
    if isinstance(base_settings, Settings):  # what was chosen for it too (not in to_dict)
        chosen = list(base_settings.explicit_schedule or ())
        base_settings = dict(base_settings.to_dict(), explicit_schedule=chosen)
    overrides = _override_values(variant)
    values = dict(
        base_settings,
        **overrides,
        method=variant.method,
        seed=seed,
        model_dir=model_dir,
    )
    if values.get("explicit_schedule") is not None:  # a variant's value is chosen for it
        chosen = set(values["explicit_schedule"]) | set(overrides)
        values["explicit_schedule"] = [n for n in SCHEDULE_SETTINGS if n in chosen]
    try:
        Settings.from_dict(values)
    except SetupError as error:
        if not variant.overrides:
            raise
        raise SetupError(f"--methods entry {variant.name!r}: {error}") from None
    return values


def wise_name(variant):
    """The row label of the interpolation row of `variant`."""
    return f"wise({variant.name})"


def wise_dir_name(variant):
    return f"wise-{variant.dir_name}"


def row_dir_name(row):
    """The directory name of a row label (a variant's spelling or `wise(...)`): what its
    runs' and model cards' names start with."""
    if row.startswith("wise(") and row.endswith(")"):
        return wise_dir_name(parse_variant(row[len("wise(") : -1]))
    return parse_variant(row).dir_name


def run_dir(output_dir, method, seed):
    """`output_dir/runs/<name>_seed<seed>`: `method` is a `Variant` (its `dir_name`) or a
    directory name such as a plain method's."""
    name = method.dir_name if isinstance(method, Variant) else method
    return os.path.join(os.path.abspath(output_dir), RUNS_DIR, f"{name}_seed{seed}")


def settings_hash(settings):
    """sha256 of the settings that define what a run learns (not where it lives or runs)."""
    ignored = LOCATION_KEYS + EXECUTION_KEYS
    kept = {k: v for k, v in sorted(settings.items()) if k not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def parse_seeds(values):
    """`--seeds` as integers (SetupError otherwise)."""
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SetupError(f"--seeds must be integers, got {','.join(values)}.") from None
