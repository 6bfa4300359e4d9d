r"""`python -m twins_tf.convert`: a robust PyTorch checkpoint to a Keras weights file.

    python -m twins_tf.convert --checkpoint=resnet50_linf_eps4.0.ckpt --arch=resnet50 \
        --output=robust_r50.weights.h5

reads the checkpoint safely (`torch.load(weights_only=True)`; `--allow_pickle` lifts that for
files you trust, since unpickling runs code), loads every tensor into
`twins_tf.models.build_model(arch, <head size>, twin=False)` and writes its `save_weights`
file, which `python -m twins_tf.train --pretrained=...` and `twins_tf.weights.load_pretrained`
read into twin or plain models with a fresh head.  The work is
`twins_tf.weights.convert_checkpoint`; this binary parses flags and prints what it read.
"""

import sys

from absl import app, flags

from twins_tf.models.registry import ARCHITECTURES

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "PyTorch (.ckpt/.pt/.pth), .safetensors or .npz file.")
flags.DEFINE_enum("arch", None, sorted(ARCHITECTURES), "Architecture of the checkpoint.")
flags.DEFINE_string("output", None, "Keras weights file to write (must end in .weights.h5).")
flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Let torch.load unpickle arbitrary objects. This RUNS CODE from the file: only for "
    "checkpoints from a source you trust.",
)
flags.DEFINE_integer(
    "num_classes",
    None,
    "Expected head size (an error if the checkpoint's differs); the head size to write for a "
    "checkpoint without a head (default 1000).",
)
flags.DEFINE_integer(
    "image_size",
    224,
    "Height and width of the images the network will see, after any --upsample of the run. "
    "Only a ViT depends on it: its position embeddings are resampled to that patch grid. "
    "ResNets and ConvNeXts fit any size.",
)
flags.mark_flags_as_required(["checkpoint", "arch", "output"])


def describe(summary):
    """The lines `main` prints about a conversion (see `weights.convert_checkpoint`)."""
    container = f", entry {summary['container']!r}" if summary.get("container") else ""
    lines = [f"format: {summary['format']}{container}"]
    layout = summary.get("arch") or "not a known layout"
    lines.append(f"arch in file: {layout} (from its keys)")
    if "epoch" in summary:
        lines.append(f"epoch: {summary['epoch']}")
    if "eps" in summary:
        eps = summary["eps"]
        eps = f"{eps:.6g}" if isinstance(eps, (int, float)) else eps
        lines.append(f"eps: {eps} (from the {summary['eps_source']})")
    if "normalizer_mean" in summary or "normalizer_std" in summary:
        mean = _rounded(summary.get("normalizer_mean"))
        std = _rounded(summary.get("normalizer_std"))
        lines.append(f"normaliser in file: mean {mean} std {std}")
    lines.append(
        f"tensors: {summary['tensors']} loaded, {summary['dropped_keys']} dropped "
        "(attacker duplicates, num_batches_tracked)"
    )
    head = "from the checkpoint" if summary["head_from_checkpoint"] else "fresh (no head in file)"
    lines.append(f"head: {summary['num_classes']} classes, {head}")
    return lines


def _rounded(values):
    return None if values is None else tuple(round(v, 4) for v in values)


def main(argv):
    del argv
    from twins_tf import weights

    try:
        summary = weights.convert_checkpoint(
            FLAGS.checkpoint,
            FLAGS.arch,
            FLAGS.output,
            allow_pickle=FLAGS.allow_pickle,
            num_classes=FLAGS.num_classes,
            image_size=FLAGS.image_size,
        )
    except (weights.CheckpointError, FileNotFoundError, ImportError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"read {FLAGS.checkpoint}")
    for line in describe(summary):
        print(f"  {line}")
    print(f"wrote {summary['output']} ({FLAGS.arch}, plain BN; load with --pretrained)")
    return 0


if __name__ == "__main__":
    app.run(main)
