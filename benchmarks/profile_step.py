"""Where a twins_tf training step's time goes: a TensorFlow profiler op breakdown.

    python benchmarks/profile_step.py                       # ResNet-18 AT, 64 px, batch 32, PGD-3
    python benchmarks/profile_step.py --method twins_at --arch resnet50

Builds the same step as benchmarks/vs_pytorch.py's twins_tf worker (`vs_pytorch.tf_trainer`:
the same network, attack, optimizer, threads and data), runs two untimed steps, then
--steps steps under `tf.profiler.experimental`, and sums the trace's op events per step:
by phase (the attack's PGD loop, the training forward, its backward, the optimizer update,
the rest) and by op kind (convolution forward / backward w.r.t. the input / backward w.r.t.
the kernel, BatchNorm, the attack's sign/projection arithmetic, ...).  With one inter-op
thread (the benchmark's setting) TensorFlow runs one op at a time, so the op times add up to
the step's wall time apart from the executor's own overhead, printed as "not in an op".

No TensorBoard: the trace (`*.xplane.pb`, the profiler's XSpace protobuf) is read with the
protobuf class TensorFlow ships (`tensorflow.tsl.profiler.protobuf.xplane_pb2`), where each
executed op is an event named "<op name>:<op type>" on the executor's thread line.  That
layout is the profiler's, not a public API (checked against TF 2.21.0); if a TensorFlow
upgrade changes it, this script fails with "no op events", not with wrong numbers.
"""

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vs_pytorch import (  # noqa: E402  (the one definition of the step, and its archs)
    RESNETS,
    TF_METHODS,
    TIMM_MODELS,
    tf_trainer,
)

# vs_pytorch's twins_tf variants that change the step inside the process (not its environment
# or checkout): the library as it is, and the bfloat16 steps.
VARIANTS = ("fused", "bf16", "bf16_attack")

# Op kind by op type; the first matching rule wins (types are TensorFlow's and oneDNN's
# rewritten names, e.g. _MklConv2D, _FusedConv2D, _MklFusedBatchNormV3).
KINDS = (
    ("conv backward (input)", ("Conv2DBackpropInput",)),
    ("conv backward (kernel)", ("Conv2DBackpropFilter",)),
    ("conv forward", ("Conv2D", "DepthwiseConv2d")),  # also _MklNativePadWithConv2D
    ("batch norm (fused kernels)", ("FusedBatchNorm",)),
    ("matmul (head)", ("MatMul",)),
    ("pooling", ("MaxPool", "AvgPool", "Mean")),
    ("relu", ("Relu",)),
    (
        "padding / slicing / concat",
        ("Pad", "Slice", "ConcatV2", "StridedSlice", "Reshape", "Transpose"),
    ),
    ("optimizer update", ("ResourceApply", "AssignVariable", "AssignAdd", "AssignSub")),
    ("variable reads", ("ReadVariableOp",)),
    ("loss / softmax", ("Softmax", "Xent", "LogSoftmax")),
    ("dtype casts (mixed precision)", ("Cast",)),
)


def op_kind(op_type, op_name):
    if "batchnorm/" in op_name or "/batch_normalization" in op_name:
        return "batch norm (affine map / composed)"
    if "/sgd/" in op_name or op_name.startswith("sgd/") or "SGD/" in op_name:
        return "optimizer update"
    for kind, patterns in KINDS:
        if any(p in op_type for p in patterns):
            return kind
    if op_type in (
        "Sign",
        "Minimum",
        "Maximum",
        "ClipByValue",
        "RandomUniform",
        "StatelessRandomUniformV2",
        "StatelessRandomGetKeyCounter",
    ):
        return "sign / projection / clamp / noise"
    return "other elementwise and bookkeeping"


def phase(op_name):
    if op_name.startswith("while/") or "/while/" in op_name:
        return "attack (PGD loop)"
    if "gradient_tape/" in op_name:
        return "training backward"
    if op_name.startswith("sgd/") or "/sgd/" in op_name or "SGD/" in op_name:
        return "optimizer update"
    return "training forward, metrics, rest"


def op_events(logdir):
    """[(op name, op type, duration s)] of every op event in the newest trace under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(
        glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime
    )
    if not paths:
        raise RuntimeError(f"no *.xplane.pb trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                op_name, sep, op_type = name.rpartition(":")
                if sep and op_name and op_type and " " not in op_type and "::" not in name:
                    events.append((op_name, op_type, event.duration_ps * 1e-12))
    if not events:
        raise RuntimeError("no op events in the trace: the profiler's XSpace layout changed")
    return events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=(*RESNETS, *TIMM_MODELS))
    parser.add_argument("--method", default="at", choices=TF_METHODS)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pgd_steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument(
        "--variant",
        default="fused",
        choices=VARIANTS,
        help="vs_pytorch's twins_tf variant: fused (float32), bf16 (--precision=mixed_bfloat16), "
        "bf16_attack (--precision=bfloat16)",
    )
    args = parser.parse_args(argv)
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import tensorflow as tf

    config = dict(
        arch=args.arch,
        method=args.method,
        image_size=args.image_size,
        batch=args.batch,
        pgd_steps=args.pgd_steps,
        threads=args.threads,
        num_classes=10,
        variant=args.variant,
    )
    step = tf_trainer(config)["step"]
    step(), step()
    logdir = tempfile.mkdtemp(prefix="profile_step_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - start) / args.steps
    tf.profiler.experimental.stop()
    events = op_events(logdir)
    by_phase, by_kind = collections.Counter(), collections.Counter()
    for op_name, op_type, seconds in events:
        by_phase[phase(op_name)] += seconds / args.steps
        by_kind[op_kind(op_type, op_name)] += seconds / args.steps
    in_ops = sum(by_phase.values())
    print(
        f"{args.arch} {args.method} ({args.variant}), {args.image_size} px, batch {args.batch}, "
        f"PGD-{args.pgd_steps}, {args.threads} intra-op threads, 1 inter-op thread; "
        f"{args.steps} profiled steps; load average {os.getloadavg()[0]:.2f}; "
        f"step {1000 * wall:.0f} ms wall under the profiler, {1000 * in_ops:.0f} ms in ops"
    )
    for title, counter in (("phase", by_phase), ("op kind", by_kind)):
        print()
        print(f"| {title} | ms/step | share of the step |")
        print("|---|---|---|")
        for name, seconds in counter.most_common():
            print(f"| {name} | {1000 * seconds:.0f} | {seconds / wall:.0%} |")
        if title == "phase":
            print(
                f"| not in an op (executor, Python, waiting) | {1000 * (wall - in_ops):.0f} "
                f"| {(wall - in_ops) / wall:.0%} |"
            )
    print()
    print("the 15 costliest op types, ms/step (oneDNN's rewritten names):")
    by_type = collections.Counter()
    for _, op_type, seconds in events:
        by_type[op_type] += seconds / args.steps
    for op_type, seconds in by_type.most_common(15):
        print(f"  {op_type}: {1000 * seconds:.0f}")
    print()
    print("op kind within the attack (PGD loop), ms/step:")
    attack = collections.Counter()
    for op_name, op_type, seconds in events:
        if phase(op_name) == "attack (PGD loop)":
            attack[op_kind(op_type, op_name)] += seconds / args.steps
    for name, seconds in attack.most_common():
        print(f"  {name}: {1000 * seconds:.0f}")


if __name__ == "__main__":
    main()
