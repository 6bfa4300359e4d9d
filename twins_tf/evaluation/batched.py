"""Accuracy of a model over a tf.data pipeline, on clean or attacked images, batch by batch.

Counting correct predictions per batch in a compiled function and summing them in Python keeps
memory flat (no concatenated predictions) and makes the last, smaller batch count exactly.
"""


def accuracy_counter(model, attack):
    """A compiled function (images, labels) -> number of correct predictions after `attack`.

    `attack` is called as `attack(model, images, labels)` (e.g. `twins_tf.attacks.PGD`) or is
    None for clean images.
    """
    import tensorflow as tf

    @tf.function
    def correct(images, labels):
        labels = tf.cast(labels, tf.int32)
        if attack is not None:
            images = attack(model, images, labels)
        predictions = tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32))

    return correct


def evaluate_batched(model, batches, attack):
    """Accuracy of `model` over `batches` on `attack(model, x, y)` examples (None: clean).

    Returns:
      {"accuracy": correct / examples (NaN for no examples), "correct": int, "examples": int}.
    """
    correct_fn = accuracy_counter(model, attack)
    correct = total = 0
    for images, labels in batches:
        correct += int(correct_fn(images, labels))
        total += int(labels.shape[0])
    return {
        "accuracy": correct / total if total else float("nan"),
        "correct": correct,
        "examples": total,
    }
