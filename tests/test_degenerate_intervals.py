"""compare's paired intervals when the seeds cannot show a spread.

A new user's compare of `at` and `twins_at` with 2 seeds on 16 test examples printed
`twins_at - at  -6.25 [-6.25, -6.25]`: both seeds' differences were one step of 1/16, and the
zero-width interval read as a clear separation.  The table must say that there is no
interval, why, and the test set's resolution, and make up no interval of its own.
"""

import re

import numpy as np
import pytest

from twins_tf import comparison
from twins_tf.comparison import statistics


def _run(method, seed, clean, pgd, examples=16):
    evaluation = {
        "results": {
            "clean": {"accuracy": clean, "examples": examples},
            "pgd10": {"accuracy": pgd, "examples": examples},
        },
        "epsilon": 8 / 255,
        "examples": examples,
        "split": "test",
    }
    config = {"arch": "resnet18", "dataset": "digits_5_9", "method": method, "seed": seed}
    return comparison.RunResult(method, seed, f"/runs/{method}_{seed}", config, [], evaluation)


def _the_new_user_s_grid():
    # clean: twins_at one example (6.25 points) below at on both seeds; pgd10: a spread
    return [
        _run("at", 0, 10 / 16, 4 / 16),
        _run("at", 1, 12 / 16, 5 / 16),
        _run("twins_at", 0, 9 / 16, 6 / 16),
        _run("twins_at", 1, 11 / 16, 5 / 16),
    ]


def test_identical_differences_give_no_interval_and_say_why():
    summary = comparison.summarise(_the_new_user_s_grid(), ["clean", "pgd10"], "at")
    clean = summary["differences"]["twins_at"]["clean"]
    assert clean["mean"] == pytest.approx(-1 / 16)
    assert clean["low"] is None and clean["high"] is None  # nothing made up in its place
    assert clean["examples"] == 16 and clean["resolution"] == pytest.approx(1 / 16)
    assert "the 2 paired differences are all -6.25 points" in clean["degenerate"]
    assert "steps of 6.25 points (1/n)" in clean["degenerate"]
    pgd = summary["differences"]["twins_at"]["pgd10"]
    assert pgd["degenerate"] is None and pgd["low"] < pgd["mean"] < pgd["high"]

    table = comparison.format_table(summary, ["clean", "pgd10"])
    assert "[-6.25, -6.25]" not in table
    row = next(line for line in table.splitlines() if line.startswith("twins_at - at"))
    assert re.search(r"-6\.25 no interval\*", row), table
    assert "resolution: an accuracy on n test examples moves in steps of 1/n: 6.25 points " in (
        table
    )
    assert re.search(
        r"^\* twins_at - at, clean: the 2 paired differences are all -6\.25", table, re.M
    )


def test_differences_equal_up_to_float_rounding_are_identical():
    """0.07 - 0.08 and 0.93 - 0.94 are one step on 100 examples, not two numbers whose
    1e-16 spread gives an interval of that width."""
    values, baseline = [0.07, 0.93], [0.08, 0.94]
    assert np.ptp(np.subtract(values, baseline)) > 0  # as floats they differ
    assert comparison.paired_difference(values, baseline)[1:] == (None, None)
    assert statistics.degenerate_interval(values, baseline, 100).startswith(
        "the 2 paired differences are all -1.00 points"
    )


def test_a_spread_keeps_its_t_interval_and_no_note():
    results = [
        _run("at", 0, 0.50, 0.2, examples=200),
        _run("at", 1, 0.52, 0.2, examples=200),
        _run("at", 2, 0.49, 0.2, examples=200),
        _run("twins_at", 0, 0.55, 0.3, examples=200),
        _run("twins_at", 1, 0.56, 0.3, examples=200),
        _run("twins_at", 2, 0.50, 0.25, examples=200),
    ]
    summary = comparison.summarise(results, ["clean", "pgd10"], "at")
    table = comparison.format_table(summary, ["clean", "pgd10"])
    assert summary["differences"]["twins_at"]["clean"]["degenerate"] is None
    assert "no interval" not in table and "\n* " not in table
    assert "0.5 points (n = 200)" in table


def test_the_html_report_shows_the_note(tmp_path):
    comparison.write_report(_the_new_user_s_grid(), ["clean", "pgd10"], "at", tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "[-6.25, -6.25]" not in page
    assert "no interval*" in page and "steps of 6.25 points (1/n)" in page
