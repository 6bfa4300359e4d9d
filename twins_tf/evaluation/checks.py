"""The official code's sanity checks on the model, run once before an evaluation's attacks."""

from twins_tf.evaluation.inputs import AUTOATTACK


def model_checks(model, batches, settings, log):
    """The sanity checks of `twins_tf.attacks.checks` on the first batch, logged; the messages.

    With autoattack in `--attacks`, AutoAttack runs them itself (with its version and targets)
    and its messages are the report's; otherwise they run here.
    """
    from twins_tf.attacks import checks as attack_checks

    if any(name == AUTOATTACK for name, _ in settings["attack_list"]):
        return None  # AutoAttack's own, in results["autoattack"]["checks"]
    for images, labels in batches.take(1):
        messages = attack_checks.model_checks(model, images, labels)
        for message in messages:
            log(f"warning: {message}")
        return messages
    return []
