"""The library side of `train`, `pretrain`, `compare` and the demo: one run from settings to files.

The binaries parse flags and call these modules (Model Garden's thin binaries); a library user
imports them directly.  Submodules, in the order the data flows through a run:

    flags          absl flag definitions (the data flags shared with `evaluate`) -> a dict
    settings       `Settings`: the typed, frozen, checked settings of a run
    model_dir      the files a run keeps in --model_dir, config.json I/O, may a run use it
    backup         BackupAndRestore's state: the epoch a restart resumes from, kill repair
    schedule       the learning-rate schedule
    model          `build_model`: the run's classifier (synchronized-BN policy, --pretrained)
    trainer_setup  `make_trainer` (the compiled AdversarialTrainer) and the `pipelines`
    loop           `prepare` / `fit` / `run` and `seed_everything`

    >>> from twins_tf import training
    >>> s = training.Settings(binary="pretrain", dataset="digits_0_4", model_dir="runs/x")
    >>> summary = training.run(s)

The names below are its public surface; each submodule keeps heavy imports (Keras models,
PyTorch) inside the functions that need them.
"""

from twins_tf.training.flags import (
    define_data_flags,
    define_flags,
    settings_from_args,
    settings_from_flags,
)
from twins_tf.training.loop import PreparedRun, fit, prepare, run, seed_everything
from twins_tf.training.model import build_model
from twins_tf.training.model_dir import read_settings
from twins_tf.training.schedule import learning_rate_schedule
from twins_tf.training.settings import Settings, SetupError
from twins_tf.training.trainer_setup import make_trainer, pipelines

__all__ = [
    "PreparedRun",
    "Settings",
    "SetupError",
    "build_model",
    "define_data_flags",
    "define_flags",
    "fit",
    "learning_rate_schedule",
    "make_trainer",
    "pipelines",
    "prepare",
    "read_settings",
    "run",
    "seed_everything",
    "settings_from_args",
    "settings_from_flags",
]
