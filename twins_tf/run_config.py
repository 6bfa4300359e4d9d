"""The old home of the run binaries' flags, settings and model_dir contract; their names stay.

The three jobs it held now live in `twins_tf.training`, one module each:
  * `training.flags`: the flag definitions (`define_flags`, `define_data_flags`, fractions);
  * `training.settings`: `Settings`, the typed, frozen, checked settings (the `check_settings`
    rules), and the constants that describe them;
  * `training.model_dir` and `training.backup`: the files of a run, whether a model_dir may be
    used, and the repair of a backup a kill cut short.
Every name this module had is still here.  `check_settings` returns the settings dict
config.json stores (`Settings.from_dict(settings).to_dict()`), as it did; `read_config` the
JSON dict of config.json (`training.model_dir.read_settings` gives the typed `Settings`).
"""

from twins_tf.training.backup import (  # noqa: F401
    BACKUP_DIR,
    BACKUP_METADATA,
    BACKUP_WEIGHTS,
    PREVIOUS_SUFFIX,
    repair_backup,
    resume_epoch,
)
from twins_tf.training.flags import (  # noqa: F401
    DATA_FLAGS,
    define_data_flags,
    define_flags,
    define_fraction,
    settings_from_args,
    settings_from_flags,
)
from twins_tf.training.model_dir import (  # noqa: F401
    BEST_RECORD,
    BEST_WEIGHTS,
    CONFIG_FILE,
    FINAL_EPOCH_SELECTION,
    LAST_WEIGHTS,
    METRICS_FILE,
    RUN_ARTEFACTS,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    check_model_dir,
    differing_keys,
    read_config,
    read_settings,
    write_config,
    write_json,
)
from twins_tf.training.settings import (  # noqa: F401
    ADDED_SETTINGS,
    BINARIES,
    EXECUTION_KEYS,
    JIT_CHOICES,
    LOCATION_KEYS,
    MIXED_PRECISION,
    PATH_KEYS,
    PRETRAIN,
    PRETRAIN_METHODS,
    STRATEGIES,
    TRAIN,
    UNCOMPARED_KEYS,
    Settings,
    SetupError,
    jit_compile_value,
)
from twins_tf.training.settings import ADDED_SETTINGS as _ADDED_SETTINGS  # noqa: F401
from twins_tf.training.settings import DEFAULTS as _DEFAULTS  # noqa: F401


def check_settings(settings):
    """Checks every value of a settings dict; resolves dataset defaults.

    Returns:
      A new settings dict with `lr_decay_epochs` as ints, the image size and upsampling of the
      dataset filled in, and `twin` (whether the method trains a twin model): the dict
      `Settings.from_dict(settings).to_dict()`.

    Raises:
      SetupError: the first wrong value, with what to do about it.
    """
    return Settings.from_dict(settings).to_dict()
