"""AutoAttack with budgets small enough for tests, in-process and in `evaluate` subprocesses.

`python tests/quick_autoattack.py <evaluate flags>` is `python -m twins_tf.evaluate` with
`QuickAutoAttack` in place of `twins_tf.attacks.AutoAttack`: the real orchestrator and
sub-attacks, a few steps and queries each, so a multi-worker evaluation takes seconds.
"""

import sys

from absl import app, flags

from twins_tf.attacks import autoattack

BUDGET = dict(apgd_steps=5, fab_steps=5, square_queries=20)


class QuickAutoAttack(autoattack.AutoAttack):
    def __init__(self, epsilon, **kwargs):
        super().__init__(epsilon, **BUDGET, **kwargs)


def install():
    """Puts `QuickAutoAttack` where evaluation looks AutoAttack up (monkeypatch-free)."""
    autoattack.AutoAttack = QuickAutoAttack


if __name__ == "__main__":
    from twins_tf import evaluate
    from twins_tf.evaluation.flags import define_flags

    install()
    for _name in define_flags(flags.FLAGS):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[_name])
    app.run(evaluate.main)
