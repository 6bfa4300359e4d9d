"""`build_model`: the classifier a run trains, from its settings."""

from twins_tf.training.settings import SetupError, as_settings


def build_model(settings, num_replicas=1):
    """The run's classifier: `models.build_model` (twin for twin methods), `--pretrained` loaded.

    A plain-BN model trained on several replicas gets synchronized BatchNormalization: Keras
    BN otherwise keeps per-replica moving statistics that drift apart (and saves replica 0's).
    Twin layers keep theirs equal themselves and split each replica's own batch (spec §2).

    Args:
      settings: the run's `Settings` (or its dict), with `num_classes` set.
      num_replicas: replicas of the strategy the model is built under.

    Raises:
      SetupError: the pre-trained file is missing, corrupt or of another architecture.
    """
    from twins_tf import weights
    from twins_tf.models.registry import build_model as build_network

    s = as_settings(settings)
    if s.num_classes is None:
        raise ValueError(
            "build_model needs settings with num_classes (the run's data sets "
            "it): pass settings.replace(num_classes=...)."
        )
    model = build_network(
        s.arch,
        s.num_classes,
        twin=s.twin,
        input_shape=(s.image_size, s.image_size, 3),
        upsample=s.upsample,
        synchronized=num_replicas > 1 and not s.twin,
    )
    if s.pretrained:
        try:
            weights.load_pretrained(model, s.pretrained)
        except (FileNotFoundError, weights.CheckpointError) as error:
            raise SetupError(f"--pretrained: {error}") from None
    if s.lora_rank:  # AutoLoRa: its weights file still loads as the plain (main) network
        from twins_tf import lora

        model = lora.add_lora(model, s.lora_rank)
    return model
