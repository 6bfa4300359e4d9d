r"""What `--precision=bfloat16` costs in robustness, measured on scikit-learn's digits.

    python benchmarks/bfloat16_cost.py   # 3 seeds per precision, 10 epochs: ~10 min, 2 cores
    python benchmarks/bfloat16_cost.py --seeds 5 --workdir runs/bf16_cost --output cost.json

Two questions, each answered with a paired comparison and a 95 % interval:

(b) Training.  For each seed s, two PGD-AT runs from scratch (`python -m twins_tf.pretrain`'s
    code path, `training.loop.run`) that differ only in `--precision`: float32, and bfloat16
    (the train step and the training attack in Keras's mixed_bfloat16 policy).  Each is
    evaluated as `python -m twins_tf.evaluate` does (`twins_tf.evaluation.evaluate`, float32
    PGD-10 and clean accuracy on the test split).  The difference bfloat16 - float32 is paired
    by seed (the same initialisation, data order, augmentation and attack seeds), its interval
    the Student-t one over seeds (`twins_tf.comparison.statistics.paired_difference`, as
    `compare` reports methods): the spread between seeds, not the test set's size, is what
    limits it.  The training seconds of each run are printed too (wall clock, loaded or not:
    for a speed figure use benchmarks/train_step.py).

(a) Attack.  The float32 model of the first seed, attacked with PGD-10 in float32 and in
    bfloat16 (`evaluate --precision=bfloat16`: the model in mixed_bfloat16, PGD computing in
    it), on its test and validation splits together (digits: 359 test images and 179 carved
    for validation, 538 held-out examples; the validation split chose the run's best epoch,
    which both attacks see alike).  Per example, whether each attack leaves it
    correctly classified; the difference of the accuracies is paired by example, with a 95 %
    percentile bootstrap interval over examples (--bootstrap resamples) and the exact
    McNemar p-value (binomial test on the examples where the two attacks disagree).  The
    per-example outcomes are computed with the library's own PGD; their sums are checked
    against `evaluate`'s reports for the same settings, so they are its numbers.

Everything runs at a small size (16 px, ResNet-18, PGD-AT with a 5-step attack, 10 epochs
with the learning rate divided by 10 at epochs 7 and 9) so the script takes minutes: on a
quiet 2-core Zen 4 machine each run took 74-86 s and the whole script 590 s.  Finished
runs in --workdir are reused (a second invocation only evaluates).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "bfloat16")
ATTACK_SPLITS = ("test", "validation")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training runs per precision")
    parser.add_argument("--dataset", default="digits", help="a digits dataset of twins_tf")
    parser.add_argument("--arch", default="resnet18", help="an arch with BatchNorm")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--lr_decay_epochs", default="7,9", help="epochs the lr is divided by 10 at ('' none)"
    )
    parser.add_argument("--train_attack_steps", type=int, default=5, help="training PGD steps")
    parser.add_argument("--eval_steps", type=int, default=10, help="evaluation PGD steps")
    parser.add_argument(
        "--max_train_examples",
        type=int,
        default=None,
        help="train and validate on N examples each (tests)",
    )
    parser.add_argument(
        "--max_examples", type=int, default=None, help="evaluate N examples per split (tests)"
    )
    parser.add_argument("--bootstrap", type=int, default=10000, help="resamples of (a)")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1.")
    return args


def _run_args(args, precision, seed, model_dir):
    """`python -m twins_tf.pretrain` flags of one training run."""
    run = [
        f"--dataset={args.dataset}",
        f"--arch={args.arch}",
        f"--image_size={args.image_size}",
        "--method=at",
        f"--epochs={args.epochs}",
        f"--batch_size={args.batch_size}",
        f"--lr={args.lr}",
        f"--lr_decay_epochs={args.lr_decay_epochs}",
        f"--attack_steps={args.train_attack_steps}",
        f"--seed={seed}",
        f"--precision={precision}",
        f"--model_dir={model_dir}",
    ]
    if args.max_train_examples:
        run += [
            f"--max_train_examples={args.max_train_examples}",
            f"--max_validation_examples={args.max_train_examples}",
        ]
    return run


def _evaluate_args(args, model_dir, split, precision):
    """`python -m twins_tf.evaluate` flags: clean and PGD-k, in `precision`, one split."""
    evaluation = [
        f"--model_dir={model_dir}",
        f"--split={split}",
        f"--attacks=clean,pgd{args.eval_steps}",
        f"--precision={precision}",
    ]
    if args.max_examples:
        evaluation.append(f"--max_examples={args.max_examples}")
    return evaluation


def _evaluation_settings(evaluate_args):
    """The settings `python -m twins_tf.evaluate <evaluate_args>` parses."""
    from absl import flags

    from twins_tf.evaluation import flags as evaluation_flags

    flag_values = flags.FlagValues()
    evaluation_flags.define_flags(flag_values)
    flag_values(["evaluate", *evaluate_args])
    return evaluation_flags.settings_from_flags(flag_values)


def _evaluate(evaluate_args):
    """`python -m twins_tf.evaluate <evaluate_args>`'s report, in this process."""
    from twins_tf import evaluation

    return evaluation.evaluate(
        _evaluation_settings(evaluate_args), log=lambda _: None, progress=False
    )


def train(args, precision, seed, workdir):
    """Trains (or finds finished) one run; (model_dir, seconds it took now)."""
    from twins_tf.training import flags as run_flags
    from twins_tf.training import loop

    model_dir = os.path.join(workdir, f"{precision}_seed{seed}")
    started = time.time()
    loop.run(
        run_flags.settings_from_args("pretrain", _run_args(args, precision, seed, model_dir)),
        verbose=0,
    )
    return model_dir, time.time() - started


def pgd_outcomes(args, model_dir, split, precision):
    """Per example of `split`, whether the model still classifies it correctly after PGD-k in
    `precision`, computed with the library's PGD on `evaluate`'s model and examples; the sum
    is checked against `evaluate`'s own report of the same settings."""
    import keras
    import tensorflow as tf

    from twins_tf.attacks.pgd import PGD
    from twins_tf.evaluation import inputs

    evaluate_args = _evaluate_args(args, model_dir, split, precision)
    report = _evaluate(evaluate_args)
    s = inputs.resolve(_evaluation_settings(evaluate_args))
    batches, _ = inputs.load_examples(s)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        model = inputs.load_model(s)
    finally:
        keras.config.set_dtype_policy(policy)
    pgd = PGD(
        s["attack_eps"],
        s["attack_step"],
        args.eval_steps,
        norm=s["attack_norm"],
        seed=s["seed"],
        compute_dtype=None if precision == "bfloat16" else "float32",
    )

    @tf.function(reduce_retracing=True)  # the last batch is smaller
    def correct(images, labels):
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        x_adv = pgd(model, images, labels)
        predicted = tf.argmax(model(x_adv, training=False), -1, output_type=tf.int32)
        return tf.equal(predicted, labels)

    outcomes = np.concatenate([correct(x, y).numpy() for x, y in batches])
    expected = report["results"][f"pgd{args.eval_steps}"]["correct"]
    if int(outcomes.sum()) != expected:
        raise RuntimeError(
            f"per-example PGD found {int(outcomes.sum())} robust examples of {split} in "
            f"{precision}, evaluate {expected}: the two paths disagree."
        )
    return outcomes


def paired_examples(fp32, bf16, resamples, seed=0):
    """Statistics of two attacks' per-example outcomes (1: still correct) on the same examples.

    Returns a dict: the two accuracies, their difference (bf16 - fp32), its 95 % percentile
    bootstrap interval (examples resampled with replacement, the pairs kept), the counts of
    examples only one attack leaves correct and the exact McNemar p-value (two-sided binomial
    test of those discordant examples against 1/2).
    """
    from scipy import stats

    fp32, bf16 = np.asarray(fp32, np.float64), np.asarray(bf16, np.float64)
    n = len(fp32)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    low, high = np.percentile((bf16[rows] - fp32[rows]).mean(axis=1), [2.5, 97.5])
    only_fp32 = int(np.sum((fp32 == 1) & (bf16 == 0)))  # robust to the float32 attack only
    only_bf16 = int(np.sum((fp32 == 0) & (bf16 == 1)))
    discordant = only_fp32 + only_bf16
    return {
        "examples": n,
        "robust_accuracy_float32": float(fp32.mean()),
        "robust_accuracy_bfloat16": float(bf16.mean()),
        "difference": float(bf16.mean() - fp32.mean()),
        "interval_95": [float(low), float(high)],
        "interval_method": f"percentile bootstrap over examples, {resamples} resamples",
        "robust_only_to_float32": only_fp32,
        "robust_only_to_bfloat16": only_bf16,
        "mcnemar_exact_p": (
            float(stats.binomtest(only_bf16, discordant, 0.5).pvalue) if discordant else 1.0
        ),
    }


def attack_cost(args, model_dir):
    """(a): PGD-k in bfloat16 against float32 on one model, paired by example."""
    robust = {
        precision: np.concatenate(
            [pgd_outcomes(args, model_dir, split, precision) for split in ATTACK_SPLITS]
        )
        for precision in PRECISIONS
    }
    return {
        "model_dir": model_dir,
        "splits": list(ATTACK_SPLITS),
        "pgd_steps": args.eval_steps,
        **paired_examples(robust["float32"], robust["bfloat16"], args.bootstrap),
        # in evaluation order (test, then validation): to recompute or test other statistics
        "outcomes": {p: robust[p].astype(int).tolist() for p in PRECISIONS},
    }


def training_cost(args, runs):
    """(b): robust and clean accuracy of bfloat16- against float32-trained runs, by seed."""
    from twins_tf.comparison.statistics import mean_and_sd, paired_difference

    metrics = {}
    for precision in PRECISIONS:
        rows = []
        for model_dir, seconds in runs[precision]:
            report = _evaluate(_evaluate_args(args, model_dir, "test", "float32"))
            rows.append(
                {
                    "model_dir": model_dir,
                    "train_seconds": round(seconds, 1),
                    "clean": report["results"]["clean"]["accuracy"],
                    "robust": report["results"][f"pgd{args.eval_steps}"]["accuracy"],
                    "examples": report["examples"],
                }
            )
        metrics[precision] = rows
    out = {"seeds": args.seeds, "runs": metrics, "metrics": {}}
    for metric in ("robust", "clean"):
        values = {p: [row[metric] for row in metrics[p]] for p in PRECISIONS}
        difference, low, high = paired_difference(values["bfloat16"], values["float32"])
        out["metrics"][metric] = {
            **{f"mean_{p}": mean_and_sd(values[p])[0] for p in PRECISIONS},
            **{f"sd_{p}": mean_and_sd(values[p])[1] for p in PRECISIONS},
            "difference": difference,
            "interval_95": None if low is None else [low, high],
        }
    out["interval_method"] = "Student-t over seeds, paired by seed (scipy ttest_rel)"
    return out


def _percent(value):
    return "n/a" if value is None else f"{100 * value:+.2f}"


def report_lines(result):
    a, b = result["attack"], result["training"]
    lines = [
        f"(a) one model (float32-trained, seed 0), PGD-{a['pgd_steps']} on {a['examples']} "
        f"examples ({' + '.join(a['splits'])}):",
        f"    float32 attack  {100 * a['robust_accuracy_float32']:.2f}%",
        f"    bfloat16 attack {100 * a['robust_accuracy_bfloat16']:.2f}%",
        f"    bfloat16 - float32 {_percent(a['difference'])} points, 95% interval "
        f"[{_percent(a['interval_95'][0])}, {_percent(a['interval_95'][1])}] "
        f"({a['interval_method']}); examples robust to one attack only: float32 "
        f"{a['robust_only_to_float32']}, bfloat16 {a['robust_only_to_bfloat16']}; exact "
        f"McNemar p = {a['mcnemar_exact_p']:.3g}",
        f"(b) trained with --precision=bfloat16 vs float32, {b['seeds']} seed(s) each, "
        "evaluated in float32 on the test split:",
    ]
    for metric, row in b["metrics"].items():
        interval = row["interval_95"]
        shown = (
            "no interval (one seed, or identical differences)"
            if interval is None
            else f"95% interval [{_percent(interval[0])}, {_percent(interval[1])}]"
        )
        lines.append(
            f"    {metric:<7} float32 {100 * row['mean_float32']:.2f}%  bfloat16 "
            f"{100 * row['mean_bfloat16']:.2f}%  difference {_percent(row['difference'])} "
            f"points, {shown}"
        )
    lines.append(f"    ({b['interval_method']})")
    for precision in PRECISIONS:
        seconds = [row["train_seconds"] for row in b["runs"][precision]]
        lines.append(
            f"    train seconds {precision}: {', '.join(f'{s:.0f}' for s in seconds)} "
            "(wall clock of this invocation; 0-ish for a reused run)"
        )
    return lines


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bfloat16_cost_")
    started = time.time()
    runs = {p: [] for p in PRECISIONS}
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            runs[precision].append(train(args, precision, seed, workdir))
            print(f"trained {precision} seed {seed} ({runs[precision][-1][1]:.0f} s)", flush=True)
    result = {
        "settings": vars(args),
        "load_average": list(os.getloadavg()),
        "training": training_cost(args, runs),
        "attack": attack_cost(args, runs["float32"][0][0]),
    }
    result["seconds"] = round(time.time() - started, 1)
    print("\n".join(report_lines(result)))
    print(f"{result['seconds']:.0f} s in all; load average {os.getloadavg()[0]:.2f}; {workdir}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
