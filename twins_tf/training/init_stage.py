"""`--init`: the head's initialisation, a linear probe on the frozen backbone before `--method`.

`--init=random` (the default) starts `--method` from the fresh head, as runs always did.
`--init=robust_linear_probe` is RoLI (Hua et al., "Initialization Matters for Adversarial
Transfer Learning", CVPR 2024): adversarial linear probing of the fresh head on the frozen
robust backbone, then the chosen method from that head; `--init=linear_probe` is the natural
LP-FT variant (Kumar et al., ICLR 2022).  The probe is an ordinary run of its own in
`<model_dir>/init/` (config.json, best/last weights, metrics.csv, TensorBoard logs, backup), so
it resumes when killed, `load_run`, `evaluate` and `export` accept it, and a finished one is
reused when the main run restarts.  Its settings are the main run's with:

    method        at (PGD-AT with the run's attack: --attack_eps/step/steps, random start,
                  validation PGD without) for robust_linear_probe; clean for linear_probe
    epochs, lr    --init_epochs, --init_lr: SGD (momentum 0.9), cosine decay to 0 per step
    weight_decay  --init_weight_decay (coupled, on the head: the only trainable variables)
    stage         "init": `make_trainer` freezes every layer but the head (`freeze_backbone`),
                  so only the head's kernel and bias train and every BatchNormalization runs
                  in inference mode (moving statistics, not updated) in the attack and in the
                  training forward alike.

The main run then starts from the source backbone (`--pretrained`) plus the probe's best head
(`best.weights.h5`: best validation PGD accuracy, the final epoch with --validation=none), as
RoLI fine-tunes from its probe's `best_model.pth`.  The probe is always a plain-BN network; a
twin method's model is built twin from the source as without --init (both wings' BN from the
source's) and gets the probe's head, so a twin run is "twinify after the probe".

Where the defaults come from (the official code, github.com/DongXzz/RoLI): the probing stage is
`configs/base-linear-adv.yaml` + `configs/linear/<dataset>_ranli.yaml` with `TRAIN_MODE: adv`:
cross-entropy on PGD examples (`src/adv_func.py`: L-inf, random start, step 2/255, 7 steps,
eps 8/255, the model in eval mode while attacking) through the frozen backbone, SGD momentum
0.9, batch 64, a cosine schedule, selection by validation PGD accuracy.  Per dataset it uses
lr 0.05 / wd 0.01 / 20 epochs (CIFAR-10), lr 0.1 / wd 0.001 / 20 epochs (CIFAR-100), lr 1.0 /
wd 0.01 / 40 (Stanford Dogs), lr 0.5 / wd 0.01 / 40 (Caltech-256), lr 1.0 / wd 0.001 / 60
(CUB); our defaults are the CIFAR-100 recipe.  RoLI's
backbones are ViT/Swin (no BatchNorm); a ResNet's BN is frozen here in inference mode, which
is what "frozen backbone" means for it.  Deviations, kept for the engine's one training step:
our probe uses the run's attack settings (default 10 PGD steps, RoLI trains with 7) and the
engine's PGD, which returns the last iterate (RoLI's `adv_generator` keeps each example's
highest-loss iterate, `use_best=True`); the
cosine is stepped per iteration without RoLI's linear warm-up (its base config warms up for
10 of 20 epochs from 0); the coupled weight decay also decays the head's bias (RoLI exempts
`last_layer.bias`).  The probe is `AdversarialTrainer` with method at/clean on a model whose
backbone layers are `trainable = False` rather than a features-then-logistic-regression
solver, because the robust probe needs PGD through the whole network at every step.
"""

import os

from twins_tf.training.settings import INIT_METHODS, as_settings

INIT_DIR = "init"


def init_settings(settings):
    """The settings of the init stage's sub-run of a main run with `--init` != random."""
    s = as_settings(settings)
    if s.init not in INIT_METHODS:
        raise ValueError(f"--init={s.init} has no probing stage.")
    # lora_rank=0: the probe trains the head of the plain network (an AutoLoRa main run's
    # branches start at B = 0, so its natural path equals that network until trained)
    return s.replace(
        stage="init",
        method=INIT_METHODS[s.init],
        epochs=s.init_epochs,
        lr=s.init_lr,
        lr_decay_epochs=(),
        weight_decay=s.init_weight_decay,
        lora_rank=0,
        model_dir=os.path.join(s.model_dir, INIT_DIR),
    )


def freeze_backbone(model):
    """Makes every layer of `model` but its head non-trainable (in place).

    A non-trainable Keras BatchNormalization normalises with its moving statistics and does
    not update them even when called with training=True: the frozen backbone's BN is in
    inference mode, and `model.trainable_variables` are the head's kernel and bias.
    """
    from twins_tf.models.heads import head_layer

    head = head_layer(model)
    for layer in model.layers:
        layer.trainable = layer is head
    return model


def check(settings):
    """Refuses (SetupError) an `<model_dir>/init` holding a probe with other settings, before
    anything is written; returns its state ("new", "resume" or "finished") or None for
    --init=random."""
    from twins_tf.training import model_dir as model_dir_lib

    s = as_settings(settings)
    if s.init not in INIT_METHODS or s.stage != "main":
        return None
    sub = init_settings(s)
    return model_dir_lib.check_model_dir(sub.model_dir, sub)


def load_head(model, init_dir, *, strategy=None):
    """Sets `model`'s head to the best head of the finished init stage in `init_dir` (the
    backbone of `model`, the source's, is left as it is)."""
    import contextlib

    from twins_tf.models.heads import head_layer
    from twins_tf.training import runs

    probe = runs.load_run(init_dir, "best")
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        head_layer(model).set_weights(head_layer(probe).get_weights())
