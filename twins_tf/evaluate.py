r"""`python -m twins_tf.evaluate`: clean, PGD-k and AutoAttack accuracy of a trained model.

    python -m twins_tf.evaluate --model_dir=runs/dogs --attacks=clean,pgd10,autoattack
    python -m twins_tf.evaluate --weights=robust.weights.h5 --arch=resnet18 --dataset=cifar10 \
        --split=test --attacks=clean,pgd20 --pgd_restarts=5 --output=report.json
    python -m twins_tf.evaluate --model_dir=runs/dogs --attack_eps=2/255,4/255,8/255 \
        --strategy=mirrored
    python -m twins_tf.evaluate --model_dir=runs/dogs --attack_norm=l2 --attack_eps=0.5 \
        --attack_step=0.125

The model: with `--model_dir`, the run's `config.json` says what to build and
`best.weights.h5` (or `--weights`) what to load; without it, `--weights`, `--arch` and
`--dataset` do.  Twin weights are evaluated through their Adaptive wing (inference mode, the
network `export` ships), so every model is evaluated as a plain-BN network, in float32 unless
`--precision=bfloat16` (clean and PGD in Keras's mixed_bfloat16 policy, the attack computing in
it too: what a bfloat16 attack costs; AutoAttack is float32 only, and refused with it).  A
`--model_dir` whose run has not finished (no summary.json: killed, or still training) is
refused unless `--allow_unfinished`; the report then says so ("unfinished").

The threat model is `--attack_norm` (linf or l2; default: the run's, else linf) with radius
`--attack_eps` in [0, 1] pixel units: L-inf as 8/255 or 0.0314 (at most 1), L2 as a plain
number, 0.5 or 3.0 (the L2 length of the perturbation, at most the image box's diagonal).
Several radii, comma-separated, give one report per radius and a plot of accuracy against
radius.  The run's radius and step are used when evaluating in the run's norm; in another
norm `--attack_eps` (and `--attack_step` for PGD) must be given.  Attacks (`--attacks`,
comma-separated, in [0, 1] pixel space):
  clean        accuracy on the unperturbed images;
  pgdK         accuracy on PGD-K examples (step `--attack_step`); with `--pgd_restarts=1` no
               random start (spec §7), with R > 1 restarts R random starts and an example
               counts as robust only if no restart fools it;
  autoattack   `twins_tf.attacks.AutoAttack` (`--autoattack_version`, standard: APGD-CE,
               APGD-T, FAB-T, Square), with the accuracy left after each sub-attack and its
               time; APGD-T and FAB-T target the reference's 9 classes, or every other class
               when the dataset has fewer than 10 (and APGD-T, whose loss needs 4 classes, is
               skipped below 4: the report says so).  The report records what a rerun needs:
               versions, eps, norm, examples, targets, budgets and seed, and each example's
               outcome (`broken_by`).  Resumable: progress is kept in
               `autoattack_<split>_<hash>_shard<k>of<N>.npz` beside the report (the hash
               covers everything that changes the result), a second start of the same
               evaluation continues from it, and the files are removed when it finishes.
               Under `--strategy=mirrored` or `multi_worker` the batches are shared out over
               the replicas and workers, with the single-device run's per-example result.

Before the attacks, the sanity checks of `twins_tf.attacks.checks` (randomised model,
probabilities instead of logits, zero gradients, test-time dynamics) run on the first batch;
what they find is printed and kept in the report's "checks".

Results go to a printed table and a JSON report per radius (`--output`, by default
`model_dir/evaluation_<split>_<norm>_eps<radius>_<hash of the other settings>.json`, so a
later evaluation of other attacks, settings or norm adds a report and never replaces one).  In a
multi-worker job only the chief writes.  The split is the test split or the validation split
carved from train (`--split`); `--max_examples` evaluates N examples only, a class-stratified
subset seeded by the split seed.

TensorFlow's INFO log lines are off (its warnings and errors stay); `--verbosity=1` on the
command line brings them back (`twins_tf.platform.tensorflow_logs`).
"""

import sys

from absl import app, flags

from twins_tf.evaluation import evaluate_radii, format_table
from twins_tf.evaluation.flags import define_flags, settings_from_flags
from twins_tf.training import distribute
from twins_tf.training.settings import SetupError


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:  # first: a multi-worker strategy must exist before any other TensorFlow work
        strategy = distribute.get_strategy(
            flags.FLAGS.strategy, tpu_address=flags.FLAGS.tpu_address
        )
    except (ValueError, RuntimeError) as error:
        sys.exit(f"evaluate: error: {error}")
    try:
        evaluation = evaluate_radii(settings_from_flags(flags.FLAGS), strategy=strategy)
    except SetupError as error:
        sys.exit(f"evaluate: error: {error}")
    for report, path in zip(evaluation.reports, evaluation.paths):
        print(format_table(report))
        if path:
            print(f"report: {path}")
    if evaluation.plot:
        print(f"plot: {evaluation.plot}")


if __name__ == "__main__":
    for _name in define_flags(flags.FLAGS):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[_name])
    app.run(main)
