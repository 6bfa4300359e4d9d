"""A model card per run of a comparison, in RobustBench's model-info format.

A table says which row is ahead; a card says what one run is, in the format the robustness
community reads: RobustBench's `model_info/<dataset>/<threat model>/<model id>.json`
(RobustBench/robustbench, `robustbench/utils.py` `ModelInfo` and `update_json`, and the files
under `model_info/`).  Its fields, with the types and spellings RobustBench writes:

    link, name, authors, venue, footnote   strings ("" when there is none; RobustBench shows
                                           an empty venue as "Unpublished")
    additional_data                        bool: trained on data beyond the task's (never here)
    number_forward_passes                  int: forward passes per prediction
    dataset, architecture                  strings
    eps                                    string: "8/255" (L-inf, in 1/255 units), "0.5" (L2)
    clean_acc, autoattack_acc, reported    accuracies as percent strings rounded to 2 decimals,
                                           as `str(round(100 * accuracy, 2))`: "89.69", "62.5";
                                           `reported` (a paper's own figure) is ""
    unreliable                             bool: the evaluation's sanity checks flagged the
                                           model (RobustBench's "AA eval. potentially unreliable")

The threat model is not a field: it is the directory, `Linf` or `L2`, from the run's norm.
So the cards are written as `model_cards/<dataset>/<Linf|L2>/<model id>.json`, a tree
RobustBench's readers (its leaderboard, `list_available_models`) can be pointed at.  What
twins_tf adds to trace a card back to its run (method, seed, source weights, a hash of the
settings, the evaluation's examples and split, PGD accuracies, the interpolation) is under the
one extra key `twins_tf`, which RobustBench's readers, reading fields by name, ignore.

A card whose `clean_acc` or `autoattack_acc` is "" (not measured: compare ran without
`--autoattack_examples`) is not a leaderboard entry: RobustBench's readers call `float()` on
both; `twins_tf.not_measured` lists them.
"""

import os
import re

from twins_tf.comparison.rows import row_dir_name, settings_hash
from twins_tf.evaluation.inputs import AUTOATTACK, CLEAN
from twins_tf.input_checks import check_norm

CARDS_DIR = "model_cards"
EXTRA_KEY = "twins_tf"
# RobustBench's directory name of each norm the attacks take.
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}
# Every method here predicts with one forward pass of one network: a twin run through its
# Adaptive wing, an AutoLoRa run through its main path, an interpolation row through the
# interpolated network; none averages passes (as randomised defences do).
FORWARD_PASSES = 1


def percent_string(accuracy):
    """A fraction as RobustBench writes an accuracy: `str(round(100 * a, 2))`; "" for None."""
    return "" if accuracy is None else str(round(100 * float(accuracy), 2))


def eps_string(epsilon, norm):
    """The radius as RobustBench writes it: L-inf in 1/255 units ("8/255") when it is a whole
    number of them, else a decimal ("0.031"); L2 a decimal ("0.5")."""
    epsilon = float(epsilon)
    if norm == "linf" and abs(epsilon * 255 - round(epsilon * 255)) < 1e-6:
        return f"{round(epsilon * 255)}/255"
    return f"{epsilon:.6g}"


def run_norm(result):
    """The norm, "linf" or "l2", the run's accuracies are under: its evaluation's (what the
    card's eps and accuracies measure), else the run's own `attack_norm` (config.json), else
    L-inf (runs and evaluations older than the norm setting were L-inf)."""
    norm = result.evaluation.get("norm") or result.settings.get("attack_norm") or "linf"
    return check_norm(norm, "the run's norm")


def threat_model(result):
    """The threat model, "Linf" or "L2", from the norm the run was evaluated under."""
    return THREAT_MODELS[run_norm(result)]


def architecture_name(arch):
    """RobustBench's spelling of an architecture: resnet50 -> ResNet-50, wide_resnet50_2 ->
    WideResNet-50-2 (its readers abbreviate these names); others as they are."""
    wide = re.fullmatch(r"wide_resnet(\d+)_(\d+)", arch)
    if wide:
        return f"WideResNet-{wide.group(1)}-{wide.group(2)}"
    plain = re.fullmatch(r"resnet(\d+)", arch)
    return f"ResNet-{plain.group(1)}" if plain else arch


def model_id(result):
    """The card's file stem, RobustBench's model id: the run's directory name in compare."""
    return f"{row_dir_name(result.method)}_seed{result.seed}"


def card_path(result):
    """The card's path under a report directory: model_cards/<dataset>/<Linf|L2>/<id>.json."""
    return os.path.join(
        CARDS_DIR, result.settings["dataset"], threat_model(result), f"{model_id(result)}.json"
    )


def _check_messages(evaluation):
    messages = list(evaluation.get("checks") or [])
    messages += evaluation["results"].get(AUTOATTACK, {}).get("checks") or []
    return messages


def _footnote(result):
    e, s = result.evaluation, result.settings
    parts = [
        f"twins_tf {s.get('method')} run ({result.method}), seed {result.seed}",
        f"clean accuracy on {e['examples']} {e['split']} examples",
    ]
    if result.accuracy(AUTOATTACK) is not None:
        parts.append(f"AutoAttack on {e.get('autoattack_examples') or e['examples']} of them")
    return "; ".join(parts) + "."


def model_card(result):
    """RobustBench's model-info fields for one run, and twins_tf's under `EXTRA_KEY`.

    Args:
      result: a `RunResult` (its settings, evaluation and, for a wise row, interpolation).
    """
    s, e = result.settings, result.evaluation
    norm = run_norm(result)
    clean, robust = result.accuracy(CLEAN), result.accuracy(AUTOATTACK)
    messages = _check_messages(e)
    return {
        "link": "",
        "name": model_id(result),
        "authors": "",
        "additional_data": False,
        "number_forward_passes": FORWARD_PASSES,
        "dataset": s["dataset"],
        "venue": "",
        "architecture": architecture_name(s["arch"]),
        "eps": eps_string(e["epsilon"], norm),
        "clean_acc": percent_string(clean),
        "reported": "",
        "autoattack_acc": percent_string(robust),
        "footnote": _footnote(result),
        "unreliable": bool(messages),
        EXTRA_KEY: {
            "row": result.method,
            "method": s.get("method"),
            "seed": result.seed,
            "arch": s["arch"],
            "norm": norm,
            "epsilon": e["epsilon"],
            "accuracy": {name: r["accuracy"] for name, r in e["results"].items()},
            "not_measured": [
                key
                for key, value in (("clean_acc", clean), ("autoattack_acc", robust))
                if value is None
            ],
            "checks": messages,
            "evaluation_examples": e["examples"],
            "autoattack_examples": e.get("autoattack_examples"),
            "evaluation_split": e["split"],
            "pretrained": s.get("pretrained"),
            "settings_hash": settings_hash(s),
            "model_dir": result.model_dir,
            "interpolation": (
                None
                if result.interpolation is None
                else {k: result.interpolation[k] for k in ("alpha", "endpoints")}
            ),
        },
    }
