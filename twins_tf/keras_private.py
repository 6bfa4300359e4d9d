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
