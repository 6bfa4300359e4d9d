"""One training step of twins_tf against a plain PyTorch PGD-AT / TRADES step.

    python benchmarks/vs_pytorch.py            # 24 processes; see "Cost" below
    python benchmarks/vs_pytorch.py --archs resnet18 --rounds 5
    python benchmarks/vs_pytorch.py --archs resnet18,convnext_tiny,vit_s16 --methods at --rounds 1
    python benchmarks/vs_pytorch.py --image_size 224 --batch 128 --pgd_steps 10   # spec setting
    python benchmarks/vs_pytorch.py --archs resnet18 --methods twins_at \\
        --tf_variants fused,fold,bf16,inter2            # the levers, each against "fused"
    python benchmarks/vs_pytorch.py --archs resnet18 --methods at,twins_at \\
        --tf_variants fused,bf16_attack --torch_variants fp32,bf16   # bfloat16 on both sides

What is compared.  The same network, both sides with the [0, 1] clamp and ImageNet
normalisation inside (tests/torch_resnet.py's `TorchPixelResNet` front on the torch side):
twins_tf's `build_model(arch, ...)` against, for the ResNets (torchvision layout), the plain
PyTorch mirror of tests/torch_resnet.py, and for convnext_tiny and vit_s16 timm's own model
(`timm.create_model("convnext_tiny" | "vit_small_patch16_224", pretrained=False,
num_classes=..., img_size=... for the ViT)`, the network twins_tf's families reproduce).  The
same input size, batch, number of PGD steps (L-inf, eps 8/255, alpha 2/255, random start,
model in eval mode), SGD(0.003, momentum 0.9, weight decay 1e-5) and the same number of
threads.  twins_tf runs its own `AdversarialTrainer` step (Keras's compiled train function,
what `fit` runs) for at, twins_at, trades, twins_trades; PyTorch runs the plain loop a user
would write: a PGD loop in eval mode, then `train()`, forward(s), loss, backward,
`optimizer.step()`, for AT (CE on x_adv) and TRADES (CE-PGD attack, as the twins_tf trainer
uses, then CE(x) + 6 KL(x || x_adv) / B).  twins_tf's steps do one more inference forward,
over the clean and adversarial batch, for the `clean_*` / `adv_*` metrics (about 2/(3k+5) of
an AT step with PGD-k); the torch loop does not.

Which PyTorch.  The ResNets' torch worker runs under this script's Python (the main
virtualenv: torch 2.13.0, CPU build), like every twins_tf worker.  timm does not import there,
so the torch worker of convnext_tiny / vit_s16 runs under the timm environment's Python
(--timm_python, default $TWINS_TF_TIMM_PYTHON or <repo>/.venv-timm/bin/python, which `make
test` creates from tests/timm_requirements.txt): torch 2.14.1 (its CUDA build, run on the CPU)
with timm 1.0.31.  So the torch rows of the two kinds ran different torch builds; the last
line of the output names each arch's.  Importing that torch and timm leaves the worker at
about 710 MiB against 230 MiB for the main virtualenv's torch (CUDA libraries mapped, timm's
modules), so for those archs compare the stages after import in the memory table rather than
the peak RSS ratio.  ConvNeXt and ViT have no BatchNormalization, so twin methods do not apply
to them (the registry says so): their twins_* rows are skipped, only at and trades run.

Image size.  The default 64 px is kept for every arch, without upsampling: the same pixels and
PGD budget for all rows, and the few minutes per configuration stay few.  For vit_s16 that is
a 4 x 4 patch grid (17 tokens with the class token; timm's img_size=64 gives the same): the
step is then mostly the per-token Dense layers and the attention over 17 tokens is a small
part, unlike at 224 px (197 tokens).  --upsample N (nearest-neighbour inside both models, as
`build_model(upsample=N)` and `TorchPixelResNet(upsample=N)` do, timm's img_size = size x N)
measures the geometry of fine-tuning on upsampled small images instead, at several times the
cost.  ConvNeXt at 64 px ends at a 2 x 2 map (total stride 32).

How.  Every (framework, arch, method, variant) runs in its own process (this script re-run with
a hidden --one flag, printing one JSON line), so the peak RSS (`ru_maxrss`) is that step's and
no thread pool, allocator or graph cache is shared.  A process times --repeats steps after
one untimed first step (the trace / warm-up) and reports their median.  --rounds rounds run
every configuration once each, in an order rotated every round, so slow phases of a shared
machine hit every configuration alike; the table gives the median over rounds and the spread
(min-max of the rounds' medians).  Ratios are taken from the medians of the same run.  The CPU
(model, family, the AVX2 / AVX-512 / BF16 / AMX flags that pick oneDNN's kernels) and the load
average (1 min) at the start and end are printed, and the run ends with one `SUMMARY` line per
comparison (benchmarks/machine.py): each twins_tf row against its torch counterpart, each
variant against fused, twins_at/at and twins_trades/trades, torch bf16 against fp32.  If the
load at the start exceeds 1.5 those lines withhold the ratio and the tables are labelled as
loaded; --allow_load prints the ratios marked LOADED.  On a loaded machine read the CPU time
per step (`time.process_time` of the worker during the step) beside the wall time: it counts
the work done, not the time spent waiting for a core, so it is the steadier measure under
load (spinning threads count as work, hence the next point).
OMP_WAIT_POLICY=PASSIVE (the default of --omp_wait_policy) stops PyTorch's OpenMP threads from
spin-waiting: with more runnable threads than cores a spinning thread burns the slice the
other thread needs (docs/benchmarks.md measured 2-9 s against 0.35 s for one torch pass under
load); on a quiet machine ACTIVE can be a few percent faster for torch.

Variants of the twins_tf step (--tf_variants; each a lever measured alone against "fused",
the library as it is):
  fused     the library's step as it is (fused BatchNorm in TwinBatchNormalization);
  fold      the attack's inference passes run through `twins_tf.models.fold_batch_norm`'s
            BN-folded copy of the network (the trainer's `_run_attack` overridden here: the
            library's trainer does not call it yet);
  bf16      Keras mixed_bfloat16 policy for the training forward/backward (the attack stays
            float32, the PGD default);
  bf16_attack  mixed_bfloat16 for the whole step: the training forward/backward and the PGD
            attack in the model's policy (`PGD(..., compute_dtype=None)`); the models keep
            their head (and ViT its attention) in float32, as Keras's mixed-precision guide
            advises for the logits, so the rest runs in bfloat16;
  inter2    TensorFlow inter-op threads = --threads instead of 1;
  onednn0   TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's own CPU kernels instead of oneDNN's);
  onednn1   TF_ENABLE_ONEDNN_OPTS=1 (oneDNN's kernels also where TensorFlow would not pick
            them: TF turns them on by itself only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX);
  xla       jit_compile=True for the whole step;
  arena2    MALLOC_ARENA_MAX=2 (glibc: fewer per-thread heaps, a memory lever);
  mmap      MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 128 KiB (glibc: large blocks
            mapped and returned to the system when freed, a memory lever).
Variants of the PyTorch step (--torch_variants, default fp32):
  fp32      the plain float32 loop above;
  bf16      the attack's forwards and the training forward(s) under
            `torch.autocast("cpu", dtype=torch.bfloat16)`, as a PyTorch user writes mixed
            precision on a CPU; the logits are cast to float32 and the losses computed outside
            autocast (autocast computes them in float32 anyway).  No GradScaler: bfloat16 has
            float32's exponent range.
twins_tf's bf16_attack is compared with torch bf16 (both whole steps in bfloat16), every other
twins_tf variant with torch fp32.  A worker reports what it computed in (the "computed in"
line): for twins_tf the dtypes of the convolutions and matrix products in the traced attack
graph and the training policy, for torch the dtype of the logits in the attack and training.
Memory: besides the peak RSS, each worker records its peak after importing the framework,
after building the model, trainer and optimizer, after running the attack alone once (its
own trace), and after the timed steps, and its resident anonymous / file-mapped memory at the
end; the "Peak RSS by stage" table prints what each stage added.  The attack-alone pass costs
each twins_tf worker one more trace (a few seconds) and does not enter the step's timings.
Cost: a worker's time is mostly process start-up and TensorFlow's trace of the step (its
"first" time), which does not shrink with the image size.  Measured on the shared 2-core
machine: `--rounds 1` (12 workers) took 7.3 minutes at load average 4-5, so the default two
rounds take about 15 minutes there; at load 9-10 a ResNet-18 twins_tf worker alone took
40-100 s.  On a quiet machine the default should stay well under 15 minutes (an estimate, not
measured).  With the attack-alone memory stage (below) each twins_tf worker traces once more:
one round took 24.1 min at load 10 -> 4; the quiet-machine run for the closing note is
`OMP_WAIT_POLICY=PASSIVE python benchmarks/vs_pytorch.py --rounds 2`, estimated at about 12
minutes (docs/benchmarks.md).  For a quick look: --archs resnet18 --methods at,twins_at.
`--archs resnet18,convnext_tiny,vit_s16 --methods at --rounds 1` (6 workers) took 3.6 min at
load average 4.2 -> 3.6.

`--tf_path DIR` imports twins_tf from another checkout (e.g. a `git worktree` of an older
commit) for a before/after measurement of a code change; it is labelled "base".
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import machine  # shared (benchmarks/ is on sys.path)
from train_step import _csv, arch_batch_norm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TF_METHODS = ("at", "twins_at", "trades", "twins_trades")
TORCH_METHODS = ("at", "trades")
TF_VARIANTS = (
    "fused",
    "fold",
    "bf16",
    "bf16_attack",
    "inter2",
    "onednn0",
    "onednn1",
    "xla",
    "arena2",
    "mmap",
    "base",
)
TORCH_VARIANTS = ("fp32", "bf16")
# The torch variant a twins_tf variant is compared with: the same precision of the whole step
# (attack included); every twins_tf variant not named runs its attack in float32.
TORCH_COUNTERPART = {"bf16_attack": "bf16"}
# Environment of a variant's worker process (read by glibc / TensorFlow at start-up).
VARIANT_ENV = {
    "onednn0": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn1": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}
EPSILON, STEP_SIZE = 8 / 255, 2 / 255
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, BETA = 0.003, 0.9, 1e-5, 6.0
RESULT_PREFIX = "@@vs_pytorch@@ "
RESNETS = ("resnet18", "resnet34", "resnet50")  # torch side: tests/torch_resnet.py
# Our arch -> (timm model of the torch side, whether timm's create_model takes img_size).
TIMM_MODELS = {
    "convnext_tiny": ("convnext_tiny", False),
    "vit_s16": ("vit_small_patch16_224", True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--archs", type=_csv((*RESNETS, *TIMM_MODELS)), default=["resnet18", "resnet50"]
    )
    parser.add_argument(
        "--methods",
        type=_csv(TF_METHODS),
        default=list(TF_METHODS),
        help="twins_tf methods; torch runs AT (and TRADES if a TRADES method is listed)",
    )
    parser.add_argument("--tf_variants", type=_csv(TF_VARIANTS), default=["fused"])
    parser.add_argument(
        "--torch_variants",
        type=_csv(TORCH_VARIANTS),
        default=["fp32"],
        help="PyTorch steps: fp32, and bf16 (the attack's and the training forwards under "
        "torch.autocast('cpu', dtype=torch.bfloat16)); twins_tf's bf16_attack is compared "
        "with torch bf16, every other twins_tf variant with torch fp32",
    )
    parser.add_argument("--tf_path", help="import twins_tf from this checkout (variant 'base')")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument(
        "--upsample", type=int, default=1, help="nearest-neighbour factor inside both models"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pgd_steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps per process after one untimed step"
    )
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument(
        "--omp_wait_policy",
        choices=["PASSIVE", "ACTIVE", "unset"],
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the workers (PyTorch's OpenMP threads; "
        "TensorFlow's pools ignore it); see the module docstring",
    )
    parser.add_argument(
        "--timm_python",
        default=os.environ.get("TWINS_TF_TIMM_PYTHON")
        or os.path.join(ROOT, ".venv-timm", "bin", "python"),
        help="Python of the timm environment, for the torch side of " + ", ".join(TIMM_MODELS),
    )
    parser.add_argument("--timeout", type=float, default=1800)
    machine.add_allow_load_flag(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even: twin methods split it into two halves")
    if args.rounds < 1 or args.repeats < 1 or args.pgd_steps < 0 or args.threads < 1:
        parser.error("--rounds, --repeats, --threads must be >= 1 and --pgd_steps >= 0")
    if "base" in args.tf_variants and not args.tf_path:
        parser.error("variant 'base' needs --tf_path (a checkout of the code to compare with)")
    if args.upsample < 1:
        parser.error("--upsample must be >= 1")
    timm_archs = [arch for arch in args.archs if arch in TIMM_MODELS]
    if timm_archs and not args.one and not os.path.exists(args.timm_python):
        parser.error(
            f"no timm environment at {args.timm_python} (the PyTorch side of "
            f"{', '.join(timm_archs)}): `make test` creates it from tests/timm_requirements.txt, "
            "or name its python with --timm_python or TWINS_TF_TIMM_PYTHON."
        )
    return args


# --- inside a worker process -----------------------------------------------------------------
def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _resident_mib():
    """{"anon": MiB, "file": MiB} resident now: anonymous memory (tensors, heaps) and pages of
    mapped files (shared libraries: clean, shared between processes, reclaimable)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.split()[0] if value.split() else "0"
    return {
        "anon": int(fields.get("RssAnon", 0)) / 1024,
        "file": int(fields.get("RssFile", 0)) / 1024,
    }


def _parameters_mib(counts):
    return 4 * sum(counts) / 2**20  # float32


def _data(batch, size, num_classes):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, num_classes, batch).astype(np.int32)
    return x, y


def _time(step, repeats):
    """(first call s, wall s of each later call, CPU s of the process during each)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return first, times, cpu


def run_torch(config):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_resnet import TorchPixelResNet, TorchResNet

    arch, num_classes, upsample = config["arch"], config["num_classes"], config["upsample"]
    version = f"torch {torch.__version__}"
    if arch in TIMM_MODELS:
        import timm  # the timm environment's Python runs this worker (see _launch)

        version += f", timm {timm.__version__}"
    memory = dict(imported=_peak_rss_mib())
    torch.set_num_threads(config["threads"])
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    if arch in TIMM_MODELS:
        name, takes_img_size = TIMM_MODELS[arch]
        kwargs = {"img_size": config["image_size"] * upsample} if takes_img_size else {}
        network = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        network = TorchResNet(arch, num_classes)
    net = TorchPixelResNet(network, upsample=upsample)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    memory["parameters_mib"] = _parameters_mib(p.numel() for p in net.parameters())
    x_np, y_np = _data(config["batch"], config["image_size"], config["num_classes"])
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(y_np).long()
    eps, alpha, k = EPSILON, STEP_SIZE, config["pgd_steps"]
    if config["variant"] not in TORCH_VARIANTS:
        raise ValueError(f"torch variant {config['variant']!r}: choose from {TORCH_VARIANTS}")
    bf16 = config["variant"] == "bf16"
    logits_dtypes = {}  # the dtype the network's forwards computed in, for the report

    def forward(inputs, phase):
        """The network's forward as a PyTorch user writes it: under bfloat16 autocast for the
        bf16 variant, the logits cast back to float32 so that the loss, outside autocast, is
        float32 as autocast would make it anyway."""
        if not bf16:
            logits = net(inputs)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(inputs)
        logits_dtypes[phase] = str(logits.dtype).replace("torch.", "")
        return logits.float()

    def pgd():
        net.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
        for _ in range(k):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(forward(x_adv, "attack"), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps)
            x_adv = x_adv.clamp(0.0, 1.0)
        return x_adv.detach()

    memory["model"] = _peak_rss_mib()
    pgd()
    memory["attack"] = _peak_rss_mib()

    def step():
        x_adv = pgd()
        net.train()
        if config["method"] == "at":
            loss = F.cross_entropy(forward(x_adv, "train"), y)
        else:
            logits_adv = forward(x_adv, "train")
            logits_nat = forward(x, "train")
            kl = (
                F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="sum")
                / x.shape[0]
            )
            loss = F.cross_entropy(logits_nat, y) + BETA * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    first, times, cpu = _time(step, config["repeats"])
    memory["step"] = _peak_rss_mib()
    memory["resident_at_end"] = _resident_mib()
    return dict(
        first_s=first,
        step_times=times,
        cpu_times=cpu,
        version=version,
        memory=memory,
        compute_dtypes=logits_dtypes,
    )


def tf_trainer(config):
    """The twins_tf side of a comparison, built in this process: {"step": one training step
    (returns the loss, after the step has run), "trainer", "model", "attack", "x", "y",
    "memory": the peak RSS after import and after building}.  Also used by profile_step.py."""
    variant = config["variant"]
    if variant == "base":
        sys.path.insert(0, config["tf_path"])
    else:
        sys.path.insert(0, ROOT)
    import twins_tf  # noqa: F401  first: its oneDNN setting needs TensorFlow not yet imported

    # isort: split
    import keras
    import tensorflow as tf

    threads = config["threads"]
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads if variant == "inter2" else 1)

    from twins_tf import methods as methods_lib
    from twins_tf.attacks import PGD
    from twins_tf.trainer import AdversarialTrainer

    try:
        from twins_tf.models import build_model
    except ImportError:  # a --tf_path checkout older than the registry builds ResNets only
        from twins_tf.models import build_resnet as build_model

    memory = dict(imported=_peak_rss_mib())
    keras.utils.set_random_seed(0)
    if variant in ("bf16", "bf16_attack"):
        keras.mixed_precision.set_global_policy("mixed_bfloat16")  # before building the model
    method = methods_lib.get(config["method"])
    size = config["image_size"]
    model = build_model(
        config["arch"],
        config["num_classes"],
        twin=method.twin,
        input_shape=(size, size, 3),
        upsample=config.get("upsample", 1),
    )
    # The library's PGD attacks in float32 under any policy; bf16_attack lets it run in the
    # model's policy, as PyTorch's autocast runs the torch side's attack in bfloat16.
    attack_dtype = {"compute_dtype": None} if variant == "bf16_attack" else {}
    attack = PGD(EPSILON, STEP_SIZE, config["pgd_steps"], random_start=True, seed=0, **attack_dtype)
    trainer_class = AdversarialTrainer
    if variant == "fold":
        from twins_tf.models import fold_batch_norm

        folded = fold_batch_norm(model)

        class FoldedAttackTrainer(AdversarialTrainer):
            """The call-site change measured here: the attack runs on the folded network."""

            def _run_attack(self, attack, images, labels, seed):
                return attack(folded, images, labels, seed=seed)

        trainer_class = FoldedAttackTrainer
    trainer = trainer_class(
        model, method=method.name, attack=attack, beta=BETA, weight_decay=WEIGHT_DECAY
    )
    trainer.compile(
        keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM), jit_compile=variant == "xla"
    )
    trainer.make_train_function()
    x, y = (tf.constant(a) for a in _data(config["batch"], size, config["num_classes"]))
    memory["parameters_mib"] = _parameters_mib(int(tf.size(v)) for v in model.trainable_variables)
    memory["model"] = _peak_rss_mib()

    def step():
        logs = trainer.train_function(iter([(x, y)]))
        return float(logs["loss"])  # blocks until the step has run

    return dict(step=step, trainer=trainer, model=model, attack=attack, x=x, y=y, memory=memory)


def run_tf(config):
    built = tf_trainer(config)  # first: it puts the checkout to import on sys.path
    import tensorflow as tf

    import twins_tf

    trainer, model, attack, x, y, memory = (
        built[k] for k in ("trainer", "model", "attack", "x", "y", "memory")
    )
    # The attack alone, traced and run once as the step runs it (its own tf.function: the
    # step's graph is traced afterwards, so what the step adds on top shows separately).
    attack_alone = tf.function(lambda: trainer._run_attack(attack, x, y, None))
    attack_alone()
    memory["attack"] = _peak_rss_mib()
    graph = attack_alone.get_concrete_function().graph.as_graph_def()
    first, times, cpu = _time(built["step"], config["repeats"])
    memory["step"] = _peak_rss_mib()
    memory["resident_at_end"] = _resident_mib()
    return dict(
        first_s=first,
        step_times=times,
        cpu_times=cpu,
        version=f"TF {tf.__version__}",
        twins_tf_file=twins_tf.__file__,
        memory=memory,
        compute_dtypes={"attack": _matmul_dtypes(graph), "train": model.dtype_policy.compute_dtype},
    )


def _matmul_dtypes(graph_def):
    """The dtypes the convolutions and matrix products of a traced graph compute in (the
    while loop's body is a function of the graph's library), joined by "+": what the attack
    really ran in, whatever the policy and the attack's compute_dtype say."""
    import tensorflow as tf

    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    kinds = ("Conv2D", "MatMul", "BatchMatMul")
    dtypes = {
        tf.dtypes.as_dtype(node.attr["T"].type).name
        for node in nodes
        if any(kind in node.op for kind in kinds) and "T" in node.attr
    }
    return "+".join(sorted(dtypes))


def run_one(config_json):
    config = json.loads(config_json)
    runner = run_torch if config["framework"] == "torch" else run_tf
    result = dict(config, **runner(config), peak_rss_mib=_peak_rss_mib())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------
def _configs(args, batch_norm):
    """Every configuration, in order; twin methods only for archs with BatchNormalization."""
    common = dict(
        omp_wait_policy=args.omp_wait_policy,
        timm_python=args.timm_python,
        image_size=args.image_size,
        upsample=args.upsample,
        batch=args.batch,
        pgd_steps=args.pgd_steps,
        threads=args.threads,
        repeats=args.repeats,
        num_classes=args.num_classes,
        tf_path=os.path.abspath(args.tf_path) if args.tf_path else None,
    )
    torch_methods = ["at"] + (["trades"] if any("trades" in m for m in args.methods) else [])
    configs = []
    for arch in args.archs:
        for variant in args.torch_variants:
            for method in torch_methods:
                configs.append(
                    dict(common, framework="torch", arch=arch, method=method, variant=variant)
                )
        for variant in args.tf_variants:
            for method in args.methods:
                if method.startswith("twins_") and not batch_norm[arch]:
                    continue
                configs.append(
                    dict(common, framework="tf", arch=arch, method=method, variant=variant)
                )
    return configs


def _launch(config, timeout):
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]), CUDA_VISIBLE_DEVICES="")
    env.update(VARIANT_ENV.get(config["variant"], {}))
    if config["omp_wait_policy"] != "unset":
        env["OMP_WAIT_POLICY"] = config["omp_wait_policy"]
    python = sys.executable
    if config["framework"] == "torch" and config["arch"] in TIMM_MODELS:
        python = config["timm_python"]  # its own site-packages, not this environment's paths
        env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
    command = [python, os.path.abspath(__file__), "--one", json.dumps(config)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timed out after {timeout:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(config, error=f"exit {done.returncode}: {tail}")


def _key(config):
    return config["arch"], config["framework"], config["method"], config["variant"]


def _label(key):
    arch, framework, method, variant = key
    return f"{arch} | {'torch' if framework == 'torch' else 'twins_tf'} | {method} | {variant}"


def _torch_method(method):
    """The torch step a twins_tf method is compared with: TRADES for the TRADES methods."""
    return "trades" if "trades" in method else "at"


def _torch_counterpart(variant, torch_variants):
    """The torch variant a twins_tf variant is compared with (TORCH_COUNTERPART), fp32 when
    that one was not run (the summary line names the one used)."""
    wanted = TORCH_COUNTERPART.get(variant, "fp32")
    return wanted if wanted in torch_variants else "fp32"


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return run_one(args.one)
    batch_norm = arch_batch_norm(args.archs, args.tf_path or ROOT)
    for arch in args.archs:
        twin = [m for m in args.methods if m.startswith("twins_")]
        if twin and not batch_norm[arch]:
            print(f"{arch} has no BatchNormalization: {', '.join(twin)} skipped for it")
    configs = _configs(args, batch_norm)
    wall = time.perf_counter()
    run = machine.Run(allow_load=args.allow_load)
    print(run.machine_line(), flush=True)
    print(f"{len(configs)} configurations x {args.rounds} rounds, one process each", flush=True)
    results = {}
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            result = _launch(config, args.timeout)
            key = _key(config)
            results.setdefault(key, []).append(result)
            if "error" in result:
                print(f"  round {round_index + 1} {_label(key)}: {result['error']}", flush=True)
            else:
                print(
                    f"  round {round_index + 1} {_label(key)}: "
                    f"{1000 * statistics.median(result['step_times']):.0f} ms/step "
                    f"(first {result['first_s']:.1f} s, peak RSS "
                    f"{result['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
    run.finish()
    summaries = print_tables(args, configs, results, run, time.perf_counter() - wall)
    print()
    for line in summary_lines(args, summaries, run):
        print(line)


def _summary(runs):
    medians = [statistics.median(r["step_times"]) for r in runs if "error" not in r]
    if not medians:
        return None
    cpu = [statistics.median(r["cpu_times"]) for r in runs if "error" not in r]
    return dict(
        median=statistics.median(medians),
        low=min(medians),
        high=max(medians),
        cpu=statistics.median(cpu),
        rss=max(r["peak_rss_mib"] for r in runs if "error" not in r),
        n=len(medians),
        version=next(r["version"] for r in runs if "error" not in r),
        compute_dtypes=next(r.get("compute_dtypes") for r in runs if "error" not in r),
    )


def print_tables(args, configs, results, run, wall):
    """The step-time table and the memory table; returns {key: _summary} for the summaries."""
    upsampled = f" upsampled x{args.upsample} inside" if args.upsample > 1 else ""
    print()
    print(
        f"Setting: {args.image_size} px{upsampled}, batch {args.batch}, PGD-{args.pgd_steps} "
        f"(eps 8/255, alpha 2/255, random start), {args.num_classes} classes, "
        "SGD(0.003, m 0.9, wd 1e-5), "
        f"{args.threads} threads per process, {args.rounds} interleaved rounds x "
        f"{args.repeats} steps; load average {run.load_start:.2f} at start, "
        f"{run.load_end:.2f} at end; wall {wall / 60:.1f} min{run.table_label()}"
    )
    print(f"CPU: {run.cpu}")
    print(
        "Ratios against torch: a twins_tf row against torch's step in the same precision "
        "(bf16_attack against torch bf16 when it ran, every other variant against torch "
        "fp32); a torch row against torch fp32."
    )
    print()
    print(
        "| arch | framework | method | variant | ms/step median | spread (min-max of rounds) "
        "| / torch AT | / torch same method | CPU ms/step | CPU / torch AT | peak RSS MiB "
        "| RSS / torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summaries = {key: _summary(runs) for key, runs in results.items()}
    for config in configs:
        key = _key(config)
        s = summaries.get(key)
        if s is None:
            print(f"| {_label(key)} | failed | | | | | | | |")
            continue
        arch, framework, method, variant = key
        torch_variant = (
            "fp32" if framework == "torch" else _torch_counterpart(variant, args.torch_variants)
        )
        torch_at = summaries.get((arch, "torch", "at", torch_variant))
        torch_same = summaries.get((arch, "torch", _torch_method(method), torch_variant))
        ratio_at = f"{s['median'] / torch_at['median']:.2f}" if torch_at else ""
        ratio_same = f"{s['median'] / torch_same['median']:.2f}" if torch_same else ""
        rss_ratio = f"{s['rss'] / torch_same['rss']:.2f}" if torch_same else ""
        cpu_ratio = f"{s['cpu'] / torch_at['cpu']:.2f}" if torch_at else ""
        print(
            f"| {_label(key)} | {1000 * s['median']:.0f} | {1000 * s['low']:.0f}-"
            f"{1000 * s['high']:.0f} | {ratio_at} | {ratio_same} | {1000 * s['cpu']:.0f} | "
            f"{cpu_ratio} | {s['rss']:.0f} | {rss_ratio} |"
        )
    print_memory(configs, results)
    versions, dtypes = {}, {}
    for (arch, framework, _, variant), s in summaries.items():
        if s:
            name = f"{arch} torch" if framework == "torch" else "twins_tf"
            versions[name] = s["version"]
            if s["compute_dtypes"]:
                attack, train = s["compute_dtypes"]["attack"], s["compute_dtypes"]["train"]
                dtypes[f"{arch} {framework} {variant}"] = f"attack {attack}, training {train}"
    print("versions: " + "; ".join(f"{name}: {v}" for name, v in sorted(versions.items())))
    if dtypes:
        print(
            "computed in (twins_tf: the attack's convolutions and matrix products as traced, "
            "the training policy; torch: the logits' dtype): "
            + "; ".join(f"{name}: {d}" for name, d in sorted(dtypes.items()))
        )
    return summaries


def summary_lines(args, summaries, run):
    """One SUMMARY line per comparison of the run (machine.Run.summary), in this order: each
    twins_tf row against its torch counterpart (same method family and precision), each
    twins_tf variant against fused, twins_at/at and twins_trades/trades within a variant, and
    torch bf16 against torch fp32."""

    def ms(key):
        s = summaries.get(key)
        return None if s is None else 1000 * s["median"]

    def line(comparison, first, second):
        return run.summary(comparison, first, second, unit="ms", per="per step")

    torch_methods = sorted({m for (_, f, m, _) in summaries if f == "torch"})
    lines = []
    for arch in args.archs:
        for variant in args.tf_variants:
            torch_variant = _torch_counterpart(variant, args.torch_variants)
            for method in args.methods:
                key = (arch, "tf", method, variant)
                if key not in summaries:
                    continue
                torch_method = _torch_method(method)
                lines.append(
                    line(
                        f"{arch} {method} {variant} vs torch {torch_method} {torch_variant}",
                        machine.Side("twins_tf", ms(key)),
                        machine.Side("torch", ms((arch, "torch", torch_method, torch_variant))),
                    )
                )
        for variant in args.tf_variants:
            if variant == "fused":
                continue
            for method in args.methods:
                key, fused = (arch, "tf", method, variant), (arch, "tf", method, "fused")
                if key in summaries and fused in summaries:
                    lines.append(
                        line(
                            f"{arch} twins_tf {method} {variant} vs fused",
                            machine.Side(f"twins_tf {variant}", ms(key)),
                            machine.Side("twins_tf fused", ms(fused)),
                        )
                    )
        for variant in args.tf_variants:
            for twin, plain in (("twins_at", "at"), ("twins_trades", "trades")):
                pair = [(arch, "tf", m, variant) for m in (twin, plain)]
                if all(key in summaries for key in pair):
                    lines.append(
                        line(
                            f"{arch} twins_tf {twin} vs {plain} ({variant})",
                            machine.Side(twin, ms(pair[0])),
                            machine.Side(plain, ms(pair[1])),
                        )
                    )
        if "bf16" in args.torch_variants and "fp32" in args.torch_variants:
            for method in torch_methods:
                lines.append(
                    line(
                        f"{arch} torch {method} bf16 vs fp32",
                        machine.Side("torch bf16", ms((arch, "torch", method, "bf16"))),
                        machine.Side("torch fp32", ms((arch, "torch", method, "fp32"))),
                    )
                )
    return lines


def print_memory(configs, results):
    """Where each worker's peak RSS comes from: the process's peak after import, after the
    model, trainer and optimizer are built, after the attack alone ran once, after the steps.
    Each column is what that stage added to the peak (MiB); the parameters' float32 size is
    computed, for scale (SGD's momentum slots are as large again; PyTorch creates them in its
    first step, Keras when the train function first runs)."""
    print()
    print(
        "Peak RSS by stage (MiB; each stage's increase of the process's peak, from the last round):"
    )
    print()
    print(
        "| arch | framework | method | variant | runtime after import | + model, trainer "
        "| parameters (computed) | + attack alone | + training step | peak | resident at end: "
        "anonymous / mapped files |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config in configs:
        key = _key(config)
        runs = [r for r in results.get(key, []) if "error" not in r and "memory" in r]
        if not runs:
            continue
        m = runs[-1]["memory"]
        print(
            f"| {_label(key)} | {m['imported']:.0f} | {m['model'] - m['imported']:.0f} | "
            f"{m['parameters_mib']:.0f} | {m['attack'] - m['model']:.0f} | "
            f"{m['step'] - m['attack']:.0f} | {m['step']:.0f} | "
            f"{m['resident_at_end']['anon']:.0f} / {m['resident_at_end']['file']:.0f} |"
        )


if __name__ == "__main__":
    main()
