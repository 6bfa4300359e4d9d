"""The errors and warning every part of twins_tf.weights raises."""


class CheckpointError(ValueError):
    """A weights file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch file needs full unpickling (code execution) and allow_pickle was not given."""


class CheckpointWarning(UserWarning):
    """Something in a checkpoint is unusual but loadable (e.g. non-ImageNet normaliser)."""
