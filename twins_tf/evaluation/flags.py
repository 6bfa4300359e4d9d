"""The flags of `python -m twins_tf.evaluate`, and the evaluation settings they give.

The library keeps them so that everything which evaluates as the binary does (compare's grid,
which stores each evaluation's settings beside its report to tell whether a later comparison
can reuse it; tests; library users who accept evaluate's flags) parses them the same way.
"""

from absl import flags

from twins_tf.evaluation.inputs import DEFAULTS, PRECISIONS, SPLITS
from twins_tf.training.distribute import STRATEGIES
from twins_tf.training.flags import (
    NORM_HELP,
    RADIUS_HELP,
    STEP_HELP,
    define_data_flags,
    define_fraction,
)


def define_flags(flag_values):
    """Defines evaluate's flags on `flag_values`; returns their names.

    Each flag's default is `twins_tf.evaluation.DEFAULTS[name]`, so a library call of
    `twins_tf.evaluation.evaluate` with only some settings behaves as the binary does.
    """
    names = []

    def define(kind, name, help_text, enum_values=None):
        choices = [] if enum_values is None else [enum_values]  # DEFINE_enum's third argument
        getattr(flags, f"DEFINE_{kind}")(
            name, DEFAULTS[name], *choices, help_text, flag_values=flag_values
        )
        names.append(name)

    define("string", "model_dir", "A train/pretrain run: config.json and weights.")
    define("string", "weights", "Weights file (default: model_dir/best.weights.h5).")
    define("string", "arch", "Architecture (without --model_dir).")
    names += define_data_flags(flag_values, from_run=True)  # as train's, default: the run's
    define("enum", "split", "Split to evaluate on.", enum_values=list(SPLITS))
    define("list", "attacks", "Comma-separated: clean, pgdK (K steps, e.g. pgd10), autoattack.")
    define(
        "string",
        "attack_norm",
        f"{NORM_HELP} PGD and AutoAttack run in it (default: the run's, else linf).",
    )
    define(
        "list",
        "attack_eps",
        f"{RADIUS_HELP}; or several, comma-separated (2/255,4/255,8/255 or 0.25,0.5,1): one "
        "report per radius and a plot of accuracy against radius (default: the run's when "
        "evaluating in the run's norm, else L-inf 8/255; required for another norm).",
    )
    define_fraction(
        "attack_step",
        DEFAULTS["attack_step"],
        f"{STEP_HELP}; the same for every radius (default: the run's when evaluating in the "
        "run's norm, else L-inf 2/255; required for PGD in another norm).",
        flag_values,
        None,
    )
    names.append("attack_step")
    define("integer", "pgd_restarts", "PGD restarts (> 1 uses random starts).")
    define(
        "enum",
        "autoattack_version",
        "AutoAttack version (rand: for randomised defences).",
        enum_values=["standard", "rand"],
    )
    define("integer", "batch_size", "Evaluation batch size.")
    define(
        "integer",
        "max_examples",
        "Evaluate only N examples of the split, stratified by class (seeded).",
    )
    define("integer", "seed", "Seed of random starts and AutoAttack.")
    define(
        "enum",
        "precision",
        "Numerics of clean and PGD: float32, or bfloat16 (the model in Keras's mixed_bfloat16 "
        "policy, PGD computing in it: what a bfloat16 attack costs).  AutoAttack is float32 "
        "only: bfloat16 with autoattack in --attacks is refused.",
        enum_values=list(PRECISIONS),
    )
    define(
        "bool",
        "allow_unfinished",
        "Evaluate a --model_dir whose run has not finished (no summary.json: killed or still "
        "training); the report records it.",
    )
    define(
        "string",
        "output",
        "JSON report path (several radii: <stem>_eps<radius>.json each); default: "
        "model_dir/evaluation_<split>_<norm>_eps<radius>_<settings hash>.json, none without "
        "--model_dir.",
    )
    define(
        "enum",
        "strategy",
        "tf.distribute strategy AutoAttack's batches are shared out over (mirrored: local "
        "devices; multi_worker: TF_CONFIG's workers, sharing --model_dir).",
        enum_values=list(STRATEGIES),
    )
    define("string", "tpu_address", "TPU name or grpc://host:port for --strategy=tpu.")
    return names


def settings_from_flags(flag_values):
    """The evaluation settings (one key per flag) from parsed flags."""
    return {name: flag_values[name].value for name in _FLAG_NAMES if name in flag_values}


_FLAG_NAMES = define_flags(flags.FlagValues())
