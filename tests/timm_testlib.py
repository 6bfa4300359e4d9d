"""Asking timm (in its own virtualenv, tests/timm_requirements.txt) for reference answers.

`run(tmp_path, command, **request)` writes the request, runs tests/timm_reference.py under the
timm environment's Python and returns the answer: a dict of arrays, the state dict under
`state` as {PyTorch key: array}.  The environment is `.venv-timm` beside the repository (`make
test` creates it) or the Python named by TWINS_TF_TIMM_PYTHON.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

REPO = pathlib.Path(__file__).absolute().parent.parent
SCRIPT = pathlib.Path(__file__).absolute().parent / "timm_reference.py"


def timm_python():
    path = os.environ.get("TWINS_TF_TIMM_PYTHON") or str(REPO / ".venv-timm" / "bin" / "python")
    if not os.path.exists(path):
        pytest.fail(
            f"no timm reference environment at {path}: `make test` creates it from "
            "tests/timm_requirements.txt (or set TWINS_TF_TIMM_PYTHON)."
        )
    return path


def run(directory, command, **request):
    """The answer of tests/timm_reference.py to `command` with `request` (see its docstring)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    request_path = directory / f"{command}_request.json"
    answer_path = directory / f"{command}_answer.npz"
    request_path.write_text(json.dumps({"command": command, **request}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(
        [timm_python(), str(SCRIPT), str(request_path), str(answer_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if result.returncode:
        raise AssertionError(f"timm reference failed:\n{result.stderr[-4000:]}")
    with np.load(answer_path) as answer:
        arrays = {k: answer[k] for k in answer.files}
    state = {k[len("state/") :]: v for k, v in arrays.items() if k.startswith("state/")}
    return {**{k: v for k, v in arrays.items() if not k.startswith("state/")}, "state": state}
