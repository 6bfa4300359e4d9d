"""A model card per run of a comparison: RobustBench's fields, plus how to reproduce the run.

A table says which row is ahead; a card says what one run is (its accuracies, threat model,
architecture, dataset, method, seed, source weights and a hash of its settings), so a model
that leaves the comparison directory can be traced back to the run that made it.
"""

from twins_tf.comparison.rows import settings_hash
from twins_tf.evaluation.inputs import AUTOATTACK, CLEAN


def model_card(result):
    """RobustBench's model-card fields for one run, plus how to reproduce it."""
    s = result.settings
    return {
        "clean_acc": result.accuracy(CLEAN),
        "autoattack_acc": result.accuracy(AUTOATTACK),
        "pgd_acc": {
            k: v["accuracy"] for k, v in result.evaluation["results"].items() if k.startswith("pgd")
        },
        "eps": result.evaluation["epsilon"],
        "norm": "Linf",
        "architecture": s["arch"],
        "dataset": s["dataset"],
        "number_forward_passes": 1,
        "evaluation_examples": result.evaluation["examples"],
        "autoattack_examples": result.evaluation.get("autoattack_examples"),
        "evaluation_split": result.evaluation["split"],
        "method": s.get("method"),
        "row": result.method,
        "seed": result.seed,
        "pretrained": s.get("pretrained"),
        "settings_hash": settings_hash(s),
        "model_dir": result.model_dir,
        "interpolation": (
            None
            if result.interpolation is None
            else {k: result.interpolation[k] for k in ("alpha", "endpoints")}
        ),
    }
