"""The report of a comparison: the table, plots, model cards and one self-contained HTML page.

Plots (matplotlib, PNG) of the per-epoch training and validation accuracies (mean line and
min-max band over seeds), of the two wings' training accuracy for twin methods (the paper's
argument is about them), and of final clean against robust accuracy, all embedded in one
`report.html` that opens offline and can be mailed, beside `report.json`, `report.txt` and a
model card per run.

The curves put methods on one axis, so each is a metric with one meaning for every method
(`AdversarialTrainer.METRICS`: the evaluated network in inference mode).  Runs written before
the metrics had one meaning are read by what their columns meant: a renamed column of the
same quantity under its earlier name, and not at all the training `clean_acc` / `adv_acc`,
which then came from the training forward for some methods.
"""

import base64
import html
import io
import os

import numpy as np

from twins_tf.comparison.cards import EXTRA_KEY as CARD_EXTRA_KEY
from twins_tf.comparison.cards import card_path, model_card, run_norm
from twins_tf.comparison.statistics import format_table, summarise
from twins_tf.evaluation.inputs import CLEAN
from twins_tf.input_checks import threat_model_text
from twins_tf.training import model_dir as run_files

REPORT_DIR = "report"
# Per-epoch curves of metrics.csv: column -> title.
CURVES = {
    "clean_acc": "train clean accuracy (inference mode)",
    "adv_acc": "train PGD accuracy (inference mode)",
    "val_clean_acc": "validation clean accuracy",
    "val_adv_acc": "validation PGD accuracy",
}
WING_CURVES = {"frozen_adv_acc": "Frozen wing", "adaptive_adv_acc": "Adaptive wing"}
# Earlier names of columns whose quantity is unchanged.
EARLIER_NAMES = {
    "frozen_adv_acc": "frozen_acc",
    "adaptive_adv_acc": "adaptive_acc",
    "val_clean_loss": "val_loss",
}
# Training columns measured in inference mode only in rows that also have this column.
INFERENCE_MODE_TRAIN = {"clean_acc", "adv_acc"}
INFERENCE_MODE_MARKER = "clean_loss"


def metric_value(row, column):
    """A metrics.csv row's value of `column` as the current metrics define it, or None: an
    earlier name of the same quantity is read, a column that meant something else is not."""
    if column in INFERENCE_MODE_TRAIN and INFERENCE_MODE_MARKER not in row:
        return None
    if column in row:
        return row[column]
    return row.get(EARLIER_NAMES.get(column))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen; PNG only
    from matplotlib import pyplot

    return pyplot


def _curves_by_method(results, column):
    """{method: (epochs, array seeds x epochs)} of a metrics.csv column, where present."""
    curves = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        rows = [[metric_value(row, column) for row in r.metrics] for r in runs]
        if not rows or any(not row or any(not isinstance(v, float) for v in row) for row in rows):
            continue
        length = min(len(row) for row in rows)
        curves[method] = (np.arange(1, length + 1), np.array([row[:length] for row in rows]))
    return curves


def _band_plot(axis, curves, title):
    for method, (epochs, values) in curves.items():
        (line,) = axis.plot(epochs, 100 * values.mean(axis=0), marker="o", label=method)
        if len(values) > 1:
            axis.fill_between(
                epochs,
                100 * values.min(axis=0),
                100 * values.max(axis=0),
                color=line.get_color(),
                alpha=0.2,
            )
    from matplotlib.ticker import MaxNLocator

    if not curves:
        axis.text(
            0.5,
            0.5,
            "not recorded by these runs",
            ha="center",
            va="center",
            transform=axis.transAxes,
            color="grey",
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize="small")


def plot_curves(results):
    """Figure: per-epoch training and validation accuracy, mean and min-max band over seeds."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(2, 2, figsize=(10, 7))
    for axis, (column, title) in zip(axes.flat, CURVES.items()):
        _band_plot(axis, _curves_by_method(results, column), title)
    figure.tight_layout()
    return figure


def plot_wings(results):
    """Figure: each twin row's Frozen and Adaptive wing PGD accuracy in the training forward
    (each wing's half of the batch); None if no row has wings.

    Twin rows are those trained with a twin method (a variant of one too); an interpolation
    row trains nothing and has no wings' curves."""
    twin_methods = [
        m
        for m in dict.fromkeys(
            r.method for r in results if r.settings.get("twin") and r.interpolation is None
        )
    ]
    if not twin_methods:
        return None
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(
        1, len(twin_methods), figsize=(5 * len(twin_methods), 3.8), squeeze=False
    )
    for axis, method in zip(axes.flat, twin_methods):
        runs = [r for r in results if r.method == method]
        curves = {
            label: _curves_by_method(runs, column).get(method)
            for column, label in WING_CURVES.items()
        }
        _band_plot(
            axis,
            {k: v for k, v in curves.items() if v is not None},
            f"{method}: PGD accuracy per wing (training forward)",
        )
    figure.tight_layout()
    return figure


def plot_scatter(results, robust_attack):
    """Figure: final clean against robust test accuracy, one point per run."""
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(5.5, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        axis.scatter(
            [100 * r.accuracy(CLEAN) for r in runs],
            [100 * r.accuracy(robust_attack) for r in runs],
            label=method,
            s=40,
        )
    axis.set_xlabel("clean accuracy (%)")
    axis.set_ylabel(f"{robust_attack} accuracy (%)")
    axis.set_title("test accuracy, one point per seed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _png(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return data


def threat_models(results):
    """{row: the threat model its runs were evaluated in, as tables print it ("L-inf eps
    8/255", "L2 eps 0.5")}: the rows of one comparison may differ (`at+attack_norm=l2`)."""
    models = {}
    for result in results:
        epsilon = result.evaluation.get("epsilon")
        if epsilon is not None:
            text = threat_model_text(run_norm(result), epsilon)
            models.setdefault(result.method, [])
            if text not in models[result.method]:
                models[result.method].append(text)
    return {row: ", ".join(texts) for row, texts in models.items()}


def threat_model_lines(models):
    """The table's last lines: one when every row shares a threat model, else one per row."""
    if not models:
        return []
    if len(set(models.values())) == 1:
        return [f"threat model: {next(iter(models.values()))}"]
    return ["threat models:"] + [f"  {row}: {text}" for row, text in models.items()]


def write_report(results, attacks, baseline, report_dir, *, title="twins_tf comparison"):
    """Writes report.json, report.txt, the PNGs, report.html and model_cards/; returns the summary.

    The table ends with the threat model (norm and radius) the accuracies are under, and
    report.json keeps it per row (`threat_models`).  The HTML embeds the PNGs as data URIs, so
    the single file opens offline and can be mailed.
    """
    os.makedirs(report_dir, exist_ok=True)
    summary = summarise(results, attacks, baseline)
    models = threat_models(results)
    summary["threat_models"] = models
    table = "\n".join([format_table(summary, attacks), *threat_model_lines(models)])
    run_files.write_json(os.path.join(report_dir, "report.json"), summary)
    with open(os.path.join(report_dir, "report.txt"), "w") as f:
        f.write(table + "\n")
    cards = {}
    for result in results:
        card = model_card(result)
        cards[f"{result.method}_seed{result.seed}"] = card
        path = os.path.join(report_dir, card_path(result))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        run_files.write_json(path, card)
    robust = next((a for a in attacks if a != CLEAN), None)
    figures = {
        "curves.png": ("Per-epoch accuracy (mean, band: min-max over seeds)", plot_curves(results))
    }
    wings = plot_wings(results)
    if wings is not None:
        figures["wings.png"] = (
            "PGD accuracy of each wing in the training forward (twin methods)",
            wings,
        )
    if robust is not None and CLEAN in attacks:
        figures["scatter.png"] = (
            "Clean against robust test accuracy",
            plot_scatter(results, robust),
        )
    images = []
    for name, (caption, figure) in figures.items():
        data = _png(figure, os.path.join(report_dir, name))
        images.append(
            f"<h2>{html.escape(caption)}</h2>\n<img alt='{name}' "
            f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        )
    card_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{c['clean_acc'] or 'n/a'}</td>"
        f"<td>{c['autoattack_acc'] or 'n/a'}</td>"
        f"<td>{html.escape(str(c[CARD_EXTRA_KEY]['settings_hash'][:12]))}</td></tr>"
        for k, c in cards.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title></head><body><h1>{html.escape(title)}</h1>\n"
        f"<pre>{html.escape(table)}</pre>\n"
        + "\n".join(images)
        + "\n<h2>Model cards</h2><table border='1'><tr><th>run</th><th>clean %</th>"
        f"<th>AutoAttack %</th><th>settings</th></tr>{card_rows}</table></body></html>\n"
    )
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(page)
    return summary, table
