"""compare's model cards against RobustBench's model-info format, as read from its repository.

The facts below were read from RobustBench/robustbench at commit
78fcc9e48a07a861268f295a777b975f25155964:

* `robustbench/utils.py`, dataclass `ModelInfo`: the field names (link, name, authors,
  additional_data, number_forward_passes, dataset, venue, architecture, eps, clean_acc,
  reported, corruptions_* (the corruptions threat model only), autoattack_acc, footnote);
* the 188 files `model_info/<cifar10|cifar100|imagenet>/<Linf|L2>/*.json`: the JSON type of
  each field (every one has the twelve fields below; `unreliable`, a bool, is in 147 of them,
  `footnote` in 103, a string or null; `external`, a string, in 25), and the eps values used
  ("8/255", "4/255", "0.5", "0.031");
* `robustbench/utils.py`, `update_json`: accuracies written as `str(round(accuracy * 100, 2))`;
  `list_available_models`: reads `float(d["clean_acc"]) / 100` and
  `float(d["autoattack_acc"]) / 100`, shows an empty venue as "Unpublished";
* `robustbench/model_zoo/enums.py`, `ThreatModel`: the directory names "Linf" and "L2"
  (`model_info/<dataset>/<threat model>/<model id>.json`, `robustbench/leaderboard/template.py`
  reads every `*.json` there).

No RobustBench code is used: the checks are written from those facts.
"""

import json
import re

import pytest

from twins_tf import comparison
from twins_tf.comparison import cards

REQUIRED = {  # field -> its JSON type in every Linf/L2 model-info file
    "link": str,
    "name": str,
    "authors": str,
    "additional_data": bool,
    "number_forward_passes": int,
    "dataset": str,
    "venue": str,
    "architecture": str,
    "eps": str,
    "clean_acc": str,
    "reported": str,
    "autoattack_acc": str,
}
OPTIONAL = {"unreliable": (bool,), "footnote": (str, type(None)), "external": (str,)}
THREAT_MODEL_DIRECTORIES = ("Linf", "L2")
# A percent as str(round(100 * a, 2)) prints it: "89.69", "62.5", "100.0", "0.0".
PERCENT = re.compile(r"^(100|\d{1,2})(\.\d{1,2})?$")
EPS = re.compile(r"^(\d+/255|\d+(\.\d+)?)$")
# model_info/cifar10/Linf/Carmon2019Unlabeled.json at that commit, verbatim.
ROBUSTBENCH_EXAMPLE = {
    "link": "https://arxiv.org/abs/1905.13736",
    "name": "Unlabeled Data Improves Adversarial Robustness",
    "authors": "Yair Carmon, Aditi Raghunathan, Ludwig Schmidt, Percy Liang, John C. Duchi",
    "additional_data": True,
    "number_forward_passes": 1,
    "dataset": "cifar10",
    "venue": "NeurIPS 2019",
    "architecture": "WideResNet-28-10",
    "eps": "8/255",
    "clean_acc": "89.69",
    "reported": "62.5",
    "autoattack_acc": "59.53",
    "unreliable": False,
}


def robustbench_problems(card, *, leaderboard=True):
    """What in `card` a RobustBench reader would not take; [] for a valid model-info file.

    `leaderboard`: the accuracies must parse (its readers call float() on both); a card of a
    run without AutoAttack is still a valid file, but not a leaderboard entry.
    """
    problems = []
    extra = set(card) - set(REQUIRED) - set(OPTIONAL) - {cards.EXTRA_KEY}
    if extra:
        problems.append(f"fields RobustBench does not have: {sorted(extra)}")
    for field, kind in REQUIRED.items():
        if field not in card:
            problems.append(f"missing {field}")
        elif type(card[field]) is not kind:  # bool is an int: compare types exactly
            problems.append(f"{field} is {type(card[field]).__name__}, not {kind.__name__}")
    for field, kinds in OPTIONAL.items():
        if field in card and type(card[field]) not in kinds:
            problems.append(f"{field} is {type(card[field]).__name__}")
    for field in ("clean_acc", "autoattack_acc", "reported"):
        value = card.get(field)
        if isinstance(value, str) and value and not PERCENT.match(value):
            problems.append(f"{field}={value!r} is not a percent string")
    if leaderboard:
        for field in ("clean_acc", "autoattack_acc"):
            try:
                float(card.get(field))
            except (TypeError, ValueError):
                problems.append(f"float({field}) fails on {card.get(field)!r}")
    if isinstance(card.get("eps"), str) and not EPS.match(card["eps"]):
        problems.append(f"eps={card['eps']!r} is neither N/255 nor a decimal")
    return problems


def eps_value(text):
    """The radius an eps string stands for ("8/255" -> 0.0313..., "0.5" -> 0.5)."""
    numerator, _, denominator = text.partition("/")
    return float(numerator) / (float(denominator) if denominator else 1.0)


def _result(
    *, clean=0.7125, autoattack=0.40625, norm="linf", epsilon=8 / 255, checks=(), arch="resnet50"
):
    results = {"clean": {"accuracy": clean}, "pgd10": {"accuracy": 0.45}}
    if autoattack is not None:
        results["autoattack"] = {"accuracy": autoattack, "checks": list(checks)}
    evaluation = {
        "results": results,
        "epsilon": epsilon,
        "norm": norm,
        "examples": 160,
        "split": "test",
        "checks": None if autoattack is not None else list(checks),
        **({"autoattack_examples": 32} if autoattack is not None else {}),
    }
    config = {
        "arch": arch,
        "dataset": "stanford_dogs",
        "pretrained": "/src.weights.h5",
        "method": "twins_at",
        "seed": 2,
        "lr": 0.01,
        "weight_decay": 1e-3,
        "lr_decay_epochs": [],
    }
    return comparison.RunResult("twins_at", 2, "/runs/twins_at_seed2", config, [], evaluation)


def test_the_checker_takes_robustbench_s_own_file():
    assert robustbench_problems(ROBUSTBENCH_EXAMPLE) == []
    assert robustbench_problems({**ROBUSTBENCH_EXAMPLE, "clean_acc": 0.8969}) != []


def test_a_card_is_a_robustbench_model_info_file():
    card = cards.model_card(_result())
    assert robustbench_problems(card) == []
    assert json.loads(json.dumps(card)) == card
    assert card["clean_acc"] == "71.25" and card["autoattack_acc"] == "40.62"
    assert float(card["clean_acc"]) / 100 == pytest.approx(0.7125, abs=5e-5)
    assert card["eps"] == "8/255" and eps_value(card["eps"]) == pytest.approx(8 / 255)
    assert card["number_forward_passes"] == 1 and card["additional_data"] is False
    assert card["reported"] == "" and card["unreliable"] is False
    assert (card["dataset"], card["architecture"]) == ("stanford_dogs", "ResNet-50")
    assert card["name"] == "twins_at_seed2"
    extra = card[cards.EXTRA_KEY]
    assert extra["settings_hash"] == comparison.settings_hash(_result().settings)
    assert extra["accuracy"] == {"clean": 0.7125, "pgd10": 0.45, "autoattack": 0.40625}
    assert (extra["method"], extra["seed"], extra["norm"]) == ("twins_at", 2, "linf")


@pytest.mark.parametrize(
    "accuracy, text", [(0.5669, "56.69"), (0.625, "62.5"), (1.0, "100.0"), (0.0, "0.0")]
)
def test_accuracies_are_written_as_robustbench_writes_them(accuracy, text):
    assert cards.percent_string(accuracy) == text
    assert PERCENT.match(text)


def test_the_threat_model_is_the_directory_from_the_run_s_norm():
    linf = _result()
    assert cards.card_path(linf) == "model_cards/stanford_dogs/Linf/twins_at_seed2.json"
    l2 = _result(norm="l2", epsilon=0.5)
    card = cards.model_card(l2)
    assert cards.card_path(l2) == "model_cards/stanford_dogs/L2/twins_at_seed2.json"
    assert card["eps"] == "0.5" and robustbench_problems(card) == []
    assert cards.card_path(l2).split("/")[2] in THREAT_MODEL_DIRECTORIES
    odd = cards.model_card(_result(epsilon=0.031))  # not a whole number of 1/255
    assert odd["eps"] == "0.031" and robustbench_problems(odd) == []


def test_a_flagged_evaluation_is_marked_unreliable():
    card = cards.model_card(_result(checks=["the model's output looks like probabilities"]))
    assert card["unreliable"] is True
    assert card[cards.EXTRA_KEY]["checks"] == ["the model's output looks like probabilities"]


def test_a_card_without_autoattack_says_it_is_no_leaderboard_entry():
    card = cards.model_card(_result(autoattack=None))
    assert card["autoattack_acc"] == ""
    assert robustbench_problems(card, leaderboard=False) == []
    assert robustbench_problems(card) == ["float(autoattack_acc) fails on ''"]
    assert card[cards.EXTRA_KEY]["not_measured"] == ["autoattack_acc"]


def test_compare_writes_the_cards_in_robustbench_s_tree(tmp_path):
    results = [_result(), _result(norm="l2", epsilon=0.5)]
    results[1].method = "at"
    comparison.write_report(results, ["clean", "pgd10", "autoattack"], "at", tmp_path)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert "model_cards/stanford_dogs/Linf/twins_at_seed2.json" in written
    assert "model_cards/stanford_dogs/L2/at_seed2.json" in written
    for path in tmp_path.glob("model_cards/*/*/*.json"):
        card = json.loads(path.read_text())
        assert path.parent.name in THREAT_MODEL_DIRECTORIES
        assert card["name"] == path.stem and card["dataset"] == path.parent.parent.name
        assert robustbench_problems(card) == []
    page = (tmp_path / "report.html").read_text()
    assert "<td>71.25</td><td>40.62</td>" in page
