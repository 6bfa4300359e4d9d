"""The library side of `train`, `pretrain`, `compare` and the demo: one run from settings to files.

The binaries parse flags and call these modules (Model Garden's thin binaries); a library user
imports them directly. Submodules, in the order the data flows through a run:

    flags       absl flag definitions (the data flags shared with `evaluate`) -> settings
    settings    `Settings`: the typed, frozen, checked settings of a run; config.json I/O
    model_dir   the files a run keeps in --model_dir and whether a run may use it
    backup      BackupAndRestore's state: the epoch a restart resumes from, repairing a kill
    schedule    the learning-rate schedule
    model       `build_model`: the run's classifier (synchronized BN policy, --pretrained)
    setup       `make_trainer` (the compiled AdversarialTrainer) and the `pipelines`
    loop        `prepare` / `fit` / `run` and `seed_everything`

Submodules are imported on first use, so `from twins_tf.training import flags` (what
`evaluate` needs) does not build a trainer.
"""
