"""Every use of a Keras or TensorFlow private API in twins_tf, in one place.

Keras 3 and TensorFlow 2.21 leave a few things twins_tf needs without a public name. Each
function here wraps one such use, names the Keras / TensorFlow version it was checked against,
and has a test in tests/test_keras_private*.py that pins the behaviour it relies on, so an
upgrade that changes it fails there first instead of deep inside a training run. No other
module imports `keras.src` or `tensorflow.python`.
"""
# --- training and runs: multi-worker trainer fix, BackupAndRestore's files, op determinism ---

# --- attacks: per-layer dtype policy while tracing an attack ---

# --- models and weights: Keras's Functional class, Keras's HDF5 group names ---
# twinify tells a graph model by the public `keras.Function` (twins_tf.bn_wings.is_graph_model),
# so Keras's Functional class needs no private import.  What stays private is the layout of
# the `.weights.h5` files `model.save_weights` writes, which twins_tf.weights reads to tell a
# file's architecture, head size and kind (twin or plain) before loading it.


def saved_layer_shapes(h5file, layer_class):
    """The variable shapes of every layer of `layer_class` saved in a `.weights.h5` file.

    Why: `load_pretrained` must know a file's number of convolutions, its head size and
    whether it holds twin layers before it can build the model to load it into, and Keras has
    no public reader of a weights file.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): `model.save_weights` of a functional
    model writes layer k of a class under the HDF5 group `layers/<name>` with `<name>` the
    class name in snake case (`keras.src.utils.naming.to_snake_case`: Conv2D -> conv2d,
    TwinBatchNormalization -> twin_batch_normalization) for the first such layer and
    `<name>_<k>` for the k-th after it (`saving_lib._get_unique_name`), and the layer's
    variables as datasets `vars/0`, `vars/1`, ... in the order of `layer.weights`.

    Args:
      h5file: an open `h5py.File`.
      layer_class: a Keras layer class.

    Returns:
      [[shape of each variable] for each such layer holding variables], in save order.
    """
    from keras.src.utils.naming import to_snake_case

    base = layer_class.__name__.lower()
    layers = h5file["layers"]
    found = []
    for name in layers:
        suffix = name[len(base):]
        if not name.startswith(base) or not (suffix == "" or suffix[:1] == "_"
                                             and suffix[1:].isdigit()):
            continue
        variables = layers[name].get("vars")
        if variables is not None and len(variables):
            shapes = [tuple(variables[str(i)].shape) for i in range(len(variables))]
            found.append((int(suffix[1:] or 0), shapes))
    return [shapes for _, shapes in sorted(found)]


def load_weights_collecting_skips(model, path):
    """`model.load_weights(path)`, returning Keras's warnings that it skipped part of the file.

    Why: Keras loads a weights file whose nested containers are missing with only a warning,
    leaving those layers freshly initialised; a pre-trained load must refuse that instead.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): such warnings are UserWarnings
    whose text holds "Skipping" (`saving_lib._load_container_state`); a layer that finds
    no variables in the file raises ValueError; extra layers in the file are ignored silently
    (so callers compare layer counts first).

    Returns:
      The first line of each "Skipping" warning (an empty list when all was loaded).

    Raises:
      ValueError, OSError, KeyError: as `model.load_weights`.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    return [str(w.message).splitlines()[0] for w in caught if "Skipping" in str(w.message)]


