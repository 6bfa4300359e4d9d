r"""`python -m twins_tf.pretrain`: adversarial training from scratch (PGD-AT) of a source model.

    python -m twins_tf.pretrain --dataset=cifar100 --arch=resnet18 --model_dir=runs/source
    python -m twins_tf.train --dataset=cifar10 --arch=resnet18 \
        --pretrained=runs/source/best.weights.h5 --model_dir=runs/target

How to make your own robust source model when no robust checkpoint of the architecture or
domain you need exists (and what the embedded demo does).  It is `python -m twins_tf.train`
with plain BatchNorm, no `--pretrained`, and from-scratch defaults: method `at` (also `trades`,
or `clean` for a non-robust baseline), arch resnet18, 100 epochs, lr 0.1 decayed x0.1 at
epochs 50 and 75, weight decay 5e-4, L-inf PGD-10 at 8/255 with step 2/255 (`--attack_norm=l2`
with an L2 `--attack_eps` and `--attack_step` trains against L2 PGD instead).  Every flag of
`train` but `--pretrained`, `--allow_random_init`, `--lambda_twins` and `--l2sp_alpha`
applies, with the same model_dir contract, resumption, extension by a higher `--epochs`,
`--validation` protocols and divergence check (see twins_tf.train and twins_tf.training).

`model_dir/best.weights.h5` (best validation PGD accuracy) and `last.weights.h5` are
`model.save_weights` files of a `build_model` model, which `train --pretrained` (through
`twins_tf.weights.load_pretrained`) loads into a twin or plain model with a fresh head.  This
file makes the one call `twins_tf.training.loop.run(settings)` with pretrain's settings
(`training.flags.settings_from_args("pretrain", args)` for library code).
"""

from absl import app

from twins_tf.training.main import define_main_flags, main_for
from twins_tf.training.settings import PRETRAIN

if __name__ == "__main__":
    define_main_flags(PRETRAIN)
    app.run(main_for(PRETRAIN))
