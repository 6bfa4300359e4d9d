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

The names below are imported on first use, so `from twins_tf.training import flags` (what
`evaluate` needs) does not build a trainer.
"""
import importlib

_EXPORTS = {
    "Settings": "twins_tf.training.settings",
    "SetupError": "twins_tf.training.settings",
    "define_flags": "twins_tf.training.flags",
    "define_data_flags": "twins_tf.training.flags",
    "settings_from_flags": "twins_tf.training.flags",
    "settings_from_args": "twins_tf.training.flags",
    "read_settings": "twins_tf.training.model_dir",
    "learning_rate_schedule": "twins_tf.training.schedule",
    "build_model": "twins_tf.training.model",
    "make_trainer": "twins_tf.training.trainer_setup",
    "pipelines": "twins_tf.training.trainer_setup",
    "PreparedRun": "twins_tf.training.loop",
    "prepare": "twins_tf.training.loop",
    "fit": "twins_tf.training.loop",
    "run": "twins_tf.training.loop",
    "seed_everything": "twins_tf.training.loop",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'twins_tf.training' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
