"""`evaluate` and `interpolate` on a run that has not finished: refused unless asked, recorded.

A new user evaluated and interpolated a run killed mid-training (no summary.json) and got
numbers without a word: its best weights were those of its first epochs.  Both binaries now
refuse such a run in one line naming `--allow_unfinished`, and with it record the fact in the
report (evaluate) or interpolation.json (interpolate).
"""

import json
import re
import shutil

import pytest
from absl import flags
from binaries_testlib import evaluate_settings, source_run

from twins_tf import evaluation, interpolate, interpolation
from twins_tf.evaluation import inputs
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return source_run(tmp_path_factory)


@pytest.fixture
def killed(finished, tmp_path):
    """The finished run's directory as a kill after its last epoch leaves it: everything but
    summary.json."""
    model_dir = tmp_path / "killed"
    shutil.copytree(finished, model_dir)
    (model_dir / run_files.SUMMARY_FILE).unlink()
    for report in model_dir.glob(f"{inputs.REPORT_PREFIX}*.json"):  # other tests' evaluations
        report.unlink()
    return model_dir


def _epochs(model_dir):
    return json.loads((model_dir / "config.json").read_text())["epochs"]


def test_a_run_without_summary_is_unfinished_and_an_interpolation_is_not(finished, killed):
    assert inputs.unfinished_run(str(finished)) is None
    epochs = _epochs(killed)
    assert inputs.unfinished_run(str(killed)) == (
        f"{killed} holds an unfinished run (no summary.json: killed, or still training; "
        f"{epochs} of its {epochs} epochs done)"
    )
    (killed / interpolation.INTERPOLATION_FILE).write_text("{}")  # written last by interpolate
    assert inputs.unfinished_run(str(killed)) is None


def test_evaluate_refuses_an_unfinished_run_unless_allowed(killed, tmp_path):
    args = [f"--model_dir={killed}", "--attacks=clean", "--max_examples=16"]
    with pytest.raises(SetupError) as error:
        evaluation.evaluate(evaluate_settings(args))
    message = str(error.value)
    assert "\n" not in message
    assert re.search(r"holds an unfinished run \(no summary\.json: .*--allow_unfinished", message)
    assert not list(killed.glob("evaluation_test*.json"))

    report = evaluation.evaluate(
        evaluate_settings([*args, "--allow_unfinished"]), log=lambda _: None, progress=False
    )
    assert report["unfinished"] == inputs.unfinished_run(str(killed))
    (path,) = killed.glob("evaluation_test_linf_eps*.json")  # the one radius's report
    written = json.loads(path.read_text())
    assert written["unfinished"] == report["unfinished"]
    assert f"warning: {report['unfinished']}" in evaluation.format_table(report)


def test_a_finished_run_s_report_has_no_such_record(finished, tmp_path):
    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={finished}",
                "--attacks=clean",
                "--max_examples=16",
                f"--output={tmp_path / 'report.json'}",
            ]
        ),
        log=lambda _: None,
        progress=False,
    )
    assert "unfinished" not in report


def _interpolate_flags(*argv):
    values = flags.FlagValues()
    interpolate.define_flags(values)
    values(["interpolate", *argv])
    return values


def test_interpolate_refuses_an_unfinished_run_unless_allowed(finished, killed, tmp_path):
    out = tmp_path / "wise"
    argv = [
        f"--run_a={finished}",
        f"--run_b={killed}",
        f"--output_dir={out}",
        "--alphas=0,1",
        "--validation_examples=16",
    ]
    with pytest.raises(SystemExit) as exit_info:
        interpolate.main(["interpolate"], _interpolate_flags(*argv))
    message = exit_info.value.code
    assert message.startswith("interpolate: error: run B: ") and "\n" not in message
    assert "holds an unfinished run" in message and "--allow_unfinished" in message
    assert not out.exists()

    interpolate.main(["interpolate"], _interpolate_flags(*argv, "--allow_unfinished"))
    record = json.loads((out / interpolation.INTERPOLATION_FILE).read_text())
    assert record["unfinished"] == {"run_b": inputs.unfinished_run(str(killed))}
    # the output is a finished interpolation: evaluate takes it without the flag
    assert inputs.unfinished_run(str(out)) is None
