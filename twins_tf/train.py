r"""`python -m twins_tf.train`: robust fine-tuning (TWINS-AT, TWINS-TRADES, AT, TRADES, L2-SP,
AutoLoRa).

    python -m twins_tf.train --flagfile=flags/stanford_dogs.flags \
        --pretrained=robust_r50.weights.h5 --model_dir=runs/dogs

Flag groups (`--helpfull` lists them by group):
  data          --dataset --data_dir --tfds_data_dir --image_size --upsample --train_per_class
                --max_train_examples --max_validation_examples --validation
  model         --arch --pretrained --allow_random_init
  method        --method --lambda_twins --beta --l2sp_alpha --lora_rank
  init          --init --init_epochs --init_lr --init_weight_decay (the head's start:
                random, or a linear probe of the frozen backbone first, `training.init_stage`)
  attack        --attack_norm (linf or l2) --attack_eps --attack_step --attack_steps
                (L-inf: fractions like 8/255 work; L2: plain numbers like 0.5 or 3.0)
  optimisation  --epochs --batch_size --lr --lr_decay_epochs --weight_decay
  run           --model_dir --seed --strategy --tpu_address --jit_compile --precision
                --deterministic

The run: SGD (momentum 0.9) with the learning rate multiplied by 0.1 at each of
`--lr_decay_epochs` (stepped per iteration), coupled weight decay, the method's loss on PGD
examples (`twins_tf.AdversarialTrainer`), validation clean and PGD accuracy after every epoch
(on a split carved from the training data), a Keras progress bar, TensorBoard logs and
`metrics.csv`, the best epoch by validation PGD accuracy in `best.weights.h5`.  With
`--validation=none` (the published protocol) it trains on the whole official train split and
keeps the final epoch.  Killed, it resumes from its last finished epoch when started again
with the same command (`BackupAndRestore` with `double_checkpoint`, so even a kill while the
backup is written resumes, from the epoch before; data order and augmentation are functions of
(seed, epoch), so the resumed run ends with the weights an uninterrupted one would have).  A
finished run started again with a higher `--epochs` trains the extra epochs.  What it writes
is listed in `twins_tf.training.model_dir`.

A NaN or infinite loss or weight stops the run at once with a one-line error naming the step,
the epoch and the likely cause (`training.run_callbacks.StopOnDivergence`); the binary exits 1
and the weights files keep the last finite epoch.  A twin method without `--pretrained` is refused
unless `--allow_random_init` says it is meant.

Every input problem (unknown dataset or arch, missing data, a `--pretrained` file of another
arch or a corrupt one, a batch size that does not split over 2 x replicas, an unknown
`--attack_norm`, an L-inf radius outside [0, 1] or an L2 one longer than the image's
diagonal, a model_dir holding a different run) stops the binary with a one-line error before
anything is trained or written.

The console shows the run's own progress and results; TensorFlow's INFO log lines are off
(its warnings and errors stay), and `--verbosity=1` on the command line brings them back
(`twins_tf.platform.tensorflow_logs`).

`python -m twins_tf.pretrain` is this binary with from-scratch defaults (see pretrain.py).
This file defines flags and makes one call: the run is `twins_tf.training.loop.run(settings)`
(settings, model building, trainer and run loop are `twins_tf.training`), which library code
calls directly with a `Settings` or the dict of a whole run.
"""

from absl import app

from twins_tf.training.main import define_main_flags, main_for
from twins_tf.training.settings import TRAIN

if __name__ == "__main__":
    define_main_flags(TRAIN)
    app.run(main_for(TRAIN))
