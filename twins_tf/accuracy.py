"""Accuracy of a classifier over batches, on clean or attacked images: the one counting loop.

A compiled function counts one batch's correct predictions and Python sums the counts, so
memory stays flat (no concatenated predictions) and a last, smaller batch counts exactly.
Evaluation (`evaluate_batched`), the interpolation path and AutoLoRa's natural-branch accuracy
all count this way.  The module imports nothing of twins_tf, so every one of them, the trainer
included, can use it.
"""

import itertools


def accuracy_counter(model, attack=None):
    """A compiled function (images, labels) -> number of correct predictions after `attack`.

    Args:
      model: called as `model(images, training=False)`: a Keras model, or any function of
        that form (e.g. one running a LoRA model's natural branch).
      attack: called as `attack(model, images, labels)` (e.g. `twins_tf.attacks.PGD`), or None
        for clean images.
    """
    import tensorflow as tf

    def correct(images, labels):
        if attack is not None:
            images = attack(model, images, labels)
        predictions = tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32))

    compiled = []

    def counter(images, labels):
        images = tf.cast(images, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        if not compiled:  # traced once, batch size unknown: a last, smaller batch reuses it
            signature = [
                tf.TensorSpec([None, *images.shape[1:]], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ]
            compiled.append(tf.function(correct, input_signature=signature))
        return compiled[0](images, labels)

    return counter


def count_correct(counter, batches, steps=None):
    """(correct, examples): `counter` (`accuracy_counter`) summed over the (images, labels)
    `batches`, the first `steps` of them when given."""
    correct = total = 0
    for images, labels in itertools.islice(batches, steps):
        correct += int(counter(images, labels))
        total += int(labels.shape[0])
    return correct, total


def evaluate_batched(model, batches, attack):
    """Accuracy of `model` over `batches` on `attack(model, x, y)` examples (None: clean).

    Returns:
      {"accuracy": correct / examples (NaN for no examples), "correct": int, "examples": int}.
    """
    correct, total = count_correct(accuracy_counter(model, attack), batches)
    return {
        "accuracy": correct / total if total else float("nan"),
        "correct": correct,
        "examples": total,
    }
