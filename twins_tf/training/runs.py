"""The model of a `train`/`pretrain` run, rebuilt from its `config.json` with its weights.

A run directory (`--model_dir`) holds `config.json` (what was built: arch, num_classes,
image_size, upsample, twin) and `best.weights.h5` / `last.weights.h5`.  `load_run` is the one
place that turns such a directory back into a Keras model, for library users and for the
`export` binary alike, so the model a user loads is the model that gets shipped.
"""

import os

from twins_tf.training import model_dir as run_files

# What a run's config.json must hold to rebuild its network.
MODEL_KEYS = ("arch", "num_classes", "image_size", "upsample", "twin")
_NAMED_WEIGHTS = {"best": run_files.BEST_WEIGHTS, "last": run_files.LAST_WEIGHTS}


def run_weights_path(model_dir, weights="best"):
    """The weights file `weights` ("best", "last" or a path) names for the run in `model_dir`."""
    weights = os.fspath(weights)
    return (
        os.path.join(model_dir, _NAMED_WEIGHTS[weights]) if weights in _NAMED_WEIGHTS else weights
    )


def read_run_config(model_dir):
    """The run's config.json, checked to hold what the network needs.

    Raises:
      FileNotFoundError: no such directory, or no config.json in it.
      ValueError: config.json is unreadable or lacks a key of `MODEL_KEYS`.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} holds no {run_files.CONFIG_FILE} (no such "
            "directory): pass the --model_dir of a train or pretrain run."
        )
    if not os.path.isfile(os.path.join(model_dir, run_files.CONFIG_FILE)):
        raise FileNotFoundError(
            f"{model_dir} holds no {run_files.CONFIG_FILE}: pass the "
            "--model_dir of a train or pretrain run."
        )
    config = run_files.read_config(model_dir)  # SetupError (a ValueError): unreadable JSON
    missing = [k for k in MODEL_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{os.path.join(model_dir, run_files.CONFIG_FILE)} lacks "
            f"{', '.join(missing)}; was it written by twins_tf.train?"
        )
    return config


def load_run(model_dir, weights="best"):
    """The network of the run in `model_dir` with its best or last weights, as it trained.

    The model is `twins_tf.models.build_model` with the run's arch, head, input size and
    upsampling: a twin model (both wings, as saved) for a twin method's run, a plain-BN one
    otherwise; `twins_tf.untwin` turns a twin model into the plain inference network.  It is
    built under the current Keras dtype policy.  An AutoLoRa run (`lora_rank` > 0) gives its
    main path without the LoRA branch, the network the paper evaluates (docs/autolora.md):
    its weights file holds that network in the plain layout and the branches as extra layers,
    which this load leaves out; `twins_tf.lora.merge_lora` of the branched model is the other
    path.

    Args:
      model_dir: the run's `--model_dir`.
      weights: "best" (`best.weights.h5`, the best validation epoch), "last"
        (`last.weights.h5`, the latest finished epoch) or the path of a `.weights.h5` file of
        that run's network.

    Returns:
      The Keras model.

    Raises:
      FileNotFoundError: no such directory, no config.json, or no such weights file.
      ValueError: the config lacks a key the network needs, or the weights do not fit it or
        hold a NaN or infinity (a diverged run).
    """
    from twins_tf import weights as weights_lib
    from twins_tf.models.registry import build_model
    from twins_tf.training import run_callbacks

    config = read_run_config(model_dir)
    path = run_weights_path(model_dir, weights)
    if not os.path.isfile(path):
        hint = (
            "the run has not finished an epoch yet"
            if weights in _NAMED_WEIGHTS
            else "check the path"
        )
        raise FileNotFoundError(
            f'No weights file {path}: {hint}; weights= takes "best", "last" or a .weights.h5 path.'
        )
    size, twin = int(config["image_size"]), bool(config["twin"])
    model = build_model(
        config["arch"],
        int(config["num_classes"]),
        twin=twin,
        input_shape=(size, size, 3),
        upsample=int(config["upsample"]),
    )
    kind = "twin" if twin else "plain"
    try:
        loaded = weights_lib.load_pretrained(model, path, head=True)
    except weights_lib.CheckpointError as error:
        raise ValueError(
            f"{path} does not fit the run's {config['arch']} "
            f"({kind} BN, {config['num_classes']} classes): {error}"
        ) from None
    # load_pretrained converts between plain and twin BN (for fine-tuning); a run's weights
    # must be the network the run trained, or export would ship another one without a word.
    if loaded["source_twin"] != twin:
        raise ValueError(
            f"{path} holds {'twin' if loaded['source_twin'] else 'plain'}-BN "
            f"weights but the run in {model_dir} trained a {kind}-BN network: "
            "pass a weights file of this run (best, last or one it wrote)."
        )
    run_callbacks.check_finite_weights(model, path)
    return model
