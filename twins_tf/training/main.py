"""The absl `main` of the two run binaries, `train` and `pretrain`, which differ only in defaults.

Both binaries are this module with their binary name: flags defined on the global FLAGS
(`training.flags`), then one call of `training.loop.run`, with one-line errors on bad input.
"""

import sys

from absl import app, flags

from twins_tf.training import loop
from twins_tf.training.flags import define_flags, settings_from_flags
from twins_tf.training.settings import SetupError


def main_for(binary):
    """The absl `main` of `binary`: run with the global flags, one-line errors on bad input."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        from twins_tf.training.run_callbacks import DivergenceError

        try:
            loop.run(settings_from_flags(flags.FLAGS, binary))
        except (SetupError, DivergenceError) as error:
            sys.exit(f"{binary}: error: {error}")

    return main


def define_main_flags(binary):
    """Defines `binary`'s flags on the global FLAGS and makes them its key flags (`--help`)."""
    for name in define_flags(flags.FLAGS, binary):
        # absl names the main module after sys.argv[0]; key flags of it are what --help lists
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
