"""absl flag definitions of the run binaries, and the data flags shared with `evaluate`.

`python -m twins_tf.train` and `python -m twins_tf.pretrain` take the same flag groups (data,
model, method, attack, optimisation, run/distribution); `pretrain` only differs in its
defaults, in its methods (plain-BN ones) and in having no `--pretrained`. `evaluate` takes
the data flags too (`define_data_flags`), so a dataset is named the same way everywhere.

The flags are defined on a `FlagValues` passed in, so tests can parse argument lists without
touching the global `absl.flags.FLAGS` (and `train` and `pretrain` can live in one process).
"""
import fractions

from absl import flags

from twins_tf import data as data_lib

# The flags `define_data_flags` defines, in order.
DATA_FLAGS = ("dataset", "data_dir", "tfds_data_dir", "image_size", "upsample",
              "train_per_class", "skip_bad_images")


class _FractionParser(flags.FloatParser):
    """A float flag that also takes fractions such as `8/255`."""

    def convert(self, argument):
        if isinstance(argument, str) and "/" in argument:
            try:
                return float(fractions.Fraction(argument.strip()))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"{argument!r} is neither a number nor a fraction like 8/255")
        return super().convert(argument)


def define_fraction(name, default, help_text, flag_values, module_name):
    """Defines a float flag that accepts `a/b` (used for the attack radius and step)."""
    flags.DEFINE(_FractionParser(), name, default, help_text, flag_values=flag_values,
                 serializer=flags.ArgumentSerializer(), module_name=module_name)


def define_data_flags(flag_values, module_name=None, *, from_run=False):
    """Defines the flags that say which data a model sees (`DATA_FLAGS`) on `flag_values`.

    One definition for every binary, so `--dataset=folder --data_dir=...` means the same in
    `train`, `pretrain`, `compare` and `evaluate`.

    Args:
      flag_values: the `absl.flags.FlagValues` to define them on.
      module_name: the absl module the flags are listed under by `--helpfull`.
      from_run: the binary can read a run's config.json (`evaluate --model_dir`): every
        default is then None, meaning "the run's value, else the dataset's" (so
        `--skip_bad_images` too is None, not False, unless given).

    Returns:
      The names of the defined flags, `DATA_FLAGS`.
    """
    run = "the run's, else " if from_run else ""

    def define(kind, name, default, help_text):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values,
                                         module_name=module_name)

    define("string", "dataset", None,
           "Registered dataset (twins_tf.data.DATASETS): " + ", ".join(sorted(data_lib.DATASETS))
           + (" (default: the run's; without --model_dir: required)." if from_run else "."))
    define("string", "data_dir", None,
           "Image folder of --dataset=folder (train/ and test/ of class folders) or caltech256"
           + (" (default: the run's)." if from_run else "."))
    define("string", "tfds_data_dir", None,
           f"tensorflow-datasets data_dir holding prepared tfds datasets (default: {run}"
           "$TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is ever downloaded.")
    define("integer", "image_size", None,
           f"Side of the images fed to the model (default: {run}the dataset's).")
    define("integer", "upsample", None,
           f"Nearest-neighbour upsampling inside the model (default: {run}the dataset's; "
           "CIFAR: 7).")
    define("integer", "train_per_class", None,
           "For a folder of class folders without train/ and test/: training images per class "
           f"(a seeded split, the rest is the test set; default: {run}caltech256's 60).")
    define("bool", "skip_bad_images", None if from_run else False,
           "Leave out folder images that are not whole JPEG/PNG/GIF/BMP files (their count is "
           "logged) instead of stopping before anything is written"
           + (" (default: the run's, else false)." if from_run else "."))
    return list(DATA_FLAGS)
