"""Time per 100 examples of each AutoAttack sub-attack (and of PGD-10) on a ResNet-18.

    python benchmarks/attacks.py                       # 32 px, reduced budgets, extrapolated
    python benchmarks/attacks.py --full                # the standard budgets, measured
    python benchmarks/attacks.py --image_size 32 --upsample 7   # CIFAR as the spec trains it

Worst case on purpose: epsilon is 1e-6, so no point is ever broken and every sub-attack spends
its whole budget on every example (APGD-T and FAB-T all 9 targets, Square all 5000 queries).
On a real model the later attacks only see the points still robust, so an AutoAttack run costs
at most the sum of the rows.

Without --full each attack runs a reduced budget (flags below) and the time is scaled
linearly to the standard budget; that is exact up to noise because every iteration does the
same work when nothing is broken (the first call, which traces the graph, is not timed).  The
output says which rows were extrapolated.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from twins_tf.attacks import APGD, FAB, PGD, Square  # noqa: E402
from twins_tf.models import build_resnet  # noqa: E402

STANDARD = dict(apgd_steps=100, fab_steps=100, square_queries=5000, targets=9)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=100, help="examples per attack call")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--upsample", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--apgd_steps", type=int, default=10, help="reduced APGD budget")
    parser.add_argument("--fab_steps", type=int, default=10, help="reduced FAB budget")
    parser.add_argument("--square_queries", type=int, default=200, help="reduced Square budget")
    parser.add_argument("--full", action="store_true", help="run the standard budgets")
    return parser.parse_args()


def timed(function):
    function()  # trace and warm up
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main():
    args = parse_args()
    tf.random.set_seed(0)
    model = build_resnet("resnet18", args.num_classes, input_shape=(args.image_size,) * 2 + (3,),
                         upsample=args.upsample)
    x = tf.random.stateless_uniform([args.batch, args.image_size, args.image_size, 3], [0, 1])
    y = tf.argmax(model(x, training=False), -1, output_type=tf.int32)  # all "correct"
    eps = 1e-6
    budget = STANDARD if args.full else dict(
        apgd_steps=args.apgd_steps, fab_steps=args.fab_steps,
        square_queries=args.square_queries, targets=1)
    rows = []

    def add(name, attack, scale):
        seconds = timed(lambda: attack.perturb(x, y, seed=0)) * scale
        rows.append((name, seconds * 100 / args.batch, scale != 1))

    add("apgd-ce", APGD(model, eps, norm=args.norm, steps=budget["apgd_steps"]),
        STANDARD["apgd_steps"] / budget["apgd_steps"])
    add("apgd-t", APGD(model, eps, norm=args.norm, loss="dlr", targeted=True,
                       steps=budget["apgd_steps"], n_target_classes=budget["targets"]),
        STANDARD["apgd_steps"] * STANDARD["targets"] / budget["apgd_steps"] / budget["targets"])
    add("fab-t", FAB(model, eps, norm=args.norm, steps=budget["fab_steps"],
                     n_target_classes=budget["targets"]),
        STANDARD["fab_steps"] * STANDARD["targets"] / budget["fab_steps"] / budget["targets"])
    # Square's start is one query; the search runs n_queries - 1 more
    add("square", Square(model, eps, norm=args.norm, n_queries=budget["square_queries"]),
        (STANDARD["square_queries"] - 1) / (budget["square_queries"] - 1))
    pgd = PGD(eps, eps / 4, 10, norm=args.norm)
    seconds = timed(lambda: pgd(model, x, y))
    rows.append(("pgd-10", seconds * 100 / args.batch, False))

    pixels = args.image_size * args.upsample
    print(f"ResNet-18 (twin BN, inference), {pixels} px into the network, batch {args.batch}, "
          f"{args.norm}, {os.cpu_count()} CPU cores, TF {tf.__version__}")
    print("| attack | standard budget | seconds per 100 examples | measured or extrapolated |")
    print("|---|---|---|---|")
    budgets = {"apgd-ce": "100 steps", "apgd-t": "9 targets x 100 steps",
               "fab-t": "9 targets x 100 steps", "square": "5000 queries", "pgd-10": "10 steps"}
    for name, seconds, extrapolated in rows:
        how = "extrapolated" if extrapolated else "measured"
        if extrapolated:
            how += {"apgd-ce": f" from {budget['apgd_steps']} steps",
                    "apgd-t": f" from 1 target x {budget['apgd_steps']} steps",
                    "fab-t": f" from 1 target x {budget['fab_steps']} steps",
                    "square": f" from {budget['square_queries']} queries"}[name]
        print(f"| {name} | {budgets[name]} | {seconds:,.0f} | {how} |")
    total = sum(seconds for name, seconds, _ in rows if name != "pgd-10")
    print(f"| AutoAttack standard, worst case | sum of the four | {total:,.0f} | |")


if __name__ == "__main__":
    main()
