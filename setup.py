"""twins_tf: robust fine-tuning with TWINS (Two-WIng NormaliSation) in Keras 3 / TensorFlow.

TensorFlow comes as two wheels that write the same folder, `tensorflow-cpu` and `tensorflow`;
we depend on exactly one.  The default is the CPU build; on a GPU machine install with

    TWINS_TF_TENSORFLOW=tensorflow[and-cuda] pip install .

tensorflow-datasets 4.9.10 imports `importlib_resources` without declaring it, so we do.

keras-cv is not a dependency: nothing here imports it (README, "Installing", says why), and
its install pulls keras-core and kagglehub, a network client, into a product that never
touches the network.
"""

import os

from setuptools import find_packages, setup

TENSORFLOW = os.environ.get("TWINS_TF_TENSORFLOW", "tensorflow-cpu")

setup(
    name="twins_tf",
    version="0.1.0",
    description="TWINS robust fine-tuning, AT/TRADES baselines, PGD and AutoAttack in Keras 3.",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["twins_tf", "twins_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        f"{TENSORFLOW}==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",
        "absl-py==2.5.1",
        # TensorBoard logs of train/pretrain; tensorflow 2.21 does not pull it in
        "tensorboard==2.21.0",
        "scikit-learn==1.9.1",  # the embedded demo's dataset (handwritten digits)
        "scipy==1.17.1",  # compare's paired Student-t intervals (scipy.stats.ttest_rel)
        "matplotlib==3.11.2",  # compare's plots (PNG, embedded in report.html)
    ],
    extras_require={
        # Reading PyTorch checkpoints (.pt/.pth/.ckpt). safetensors/npz need no torch.  dill:
        # MadryLab's robustness checkpoints are pickled with it (read with --allow_pickle).
        "torch": ["torch==2.13.0", "safetensors==0.8.0", "dill==0.4.1"],
        "test": [
            "torch==2.13.0",
            "safetensors==0.8.0",
            "dill==0.4.1",
            "pytest==9.2.0",
            # `make test` runs the suite on 2 workers: on 2 cores one worker's tracing and
            # process start-ups (single-threaded) overlap the other's kernels, 25 -> 19 min.
            "pytest-xdist==3.8.0",
            "ruff==0.17.6",  # `make test` lints and checks the formatting first (ruff.toml)
            "pyautoattack==0.2.0",  # fra31/auto-attack, the AutoAttack oracle (imports torch)
        ],
    },
)
