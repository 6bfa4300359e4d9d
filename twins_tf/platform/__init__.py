"""What twins_tf needs from the platform beneath it, kept apart from the method's code.

    cpu_kernels      oneDNN's CPU kernels on every x86 CPU (set before TensorFlow is imported)
    tensorflow_logs  TensorFlow's C++ INFO logs off unless asked for (likewise set before)
    keras_private    the Keras and TensorFlow internals twins_tf relies on, each pinned by a test
    atomic_files     files replaced in one step (temporary file, flush, rename): records a kill
                     cannot cut in half

Nothing here imports the rest of twins_tf, and importing this package imports no TensorFlow
(`tensorflow_logs.import_tensorflow()` does, when `import twins_tf` calls it).
"""
