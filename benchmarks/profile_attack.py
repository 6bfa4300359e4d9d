"""Where one attack iteration's time goes, twins_tf against PyTorch, by layer kind.

    python benchmarks/profile_attack.py                     # ResNet-18, 64 px, batch 32
    python benchmarks/profile_attack.py --arch resnet50 --image_size 32

A PGD training step is k attack iterations (forward in inference mode, the gradient of the
loss w.r.t. the input, the sign step and the projection) and one training forward/backward;
with k = 3-10 the iterations are most of the step.  This script times one iteration of the
same ResNet on the same images in both frameworks (each in its own process, the same threads,
one inter-op thread) and profiles it with each framework's own profiler, then sums the op
times by the layer they belong to:

    stem 7x7 conv, 3x3 convs, 1x1 convs (shortcuts, bottlenecks), batch norm, relu, max pool,
    zero padding, residual add, input normalisation and clamp, average pool + head + loss, the
    attack's own arithmetic (sign, projection), dtype casts, other

each split into the forward pass and the backward pass (the input gradient).  The twins_tf side
is `twins_tf.attacks.PGD` with one step on `build_model`'s network, called as the trainer
calls it (`training=False`; float32, or with `--precision bfloat16` the mixed_bfloat16 policy
and `compute_dtype=None`, what `train --precision=bfloat16` runs), without the random start so
both sides start from the same images; the PyTorch side is the same iteration written as a
PyTorch user writes it (tests/torch_resnet.py's torchvision-layout ResNet behind the same clamp
and normalisation, NCHW, eval mode; the forward under `torch.autocast` for bfloat16).

Attribution.  TensorFlow: a Keras layer's ops carry its name in their op names (forward
`<model>/<layer>/...`, backward `gradient_tape/<model>/<layer>/...`), read from the trace as in
profile_step.py.  PyTorch: `torch.profiler` with input shapes; a convolution is told by its
weight's shape (7x7 on 3 channels, 3x3, 1x1), other ops by name, and an autograd node's own
time goes to the op it runs.  Both sides count the time *inside* ops ("in ops"); the rest of
an iteration's wall time is the executor, Python, the dispatcher, waiting.  The profilers add
overhead of their own, so the unprofiled median wall time is printed beside.
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import machine  # noqa: E402  (benchmarks/machine.py: the CPU, the load gate, summary lines)
from vs_pytorch import (  # noqa: E402  (the same archs, attack budget, images and timer)
    EPSILON,
    RESNETS,
    STEP_SIZE,
    _data,
    _time,
)

RESULT_PREFIX = "@@profile_attack@@ "
KINDS = (
    "stem 7x7 conv",
    "3x3 convs",
    "1x1 convs (shortcuts, bottlenecks)",
    "batch norm",
    "relu",
    "max pool",
    "zero padding",
    "residual add",
    "input normalisation and clamp",
    "average pool, head and loss",
    "attack arithmetic (sign, projection)",
    "dtype casts",
    "other",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=RESNETS)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timed", type=int, default=10, help="unprofiled iterations timed")
    parser.add_argument("--profiled", type=int, default=5, help="iterations under the profiler")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16"),
        help="bfloat16: twins_tf's --precision=bfloat16 attack (the mixed_bfloat16 policy, PGD "
        "computing in it) against the same iteration under torch.autocast(bfloat16)",
    )
    machine.add_allow_load_flag(parser)
    parser.add_argument("--worker", choices=("tensorflow", "torch"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _median_wall(run, repeats):
    """The median wall time of `repeats` calls of `run` after two untimed ones (the trace or
    warm-up, and one more)."""
    run()
    _, times, _ = _time(run, repeats)  # vs_pytorch's: one untimed call, then the timed ones
    return statistics.median(times)


# --- the TensorFlow side -----------------------------------------------------------------
def tf_layer_kinds(model):
    """{layer name: kind} for build_model's ResNet (convolutions by their kernel size)."""
    import keras

    kinds = {}
    for layer in model.layers:
        name = layer.name
        if isinstance(layer, keras.layers.Conv2D):
            kinds[name] = conv_kind(layer.kernel_size[0])
        elif isinstance(layer, keras.layers.ZeroPadding2D):
            kinds[name] = "zero padding"
        elif "bn" in name or name.endswith("_downsample_1"):
            kinds[name] = "batch norm"
        elif isinstance(layer, keras.layers.ReLU):
            kinds[name] = "relu"
        elif isinstance(layer, keras.layers.MaxPooling2D):
            kinds[name] = "max pool"
        elif isinstance(layer, keras.layers.Add):
            kinds[name] = "residual add"
        elif name in ("normalize", "upsample"):
            kinds[name] = "input normalisation and clamp"
        elif name in ("avgpool", "fc"):
            kinds[name] = "average pool, head and loss"
    return kinds


def tf_kind(op_name, op_type, layers):
    """(kind, "forward" or "backward") of one op of the traced iteration; `layers` maps
    layer names to kinds (`tf_layer_kinds`)."""
    direction = "backward" if "gradient_tape/" in op_name or "Grad" in op_type else "forward"
    if op_type == "Cast":
        return "dtype casts", direction
    for part in op_name.split("/"):
        base = part.rsplit("_", 1)[0] if part.rsplit("_", 1)[-1].isdigit() else part
        kind = layers.get(part) or layers.get(base)
        if kind:
            return kind, direction
    if "SparseSoftmaxCrossEntropy" in op_type or "Mean" in op_type or "xentropy" in op_name:
        return "average pool, head and loss", direction
    if op_type in ("Sign", "Minimum", "Maximum", "ClipByValue", "AddV2", "Mul", "Sub"):
        return "attack arithmetic (sign, projection)", direction
    return "other", direction


def run_tensorflow(args):
    sys.path.insert(0, ROOT)  # this checkout's twins_tf, whichever one is installed
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import tensorflow as tf
    from profile_step import op_events

    from twins_tf.attacks import PGD
    from twins_tf.models import build_model

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    keras.utils.set_random_seed(0)
    bfloat16 = args.precision == "bfloat16"
    if bfloat16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    size = args.image_size
    model = build_model(args.arch, 10, input_shape=(size, size, 3))
    attack = PGD(
        EPSILON, STEP_SIZE, 1, random_start=False, compute_dtype=None if bfloat16 else "float32"
    )
    x, y = (tf.constant(a) for a in _data(args.batch, size, 10))
    iteration = tf.function(lambda: attack(model, x, y))

    def run():
        iteration().numpy()

    wall = _median_wall(run, args.timed)
    logdir = tempfile.mkdtemp(prefix="profile_attack_")
    tf.profiler.experimental.start(logdir)
    for _ in range(args.profiled):
        run()
    tf.profiler.experimental.stop()
    layers = tf_layer_kinds(model)
    times = collections.Counter()
    for op_name, op_type, seconds in op_events(logdir):
        kind, direction = tf_kind(op_name, op_type, layers)
        times[f"{kind}|{direction}"] += seconds / args.profiled
    return dict(wall=wall, times=dict(times), version=f"TF {tf.__version__}")


# --- the PyTorch side --------------------------------------------------------------------
def conv_kind(kernel_size):
    return {7: "stem 7x7 conv", 3: "3x3 convs", 1: "1x1 convs (shortcuts, bottlenecks)"}[
        kernel_size
    ]


def torch_kind(name, shapes, in_model):
    """The kind of one PyTorch op by its name and input shapes, or None if it tells nothing
    (an autograd node or a dispatcher wrapper, attributed through its children)."""
    lower = name.lower()
    if lower in ("aten::to", "aten::_to_copy", "aten::copy_") and len(shapes) >= 1:
        return "dtype casts"
    if (
        "conv" in lower
    ):  # forward: (input, weight, ...); convolution_backward: (grad, input, weight, ...)
        index = 2 if "backward" in lower else 1
        if len(shapes) > index and len(shapes[index]) == 4:
            return conv_kind(shapes[index][2])  # (out, in, kh, kw)
        return None
    if "batch_norm" in lower or "batchnorm" in lower:
        return "batch norm"
    if "relu" in lower or "threshold" in lower:
        return "relu"
    if "max_pool" in lower:
        return "max pool"
    if any(k in lower for k in ("mean", "addmm", "linear", "softmax", "nll", "cross_entropy")):
        return "average pool, head and loss"
    if lower in ("aten::add_", "aten::add") and len(shapes) >= 2 and len(shapes[0]) == 4:
        return "residual add" if shapes[0] == shapes[1] else None
    if any(k in lower for k in ("clamp", "sub", "div", "clampbackward", "upsample")):
        return (
            "input normalisation and clamp" if in_model else "attack arithmetic (sign, projection)"
        )
    if any(k in lower for k in ("sign", "minimum", "maximum", "aten::min", "aten::max", "mul")):
        return "attack arithmetic (sign, projection)"
    return None


def run_torch(args):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_resnet import TorchPixelResNet, TorchResNet

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    net = TorchPixelResNet(TorchResNet(args.arch, 10)).eval()
    x_np, y_np = _data(args.batch, args.image_size, 10)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(y_np).long()

    autocast = dict(dtype=torch.bfloat16, enabled=args.precision == "bfloat16")

    def run():
        x_adv = x.clone().requires_grad_(True)
        with torch.profiler.record_function("model"), torch.autocast("cpu", **autocast):
            logits = net(x_adv)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y), x_adv)
        x_adv = torch.min(
            torch.max(x_adv.detach() + STEP_SIZE * grad.sign(), x - EPSILON), x + EPSILON
        )
        return x_adv.clamp(0.0, 1.0)

    wall = _median_wall(run, args.timed)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        for _ in range(args.profiled):
            run()
    times = collections.Counter()

    def visit(event, in_model, inherited, direction):
        name = event.name
        in_model = in_model or name == "model"
        if "autograd::engine" in name or "Backward" in name or "backward" in name:
            direction = "backward"
        kind = torch_kind(name, [list(s) for s in (event.input_shapes or [])], in_model)
        kind = kind or inherited
        if kind is None:  # a wrapper: its first child that tells its kind speaks for it
            for child in event.cpu_children:
                kind = torch_kind(
                    child.name, [list(s) for s in (child.input_shapes or [])], in_model
                )
                if kind:
                    break
        own = event.self_cpu_time_total * 1e-6 / args.profiled
        times[f"{kind or 'other'}|{direction}"] += own
        for child in event.cpu_children:
            visit(child, in_model, kind, direction)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, False, None, "forward")
    return dict(wall=wall, times=dict(times), version=f"torch {torch.__version__}")


# --- the comparison -----------------------------------------------------------------------
def _launch(args, worker):
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker]
    for name in ("arch", "image_size", "batch", "threads", "timed", "profiled", "precision"):
        command += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"the {worker} worker failed:\n{out.stderr[-3000:]}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run = run_tensorflow if args.worker == "tensorflow" else run_torch
        print(RESULT_PREFIX + json.dumps(run(args)), flush=True)
        return
    run = machine.Run(args.allow_load)
    results = {worker: _launch(args, worker) for worker in ("torch", "tensorflow")}
    run.finish()
    print(run.machine_line())
    print(
        f"{args.arch}, {args.image_size} px, batch {args.batch}, one PGD iteration (forward in "
        f"inference mode + input gradient + sign step + projection) in {args.precision}, "
        f"{args.threads} threads; "
        f"{results['tensorflow']['version']}, {results['torch']['version']}{run.table_label()}"
    )
    print()
    print(
        "| layer kind | twins_tf fwd ms | torch fwd ms | twins_tf bwd ms | torch bwd ms "
        "| twins_tf total | torch total | difference ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    totals = {w: 0.0 for w in results}
    for kind in KINDS:
        cells, sums = [], {}
        for direction in ("forward", "backward"):
            for worker in ("tensorflow", "torch"):
                value = 1000 * results[worker]["times"].get(f"{kind}|{direction}", 0.0)
                sums[worker] = sums.get(worker, 0.0) + value
                cells.append(f"{value:.1f}")
        if not any(sums.values()):
            continue
        totals = {w: totals[w] + sums[w] for w in totals}
        cells += [f"{sums['tensorflow']:.1f}", f"{sums['torch']:.1f}"]
        cells.append(f"{sums['tensorflow'] - sums['torch']:+.1f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    walls = {w: 1000 * results[w]["wall"] for w in results}
    print(
        f"| in ops | | | | | {totals['tensorflow']:.1f} | {totals['torch']:.1f} "
        f"| {totals['tensorflow'] - totals['torch']:+.1f} |"
    )
    print(
        f"| wall, unprofiled median | | | | | {walls['tensorflow']:.1f} | {walls['torch']:.1f} "
        f"| {walls['tensorflow'] - walls['torch']:+.1f} |"
    )
    print()
    print(
        run.summary(
            f"{args.arch} one attack iteration (forward + input gradient), twins_tf vs torch, "
            f"{args.precision}",
            machine.Side("twins_tf", walls["tensorflow"]),
            machine.Side("torch", walls["torch"]),
            unit="ms",
            per="per iteration, unprofiled median",
            digits=1,
        )
    )


if __name__ == "__main__":
    main()
