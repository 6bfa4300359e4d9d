r"""`python -m twins_tf.interpolate`: robust weight-space interpolation between two runs.

    python -m twins_tf.interpolate --run_a=runs/dogs/init --run_b=runs/dogs \
        --output_dir=runs/dogs_wise --alphas=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1

theta(alpha) = (1 - alpha) theta_A + alpha theta_B over every variable (BN moving statistics
included, as WiSE-FT), evaluated clean and under the runs' validation PGD on their validation
split; the best alpha (`--select`) is written to `--output_dir` as a run that `evaluate`,
`export` and `twins_tf.load_run` accept.  The library side is `twins_tf.interpolation`
(`interpolate_runs`); this file defines the flags and calls it.
"""

import sys

from absl import app, flags

from twins_tf.input_checks import threat_model_text
from twins_tf.interpolation import DEFAULT_ALPHAS, SELECTIONS, interpolate_runs
from twins_tf.training.flags import NORM_HELP, RADIUS_HELP, STEP_HELP, define_fraction
from twins_tf.training.settings import SetupError


def define_flags(flag_values):
    """Defines the binary's flags on `flag_values`."""
    options = dict(flag_values=flag_values)
    flags.DEFINE_string(
        "run_a",
        None,
        "The run at alpha 0 (its --model_dir, e.g. a run's init/ linear-probe sub-run).",
        **options,
    )
    flags.DEFINE_string("run_b", None, "The run at alpha 1 (e.g. the fine-tuned run).", **options)
    flags.DEFINE_string("output_dir", None, "The run directory to write (new or empty).", **options)
    flags.DEFINE_list(
        "alphas",
        [f"{a:g}" for a in DEFAULT_ALPHAS],
        "Comma-separated alphas in [0, 1] to evaluate.",
        **options,
    )
    flags.DEFINE_enum(
        "select",
        "robust",
        list(SELECTIONS),
        "Which validation accuracy picks the alpha: robust (PGD) or clean.",
        **options,
    )
    flags.DEFINE_integer(
        "validation_examples",
        None,
        "Class-stratified validation examples "
        "to evaluate (default: run A's --max_validation_examples).",
        **options,
    )
    flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: run A's).", **options)
    flags.DEFINE_string(
        "attack_norm",
        None,
        f"{NORM_HELP} Validation PGD in it (default: the runs'; another norm needs "
        "--attack_eps and --attack_step).",
        **options,
    )
    define_fraction(
        "attack_eps",
        None,
        f"{RADIUS_HELP} (validation PGD; default: the runs').",
        flag_values,
        None,
    )
    define_fraction("attack_step", None, f"{STEP_HELP} (default: the runs').", flag_values, None)
    flags.DEFINE_integer(
        "attack_steps", None, "Validation PGD steps (default: the runs').", **options
    )
    flags.DEFINE_bool(
        "allow_unfinished",
        False,
        "Interpolate a run that has not finished (no summary.json: killed or still training); "
        "interpolation.json records it.",
        **options,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace an earlier interpolation (of another request) in --output_dir.",
        **options,
    )


def main(argv, flag_values=flags.FLAGS):
    """Interpolates the runs the flags name; exits 1 with one `interpolate: error:` line on bad
    input, as the other binaries do."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flag_values
    if not (f.run_a and f.run_b and f.output_dir):
        sys.exit(
            "interpolate: error: --run_a, --run_b and --output_dir are required (e.g. "
            "--run_a=runs/x/init --run_b=runs/x --output_dir=runs/x_wise)."
        )
    try:
        result = interpolate_runs(
            f.run_a,
            f.run_b,
            f.output_dir,
            alphas=f.alphas,
            select=f.select,
            validation_examples=f.validation_examples,
            batch_size=f.batch_size,
            attack_eps=f.attack_eps,
            attack_step=f.attack_step,
            attack_steps=f.attack_steps,
            attack_norm=f.attack_norm,
            overwrite=f.overwrite,
            allow_unfinished=f.allow_unfinished,
        )
    except SetupError as error:
        sys.exit(f"interpolate: error: {error}")
    attack = result.attack
    threat = threat_model_text(attack.get("attack_norm", "linf"), attack["attack_eps"])
    print(f"validation PGD-{attack['attack_steps']}, {threat}")
    print(
        f"{'alpha':>6} {'clean':>8} {'pgd':>8}   ({result.validation_examples} validation examples)"
    )
    for row in result.rows:
        mark = "  <- selected" if row.alpha == result.best_alpha else ""
        print(
            f"{row.alpha:>6g} {100 * row.clean_accuracy:>7.2f}% {100 * row.pgd_accuracy:>7.2f}%"
            f"{mark}"
        )
    print(
        f"best alpha ({result.select}): {result.best_alpha:g}; run written to {result.output_dir}"
    )


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
