"""AutoAttack speed, twins_tf against the official code (fra31/auto-attack, `pyautoattack`).

    python benchmarks/autoattack.py                  # the defaults below (reduced budget)
    python benchmarks/autoattack.py --examples 100 --apgd_steps 100 --n_target_classes 9 \\
        --fab_steps 100 --square_queries 5000        # AutoAttack's standard budget (hours)

One run prints, per sub-attack (APGD-CE, APGD-T, FAB-T, Square) and for the standard cascade,
the seconds of twins_tf and of the official code on the same model and images, the batch each
side attacked at once (the official code's `batch_size` / `bs` and ours), their ratio
(ours / official: below 1 we are faster), and our seconds scaled to the standard budget
(100 steps, 9 targets, 5000 queries) per 100 examples.  That scaling is linear and exact up to
noise here because nothing is broken, so every iteration does the same work.  It ends with one
`SUMMARY` line per sub-attack and for the cascade (benchmarks/machine.py): the ratio, both
sides' seconds and batches, the CPU (with the flags that pick oneDNN's and PyTorch's kernels)
and the 1-minute load average at the start and end; when the load at the start exceeds 1.5
the ratio is withheld (the table still prints, labelled as loaded) unless --allow_load.

Fair by construction:
  * the same network: a torchvision-layout ResNet-18 with random weights and random BN
    statistics (`tests/torch_resnet.py`); the official side runs it in PyTorch, ours loads the
    same state dict into `twins_tf.models.build_resnet` (twin BN, inference mode) and attacks
    it as `evaluate` does (with --fold_batch_norm 1, its `fold_batch_norm` view instead: the
    same function with every BN folded into its convolution, up to float32 rounding; not the
    default, because `evaluate` does not fold and the default must measure the product);
  * the same images, [0, 1], labelled with the network's own predictions (all correct);
  * the same batch: every sub-attack gets all --examples images in one call on both sides
    (the official `perturb(x, y)`, the cascade's `batch_size=len(x)`; ours likewise, one
    batch), and neither splits it further (both attack the still-robust examples of the batch
    together), so the kernels see the same batch size; the table prints what each side was
    handed, as each worker recorded it;
  * each framework in its own process (one after the other, never both at once), with the
    same number of threads (--threads: PyTorch `set_num_threads`, TensorFlow intra- and
    inter-op pools);
  * the same budget and settings on both sides, and every sub-attack runs once untimed
    before the timed run (our first call traces the graphs; PyTorch builds its kernels);
    the cascade is timed after the sub-attacks, so it is warm on both sides.
Worst case on purpose (as for the evaluation's upper bound): epsilon is 1e-6, so no point is
ever broken and every sub-attack spends its whole budget on every example; the cascade then
costs the sum of the four.  On a robust model the later attacks see only the points still
robust.  The default budget is reduced (flags) so that a run takes minutes; the ratios are
per iteration and do not depend on it much, but the absolute times do.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (shared with the other benchmarks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
WORKERS = ("official", "twins_tf")  # the official one first: it writes the weights and images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=50, help="images (one batch)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument(
        "--upsample",
        type=int,
        default=1,
        help="nearest upsampling inside the model (7: CIFAR as the spec trains)",
    )
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument(
        "--epsilon",
        type=float,
        default=1e-6,
        help="attack radius; the default breaks nothing (worst case)",
    )
    parser.add_argument("--apgd_steps", type=int, default=20, help="APGD-CE/APGD-T iterations")
    parser.add_argument("--n_target_classes", type=int, default=2, help="APGD-T/FAB-T targets")
    parser.add_argument("--fab_steps", type=int, default=20, help="FAB-T iterations")
    parser.add_argument("--square_queries", type=int, default=200, help="Square queries")
    parser.add_argument("--threads", type=int, default=2, help="threads of each framework")
    parser.add_argument(
        "--fold_batch_norm",
        type=int,
        default=0,
        choices=[0, 1],
        help="1: ours attacks twins_tf.models.fold_batch_norm(model), the same "
        "function with every conv + BN folded (inference-mode lever); "
        "0: the model as built",
    )
    machine.add_allow_load_flag(parser)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in (
        "examples",
        "image_size",
        "upsample",
        "num_classes",
        "apgd_steps",
        "n_target_classes",
        "fab_steps",
        "square_queries",
        "threads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_target_classes + 1 > args.num_classes:
        parser.error(
            f"--n_target_classes {args.n_target_classes} needs --num_classes >= "
            f"{args.n_target_classes + 1}"
        )
    return args


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# --- the official code, in its own process ----------------------------------------------------
def run_official(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import logging

    from pyautoattack import AutoAttack  # noqa: E402
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
    from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
    from pyautoattack.square import SquareAttack  # noqa: E402
    from torch_resnet import TorchPixelResNet, torch_resnet  # noqa: E402

    logging.getLogger("auto-attack").setLevel(logging.WARNING)

    net = torch_resnet("resnet18", args.num_classes, seed=0)
    module = TorchPixelResNet(net, upsample=args.upsample).eval()
    rng = np.random.default_rng(0)
    size = args.image_size
    x = rng.uniform(size=(args.examples, size, size, 3)).astype(np.float32)
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        y_t = module(x_t).argmax(1)
    np.savez(
        os.path.join(args.workdir, "data.npz"),
        x=x,
        y=y_t.numpy(),
        **{key: value.numpy() for key, value in net.state_dict().items()},
    )
    norm, eps = {"linf": "Linf", "l2": "L2"}[args.norm], args.epsilon
    common = dict(norm=norm, eps=eps, seed=0, device="cpu")
    attacks = {
        "apgd-ce": APGDAttack(module, n_iter=args.apgd_steps, n_restarts=1, loss="ce", **common),
        "apgd-t": APGDAttack_targeted(
            module,
            n_iter=args.apgd_steps,
            n_restarts=1,
            n_target_classes=args.n_target_classes,
            **common,
        ),
        "fab-t": FABAttack_PT(
            module,
            n_restarts=1,
            n_iter=args.fab_steps,
            targeted=True,
            n_target_classes=args.n_target_classes,
            **common,
        ),
        "square": SquareAttack(
            module,
            n_queries=args.square_queries,
            p_init=0.8,
            n_restarts=1,
            resc_schedule=False,
            **common,
        ),
    }
    seconds, batch = {}, {}
    for name in ATTACKS:
        attacks[name].perturb(x_t, y_t)  # warm-up
        seconds[name] = timed(lambda name=name: attacks[name].perturb(x_t, y_t))
        batch[name] = int(x_t.shape[0])  # perturb attacks all of x at once
    aa = AutoAttack(
        module, norm=norm, eps=eps, seed=0, version="custom", attacks=list(ATTACKS), device="cpu"
    )
    aa.apgd, aa.apgd_targeted, aa.fab, aa.square = (attacks[name] for name in ATTACKS)
    batch["cascade"] = len(x)
    seconds["cascade"] = timed(
        lambda: aa.run_standard_evaluation(x_t, y_t, batch_size=batch["cascade"])
    )
    return dict(
        seconds=seconds,
        batch=batch,
        version=f"pyautoattack {__import__('pyautoattack').__version__}, torch {torch.__version__}",
    )


# --- ours, in its own process ------------------------------------------------------------------
def run_twins(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from twins_tf import weights
    from twins_tf.attacks import AutoAttack
    from twins_tf.models import build_resnet, fold_batch_norm

    with np.load(os.path.join(args.workdir, "data.npz")) as data:
        x, y = data["x"], data["y"].astype(np.int32)
        state = {key: data[key] for key in data.files if key not in ("x", "y")}
    model = build_resnet(
        "resnet18", args.num_classes, input_shape=x.shape[1:], upsample=args.upsample
    )
    weights.load_torch_state_dict(model, state, head=True)
    if args.fold_batch_norm:
        model = fold_batch_norm(model)
    agree = np.mean(np.argmax(model(x, training=False), -1) == y)
    aa = AutoAttack(
        args.epsilon,
        norm=args.norm,
        seed=0,
        apgd_steps=args.apgd_steps,
        fab_steps=args.fab_steps,
        square_queries=args.square_queries,
        n_target_classes=args.n_target_classes,
    )
    attacks = dict(zip(aa.attack_names, aa.sub_attacks(model)))
    seconds, batch = {}, {}
    for name in ATTACKS:
        attacks[name](model, x, y, seed=0)  # warm-up: traces the graphs
        seconds[name] = timed(lambda name=name: attacks[name](model, x, y, seed=0))
        batch[name] = int(x.shape[0])
    seconds["cascade"] = timed(lambda: aa(model, x, y))  # one batch: all of x
    batch["cascade"] = int(x.shape[0])
    return dict(
        seconds=seconds,
        batch=batch,
        version=f"twins_tf, TF {tf.__version__}",
        label_agreement=float(agree),
    )


# --- the parent: one process per framework, the table ------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = run_official(args) if args.worker == "official" else run_twins(args)
        with open(os.path.join(args.workdir, f"{args.worker}.json"), "w") as f:
            json.dump(result, f)
        return
    forwarded = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    run = machine.Run(allow_load=args.allow_load)
    print(run.machine_line(), file=sys.stderr, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for worker in WORKERS:
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    *forwarded,
                    "--worker",
                    worker,
                    "--workdir",
                    workdir,
                ],
                check=True,
            )
            with open(os.path.join(workdir, f"{worker}.json")) as f:
                results[worker] = json.load(f)
            print(f"{worker}: {time.perf_counter() - start:.0f} s wall (process)", file=sys.stderr)
    run.finish()
    report(args, results, run)


def report(args, results, run):
    """The table and the summary lines of `results` ({worker: its JSON})."""
    print(run.machine_line())
    print(
        f"ResNet-18 (random weights and BN statistics), {args.image_size} px "
        f"(x{args.upsample} inside the model), "
        f"{args.num_classes} classes, {args.examples} images, {args.norm}, "
        f"epsilon {args.epsilon:g} (nothing broken: every budget spent); {args.threads} "
        f"threads per framework; "
        f"{results['twins_tf']['version']}"
        f"{' (BN folded into the convolutions)' if args.fold_batch_norm else ''}; "
        f"{results['official']['version']}; "
        f"Keras and PyTorch predictions agree on "
        f"{results['twins_tf']['label_agreement']:.0%} of the images; load average "
        f"{run.load_start:.2f} at the start, {run.load_end:.2f} at the end{run.table_label()}"
    )
    budget = {
        "apgd-ce": f"{args.apgd_steps} steps",
        "apgd-t": f"{args.n_target_classes} targets x {args.apgd_steps} steps",
        "fab-t": f"{args.n_target_classes} targets x {args.fab_steps} steps",
        "square": f"{args.square_queries} queries",
        "cascade": "the four in sequence",
    }
    t = args.n_target_classes
    scale = {
        "apgd-ce": 100 / args.apgd_steps,
        "apgd-t": 900 / (t * args.apgd_steps),
        "fab-t": 900 / (t * args.fab_steps),
        "square": 5000 / args.square_queries,
    }
    print(
        "| attack | budget | twins_tf batch | official bs | twins_tf s | official s "
        "| twins_tf / official | twins_tf s, standard budget, per 100 examples |"
    )
    print("|---|---|---|---|---|---|---|---|")
    standard_total = 0.0
    ours, theirs = results["twins_tf"], results["official"]
    for name in (*ATTACKS, "cascade"):
        if name == "cascade":
            standard = standard_total
        else:
            standard = ours["seconds"][name] * scale[name] * 100 / args.examples
            standard_total += standard
        print(
            f"| {name} | {budget[name]} | {ours['batch'][name]} | {theirs['batch'][name]} "
            f"| {ours['seconds'][name]:.1f} | {theirs['seconds'][name]:.1f} "
            f"| {ours['seconds'][name] / theirs['seconds'][name]:.2f} "
            f"| {standard:,.0f}{' (sum)' if name == 'cascade' else ''} |"
        )
    print()
    for name in (*ATTACKS, "cascade"):
        print(
            run.summary(
                f"autoattack {name} ({budget[name]}) twins_tf vs official",
                machine.Side("twins_tf", ours["seconds"][name], f"(batch {ours['batch'][name]})"),
                machine.Side("official", theirs["seconds"][name], f"(bs {theirs['batch'][name]})"),
                unit="s",
                digits=1,
            )
        )


if __name__ == "__main__":
    main()
