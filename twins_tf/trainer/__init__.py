"""AdversarialTrainer: adversarial fine-tuning as a Keras model (`fit`, `evaluate`, `save`).

    adversarial_trainer.py  the `keras.Model` and its train/test steps (spec §4-6)
    checks.py               what it is given (model, attacks, fit/evaluate data), checked
                            before any compiled code runs
    l2sp.py                 L2-SP's pre-trained variables and their anchors
    serialisation.py        its Keras config, so `trainer.save("x.keras")` and
                            `keras.models.load_model` work as for any Keras model

Distribution: each replica attacks and trains on its own slice of the global batch, the loss
is divided by the number of replicas and the optimizer sums the gradients, so the update is
the mean over replicas.  A twin model splits the *per-replica* batch, which must therefore be
even; `fit`/`evaluate` check it (and the images and labels) before any compiled code runs.

Beside it: AutoLoRa's loss weights and learning-rate windows (`twins_tf.autolora`), the checks
of budgets, images and labels the attacks share (`twins_tf.input_checks`), the objectives
(`twins_tf.methods`).  Importing this package registers the trainer as the Keras serialisable
`twins_tf>AdversarialTrainer`.
"""

from twins_tf.trainer.adversarial_trainer import AdversarialTrainer

__all__ = ["AdversarialTrainer"]
