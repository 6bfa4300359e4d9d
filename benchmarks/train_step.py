"""Speed and peak memory of one AdversarialTrainer step per method, and where XLA loses time.

    python benchmarks/train_step.py            # defaults: ResNet-18 grid + ResNet-50 XLA breakdown
    python benchmarks/train_step.py --archs resnet18,resnet50     # both archs in part 1 (slow)
    python benchmarks/train_step.py --archs resnet18 --methods at,twins_at --no_xla_breakdown
    python benchmarks/train_step.py --xla_breakdown_only --breakdown_arch resnet50
    # the spec's full setting (224 px, batch 128, PGD-10); hours on a small CPU:
    python benchmarks/train_step.py --archs resnet18,resnet50 --image_size 224 --batch 128 \
        --pgd_steps 10 --repeats 3

Part 1, the training step.  For every arch x method x precision x jit_compile it measures one
`twins_tf.AdversarialTrainer` step (spec §4-6: PGD(8/255, 2/255, k, random start) against the
model in inference mode, the method's training forward(s), its loss and an SGD(0.003,
momentum 0.9) update with coupled weight decay) on random [0, 1] images and integer labels.
The step is Keras's own compiled train function (`trainer.make_train_function()`, what `fit`
and `train_on_batch` run) called on one in-memory batch, so no input pipeline is timed.  Its
first call traces the step (with jit_compile, also XLA-compiles it); that time is reported
as "first call s" and excluded from the step time, the median of --repeats later calls.
Models are built with `twins_tf.models.build_model(arch, classes, twin=<twins_* method>)`
*after* the dtype policy is set, so under "mixed_bfloat16" the network trains in bfloat16; the
PGD attack stays float32 (the `twins_tf.attacks.PGD` default) unless --pgd_compute_dtype policy.
Any arch of `build_model` runs (resnet18, convnext_tiny, vit_s16, ...).  Twin methods need
BatchNormalization, so for the LayerNorm backbones (ConvNeXt, ViT) their rows are skipped
(said on stderr) and the breakdown uses the plain model; which archs have BN is asked of the
registry once, in a subprocess, before any row runs (the driver itself imports no TensorFlow).
At the default 64 px a ViT-S/16 sees a 4 x 4 patch grid (17 tokens with the class token) and
a ConvNeXt's last stage a 2 x 2 map: the same pixels for every arch; see vs_pytorch.py.

Every configuration runs in a fresh subprocess (this script re-invoked with a hidden --one
flag that prints one JSON line), so its peak RSS (`ru_maxrss`) is its own and no dtype policy,
XLA cache or allocator state leaks between rows.  Peak RSS includes the TensorFlow runtime
and the model; "peak over model" is the growth from just before the first call, i.e. what
tracing/compiling and running the step add.  (On CPU,
`tf.config.experimental.get_memory_info("CPU:0")` returns zeros, so RSS is the only measure.)
From the same run the script then prints the ratios: TWINS-AT, TRADES and TWINS-TRADES step
time over AT's, XLA over no XLA, and bfloat16 over float32.  Rows are printed as they finish,
so an interrupted run keeps what it measured.  The run ends with one `SUMMARY` line per ratio
(benchmarks/machine.py): both step times, the CPU with the flags that pick oneDNN's kernels,
and the 1-minute load average at the start and end; when the load at the start exceeds 1.5
the ratio is withheld and the tables are labelled as loaded (--allow_load: shown, marked
LOADED).

Part 2, the XLA breakdown (on by default; --no_xla_breakdown skips it).  XLA was measured
3.6-5.5x slower than plain graph mode for a ResNet-50 PGD step on a CPU.  To tell compile
time, the attack's `tf.while_loop` and the convolutions apart, it times, each a `tf.function`
with jit_compile False and True (one subprocess per setting, float32, --breakdown_arch):
  (a) one inference forward of the model;
  (b) one inference forward + input gradient: the work of one PGD iteration;
  (c) the PGD-k attack as twins_tf runs it (`PGD.__call__`, a `tf.while_loop`);
  (d) the same random start and k iterations unrolled in Python in one tf.function;
  (e) one training forward + weight gradient (the non-attack part of an AT step);
  (f) the whole AdversarialTrainer step (TWINS-AT on a twin model, AT on a plain one);
with, per part, the Python trace time (`get_concrete_function`), the first call after it
(graph optimisation, or XLA compilation, plus one run) and the steady state (median of
--repeats calls).  Reading it: if (a), (b) and (e) are already slower under XLA, the
convolutions are (XLA's own CPU kernels instead of oneDNN's); if (c) is slower but (d) and
k x (b) are not, the loop is; if only the first calls are, it is compile time.

Cost: at the default sizes most of the wall time is tracing and compiling, which does not
shrink with the image size: on 2 cores about 15-45 s per ResNet-18 row (the XLA rows are the
slower ones) and 70-90 s per ResNet-50 row.  Hence part 1 defaults to ResNet-18 (16 rows,
about 10 minutes) and ResNet-50 is covered by the breakdown (row (f) is its full step, with
and without XLA); adding resnet50 to --archs adds roughly 25 minutes.  A convnext_tiny or
vit_s16 row (no XLA) took 26-58 s at load average 3-5, of which the first call 11-33 s.  The
whole default
run should take 15-20 minutes (an estimate from smoke runs, not a measurement).  At the small
default sizes the step-time ratios are only indicative: rerun at the full setting before
quoting numbers, and run it alone on the machine.  At tiny sizes (e.g. 32 px, batch 4)
twin methods can diverge from random weights: the Frozen wing normalises with the initial
0/1 statistics, which do not fit a random network's activations (a pre-trained BN's do);
such rows are marked "loss not finite", their timing is still valid.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (shared with the other benchmarks)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("clean", "at", "trades", "l2sp", "twins_at", "twins_trades")
PRECISIONS = ("float32", "mixed_bfloat16")
EPSILON, STEP_SIZE = 8 / 255, 2 / 255
LEARNING_RATE = 0.003
RESULT_PREFIX = "@@train_step_result@@ "
PARTS = (
    ("a", "inference forward"),
    ("b", "forward + input gradient (1 PGD iteration)"),
    ("c", "PGD-k, tf.while_loop (PGD.__call__)"),
    ("d", "PGD-k, unrolled in Python"),
    ("e", "training forward + weight gradient"),
    ("f", "full AdversarialTrainer step"),
)


def _csv(choices=None):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if choices is not None and item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"got {text!r}; choose from {choices}")
        return items

    return parse


# Run by arch_batch_norm in a child process, so that the driver never imports TensorFlow.
_ASK_REGISTRY = """
import json, sys
from twins_tf.models import registry
try:
    print(json.dumps({arch: registry.has_batch_norm(arch) for arch in sys.argv[1:]}))
except ValueError as error:
    sys.exit(str(error))
"""


def arch_batch_norm(archs, root=ROOT):
    """{arch: whether it has BatchNormalization} from `twins_tf.models.registry` (of the
    checkout `root`), asked in a child process; exits with the registry's one-line message
    for an unknown arch, before any configuration runs."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(
        [sys.executable, "-c", _ASK_REGISTRY, *archs], capture_output=True, text=True, env=env
    )
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        sys.exit(f"error: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--archs",
        type=_csv(),
        default=["resnet18"],
        help="comma-separated build_model archs, e.g. resnet18,convnext_tiny,vit_s16",
    )
    parser.add_argument(
        "--methods",
        type=_csv(METHODS),
        default=["at", "twins_at", "trades", "twins_trades"],
        help=f"comma-separated, from {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--precisions",
        type=_csv(PRECISIONS),
        default=list(PRECISIONS),
        help="comma-separated Keras dtype policies",
    )
    parser.add_argument(
        "--jit",
        type=_csv(["off", "on"]),
        default=["off", "on"],
        help="jit_compile settings to run: off,on",
    )
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch (even)")
    parser.add_argument("--pgd_steps", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls after the first; the median is reported"
    )
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument(
        "--weight_decay",
        type=float,
        default=1e-5,
        help="coupled weight decay of the trainer (spec §6, CIFAR)",
    )
    parser.add_argument(
        "--pgd_compute_dtype",
        choices=["float32", "policy"],
        default="float32",
        help="PGD's compute_dtype: float32 (library default) or the policy's",
    )
    parser.add_argument(
        "--xla_breakdown",
        dest="xla_breakdown",
        action="store_true",
        default=True,
        help="run part 2, the XLA breakdown (the default)",
    )
    parser.add_argument(
        "--no_xla_breakdown", dest="xla_breakdown", action="store_false", help="skip part 2"
    )
    parser.add_argument("--xla_breakdown_only", action="store_true", help="skip part 1")
    parser.add_argument("--breakdown_arch", default="resnet50")
    parser.add_argument(
        "--breakdown_model",
        choices=["twin", "plain"],
        default="twin",
        help="BN of the breakdown model (inference uses the Adaptive wing)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds allowed per subprocess"
    )
    machine.add_allow_load_flag(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, JSON
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even (twin methods split it into two halves)")
    if args.repeats < 1 or args.pgd_steps < 0:
        parser.error("--repeats must be >= 1 and --pgd_steps >= 0")
    return args


# --- inside a subprocess ---------------------------------------------------------------------
def _current_rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time_calls(function, repeats):
    """(seconds of the first call, median seconds of `repeats` later calls, their list);
    `function` must block until its work is done."""
    start = time.perf_counter()
    function()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def _inputs(tf, batch, size, num_classes):
    x = tf.random.stateless_uniform([batch, size, size, 3], [1, 2])
    y = tf.random.stateless_uniform([batch], [3, 4], 0, num_classes, dtype=tf.int32)
    return x, y


def _trainer_step(model, method, config, x, y):
    """A compiled AdversarialTrainer step on (x, y): (step function, losses list, trainer)."""
    import keras

    from twins_tf.attacks import PGD
    from twins_tf.trainer import AdversarialTrainer

    attack = None
    if method.adversarial:
        compute_dtype = None if config["pgd_compute_dtype"] == "policy" else "float32"
        attack = PGD(
            EPSILON,
            STEP_SIZE,
            config["pgd_steps"],
            random_start=True,
            seed=0,
            compute_dtype=compute_dtype,
        )
    trainer = AdversarialTrainer(
        model, method=method.name, attack=attack, weight_decay=config["weight_decay"]
    )
    trainer.compile(keras.optimizers.SGD(LEARNING_RATE, momentum=0.9), jit_compile=config["jit"])
    trainer.make_train_function()
    losses = []

    def step():
        # With a Python iterator Keras calls its compiled one-batch step function directly.
        logs = trainer.train_function(iter([(x, y)]))
        losses.append(float(logs["loss"]))  # blocks until the step has run

    return step, losses, trainer


def _finite(values):
    return all(abs(v) != float("inf") and v == v for v in values)


def run_train_step(config):
    """One row of part 1: build, trace/compile, time the AdversarialTrainer step."""
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import keras
    import tensorflow as tf

    from twins_tf import methods as methods_lib
    from twins_tf.models import build_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(config["precision"])  # before building the model
    try:
        method = methods_lib.get(config["method"])
        size = config["image_size"]
        model = build_model(
            config["arch"], config["num_classes"], twin=method.twin, input_shape=(size, size, 3)
        )
        x, y = _inputs(tf, config["batch"], size, config["num_classes"])
        step, losses, trainer = _trainer_step(model, method, config, x, y)
        rss_before = _current_rss_mib()
        first, step_seconds, times = _time_calls(step, config["repeats"])
        return dict(
            config,
            jit_effective=bool(trainer.jit_compile),
            first_s=first,
            step_s=step_seconds,
            step_times=times,
            peak_rss_mib=_peak_rss_mib(),
            rss_before_mib=rss_before,
            losses=losses,
            finite=_finite(losses),
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")


def run_breakdown(config):
    """Part 2 for one jit_compile setting: parts (a)-(f), float32."""
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import keras
    import tensorflow as tf

    from twins_tf import methods as methods_lib
    from twins_tf.attacks import PGD
    from twins_tf.models import build_model

    keras.utils.set_random_seed(0)
    size, steps = config["image_size"], config["pgd_steps"]
    model = build_model(
        config["arch"], config["num_classes"], twin=config["twin"], input_shape=(size, size, 3)
    )
    x, y = _inputs(tf, config["batch"], size, config["num_classes"])
    pgd = PGD(EPSILON, STEP_SIZE, steps, random_start=True, seed=0)
    seed = tf.constant([0, 1], tf.int64)

    def cross_entropy(logits):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=tf.cast(logits, tf.float32)
            )
        )

    def forward(x):
        return model(x, training=False)

    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = cross_entropy(model(x, training=False))
        return tape.gradient(loss, x)

    def pgd_loop(x):
        return pgd(model, x, y, seed=seed)

    def pgd_unrolled(x):
        # PGD's own start and step (private helpers), so the work is exactly (c)'s
        x_adv = pgd._random_start(x, seed)
        for _ in range(steps):
            x_adv = pgd._step(model, x, y, x_adv)
        return tf.stop_gradient(x_adv)

    def train_gradient(x):
        with tf.GradientTape() as tape:
            loss = cross_entropy(model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    functions = dict(a=forward, b=input_gradient, c=pgd_loop, d=pgd_unrolled, e=train_gradient)
    # One-time costs of the first trace in a process are not charged to part (a).
    tf.function(forward)(x).numpy()
    results = {}
    for key, function in functions.items():
        compiled = tf.function(function, jit_compile=config["jit"])
        start = time.perf_counter()
        compiled.get_concrete_function(x)  # Python trace only; the call below reuses it
        trace = time.perf_counter() - start

        def call(compiled=compiled):
            tf.nest.flatten(compiled(x))[0].numpy()

        first, steady, times = _time_calls(call, config["repeats"])
        results[key] = dict(trace_s=trace, first_s=first, step_s=steady, step_times=times)

    method = methods_lib.get("twins_at" if config["twin"] else "at")
    step, losses, _ = _trainer_step(model, method, dict(config, pgd_compute_dtype="float32"), x, y)
    first, steady, times = _time_calls(step, config["repeats"])
    results["f"] = dict(
        trace_s=None,
        first_s=first,
        step_s=steady,
        step_times=times,
        method=method.name,
        finite=_finite(losses),
    )
    return dict(config, parts=results, peak_rss_mib=_peak_rss_mib())


def run_one(config_json):
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import keras
    import tensorflow as tf

    config = json.loads(config_json)
    runner = run_breakdown if config["kind"] == "breakdown" else run_train_step
    result = dict(runner(config), tf_version=tf.__version__, keras_version=keras.__version__)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------
def spawn(config, timeout):
    """Run one configuration in a fresh interpreter; its result dict, or one with 'error'."""
    command = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(config)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]), wall_s=wall)
    lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
    return dict(config, error=f"exit {done.returncode}: {lines[-1][:300]}")


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def _ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator / denominator:.2f}"


def _ms(seconds, spec=".0f"):
    return "n/a" if seconds is None else format(seconds * 1e3, spec)


def _s(seconds):
    return "n/a" if seconds is None else f"{seconds:.1f}"


def _jit(flag):
    return "on" if flag else "off"


class Header:
    """Prints the machine line once, with the versions the first subprocess reports."""

    def __init__(self, args, run):
        self.args, self.run, self.printed = args, run, False

    def __call__(self, result):
        if self.printed:
            return
        a = self.args
        print(self.run.machine_line())
        print(
            f"Software: TF {result.get('tf_version', '?')}, Keras "
            f"{result.get('keras_version', '?')}, TF_ENABLE_ONEDNN_OPTS="
            f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; image {a.image_size} px, "
            f"batch {a.batch}, PGD-{a.pgd_steps} (eps 8/255, alpha 2/255, random start, "
            f"attack in {a.pgd_compute_dtype}), {a.num_classes} classes, SGD({LEARNING_RATE}, "
            f"momentum 0.9), wd {a.weight_decay:g}; step = median of {a.repeats} calls after "
            "the first; one subprocess per row\n",
            flush=True,
        )
        self.printed = True


def part1(args, common, header, batch_norm):
    twin = [m for m in args.methods if m.startswith("twins_")]
    for arch in args.archs:
        if twin and not batch_norm[arch]:
            _progress(f"{arch} has no BatchNormalization: {', '.join(twin)} skipped for it")
    configs = [
        dict(
            common,
            kind="train_step",
            arch=arch,
            method=method,
            precision=precision,
            jit=jit == "on",
        )
        for arch in args.archs
        for precision in args.precisions
        for jit in args.jit
        for method in args.methods
        if batch_norm[arch] or method not in twin
    ]
    rows, table_started = [], False
    for index, config in enumerate(configs, 1):
        _progress(
            f"[{index}/{len(configs)}] {config['arch']} {config['method']} "
            f"{config['precision']} jit={_jit(config['jit'])} ..."
        )
        row = spawn(config, args.timeout)
        rows.append(row)
        if "error" in row:
            _progress(f"    FAILED: {row['error']}")
        else:
            _progress(
                f"    {_ms(row['step_s'])} ms/step, first call {row['first_s']:.1f} s, "
                f"{row['wall_s']:.0f} s wall"
            )
        header(row)
        if not table_started:
            print(
                "| arch | method | precision | jit | images/s | ms/step | first call s "
                "| peak RSS MiB | peak over model MiB |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            table_started = True
        print(_row_line(args, row), flush=True)
    if any("error" not in r and not r["finite"] for r in rows):
        print(
            "\n(*) loss not finite: the random-weight model diverged (expected at tiny "
            "batch/image sizes for twin BN); the timing is still valid."
        )
    return rows


def _row_line(args, r):
    jit = _jit(r["jit"])
    start = f"| {r['arch']} | {r['method']} | {r['precision']} | "
    if "error" in r:
        return start + f"{jit} | failed: {r['error'].replace('|', '/')} | | | | |"
    if r["jit_effective"] != r["jit"]:
        jit += f" (Keras ran {_jit(r['jit_effective'])})"
    mark = "" if r["finite"] else " (*)"
    return (
        start + f"{jit} | {args.batch / r['step_s']:.1f} | {_ms(r['step_s'])}{mark} "
        f"| {r['first_s']:.1f} | {r['peak_rss_mib']:.0f} "
        f"| {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |"
    )


def _step_times(rows):
    """{(arch, method, precision, jit): median step seconds, None for a failed row}."""
    return {
        (r["arch"], r["method"], r["precision"], r["jit"]): r.get("step_s")
        for r in rows
        if "error" in r or r.get("step_s") is not None
    }


def print_ratios(args, rows, run):
    print(f"\nRatios of this run{run.table_label()}")
    step = {
        (r["arch"], r["method"], r["precision"], r["jit"]): r["step_s"]
        for r in rows
        if "error" not in r
    }
    first = {
        (r["arch"], r["method"], r["precision"], r["jit"]): r["first_s"]
        for r in rows
        if "error" not in r
    }
    jits = [j == "on" for j in args.jit]

    others = [m for m in ("twins_at", "trades", "twins_trades") if m in args.methods]
    if "at" in args.methods and others:
        columns = [f"{m}/at" for m in others]
        if {"trades", "twins_trades"} <= set(args.methods):
            columns.append("twins_trades/trades")
        print("\nStep time relative to AT (same arch, precision, jit):\n")
        print("| arch | precision | jit | " + " | ".join(columns) + " |")
        print("|---|---|---|" + "---|" * len(columns))
        for arch in args.archs:
            for precision in args.precisions:
                for jit in jits:
                    pairs = [(m, "at") for m in others]
                    if "twins_trades/trades" in columns:
                        pairs.append(("twins_trades", "trades"))
                    cells = [
                        _ratio(
                            step.get((arch, a, precision, jit)), step.get((arch, b, precision, jit))
                        )
                        for a, b in pairs
                    ]
                    print(f"| {arch} | {precision} | {_jit(jit)} | " + " | ".join(cells) + " |")

    if set(jits) == {False, True}:
        print("\nXLA vs no XLA (XLA/no-XLA > 1: XLA is slower):\n")
        print(
            "| arch | method | precision | ms/step no XLA | ms/step XLA | XLA/no-XLA "
            "| first call s no XLA | first call s XLA |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for arch in args.archs:
            for method in args.methods:
                for precision in args.precisions:
                    off, on = (step.get((arch, method, precision, j)) for j in (False, True))
                    f_off, f_on = (first.get((arch, method, precision, j)) for j in (False, True))
                    print(
                        f"| {arch} | {method} | {precision} | {_ms(off)} | {_ms(on)} "
                        f"| {_ratio(on, off)} | {_s(f_off)} | {_s(f_on)} |"
                    )

    if set(args.precisions) == set(PRECISIONS):
        print("\nbfloat16 vs float32 (bf16/fp32 < 1: bfloat16 is faster):\n")
        print("| arch | method | jit | ms/step float32 | ms/step bfloat16 | bf16/fp32 |")
        print("|---|---|---|---|---|---|")
        for arch in args.archs:
            for method in args.methods:
                for jit in jits:
                    fp32, bf16 = (step.get((arch, method, p, jit)) for p in PRECISIONS)
                    print(
                        f"| {arch} | {method} | {_jit(jit)} | {_ms(fp32)} | {_ms(bf16)} "
                        f"| {_ratio(bf16, fp32)} |"
                    )


def part2(args, common, header, batch_norm):
    twin = args.breakdown_model == "twin" and batch_norm[args.breakdown_arch]
    if args.breakdown_model == "twin" and not twin:
        _progress(
            f"{args.breakdown_arch} has no BatchNormalization: the breakdown uses the plain model"
        )
    results = {}
    for jit in (False, True):
        config = dict(
            common,
            kind="breakdown",
            arch=args.breakdown_arch,
            twin=twin,
            jit=jit,
        )
        _progress(f"[breakdown] {args.breakdown_arch} jit={_jit(jit)} ...")
        results[jit] = spawn(config, args.timeout)
        if "error" in results[jit]:
            _progress(f"    FAILED: {results[jit]['error']}")
        else:
            _progress(f"    {results[jit]['wall_s']:.0f} s wall")
        header(results[jit])
    return results


def print_part2(args, results):
    k = args.pgd_steps
    model = next((("twin" if r["twin"] else "plain") for r in results.values()), "?")
    print(
        f"\nXLA breakdown: {args.breakdown_arch} ({model} model), float32, "
        f"{args.image_size} px, batch {args.batch}, k = {k}; each part one tf.function with "
        f"jit_compile off / on; trace = Python tracing, first call = graph optimisation or "
        f"XLA compilation + one run, steady = median of {args.repeats} calls after it\n"
    )
    for jit, result in results.items():
        if "error" in result:
            print(f"jit_compile={jit}: failed: {result['error']}\n")
    parts = {jit: r["parts"] for jit, r in results.items() if "error" not in r}

    def get(jit, key, field):
        return parts[jit][key][field] if jit in parts else None

    print(
        "| part | trace s no XLA | trace s XLA | first call s no XLA | first call s XLA "
        "| steady ms no XLA | steady ms XLA | XLA/no-XLA steady |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, name in PARTS:
        name = name.replace("PGD-k", f"PGD-{k}")
        if key == "f":
            method = next((p["f"]["method"] for p in parts.values()), "?")
            name += f" ({method}, trace inside first call)"
        off, on = get(False, key, "step_s"), get(True, key, "step_s")
        print(
            f"| ({key}) {name} | {_s(get(False, key, 'trace_s'))} "
            f"| {_s(get(True, key, 'trace_s'))} | {_s(get(False, key, 'first_s'))} "
            f"| {_s(get(True, key, 'first_s'))} | {_ms(off, '.1f')} | {_ms(on, '.1f')} "
            f"| {_ratio(on, off)} |"
        )

    if not (k and parts):
        return
    print("\nDerived, steady state:\n")
    print("| | no XLA | XLA |")
    print("|---|---|---|")

    def line(label, value):
        cells = [value(j) if j in parts else "n/a" for j in (False, True)]
        print(f"| {label} | {cells[0]} | {cells[1]} |")

    line("(c)/k: ms per while_loop iteration", lambda j: _ms(get(j, "c", "step_s") / k, ".1f"))
    line("(d)/k: ms per unrolled iteration", lambda j: _ms(get(j, "d", "step_s") / k, ".1f"))
    line(
        "(c) / (k x (b)): the loop over k lone iterations",
        lambda j: _ratio(get(j, "c", "step_s"), k * get(j, "b", "step_s")),
    )
    line(
        "(c) / (d): while_loop over unrolled",
        lambda j: _ratio(get(j, "c", "step_s"), get(j, "d", "step_s")),
    )
    line(
        "(b) / (a): forward + input gradient over forward",
        lambda j: _ratio(get(j, "b", "step_s"), get(j, "a", "step_s")),
    )
    line(
        "(c) / (f): attack share of the train step",
        lambda j: _ratio(get(j, "c", "step_s"), get(j, "f", "step_s")),
    )
    line("peak RSS MiB of the process", lambda j: f"{results[j]['peak_rss_mib']:.0f}")


def summary_lines(args, rows, run):
    """One SUMMARY line (machine.Run.summary) per ratio print_ratios prints: each method
    against AT and TWINS-TRADES against TRADES (same arch, precision, jit), XLA against no
    XLA, bfloat16 against float32; a pair is skipped when one of its rows was not configured
    (a twin method on an arch without BatchNormalization)."""
    step = _step_times(rows)
    lines = []

    def add(comparison, first, second):
        if first[1] in step and second[1] in step:
            lines.append(
                run.summary(
                    f"train_step {comparison}",
                    machine.Side(
                        first[0], None if step[first[1]] is None else 1e3 * step[first[1]]
                    ),
                    machine.Side(
                        second[0], None if step[second[1]] is None else 1e3 * step[second[1]]
                    ),
                    unit="ms",
                    per="per step",
                )
            )

    jits = [j == "on" for j in args.jit]
    pairs = [(m, "at") for m in ("twins_at", "trades", "twins_trades")]
    pairs.append(("twins_trades", "trades"))
    for arch in args.archs:
        for precision in args.precisions:
            for jit in jits:
                for a, b in pairs:
                    add(
                        f"{arch} {a} vs {b} ({precision}, jit {_jit(jit)})",
                        (a, (arch, a, precision, jit)),
                        (b, (arch, b, precision, jit)),
                    )
        for method in args.methods:
            for precision in args.precisions:
                add(
                    f"{arch} {method} jit on vs off ({precision})",
                    ("jit on", (arch, method, precision, True)),
                    ("jit off", (arch, method, precision, False)),
                )
            for jit in jits:
                add(
                    f"{arch} {method} mixed_bfloat16 (attack in "
                    f"{'bfloat16' if args.pgd_compute_dtype == 'policy' else 'float32'}) vs "
                    f"float32 (jit {_jit(jit)})",
                    ("mixed_bfloat16", (arch, method, "mixed_bfloat16", jit)),
                    ("float32", (arch, method, "float32", jit)),
                )
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        run_one(args.one)
        return
    run = machine.Run(allow_load=args.allow_load)
    common = dict(
        image_size=args.image_size,
        batch=args.batch,
        pgd_steps=args.pgd_steps,
        repeats=args.repeats,
        num_classes=args.num_classes,
        weight_decay=args.weight_decay,
        pgd_compute_dtype=args.pgd_compute_dtype,
    )
    header = Header(args, run)
    started = time.perf_counter()
    breakdown = args.xla_breakdown or args.xla_breakdown_only
    archs = ([] if args.xla_breakdown_only else args.archs) + ([args.breakdown_arch] * breakdown)
    batch_norm = arch_batch_norm(archs)
    rows = []
    if not args.xla_breakdown_only:
        rows = part1(args, common, header, batch_norm)
        print_ratios(args, rows, run)
    if breakdown:
        print_part2(args, part2(args, common, header, batch_norm))
    run.finish()
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)\n")
    for line in summary_lines(args, rows, run):
        print(line)


if __name__ == "__main__":
    main()
