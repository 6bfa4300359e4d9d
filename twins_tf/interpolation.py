"""Robust weight-space interpolation between two runs (WiSE-FT / robust model soups).

    theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B

over *every* variable of the network, BatchNorm moving mean and variance included: the public
WiSE-FT code (mlfoundations/wise-ft, `src/wise_ft.py`) interpolates the whole PyTorch
`state_dict` key by key with this formula (parameters and buffers alike, no re-estimation of
the BN statistics), and that is what is followed here.  Each alpha of the grid is evaluated on
the runs' **validation** split (the one `python -m twins_tf.train` selects its best epoch on,
never the test split), clean and under the runs' own validation PGD (their `--attack_norm`,
`--attack_eps`, `--attack_step`, `--attack_steps`, no random start: spec §7), the best alpha
is picked on it, and that network is written as a run directory the other binaries accept
(`twins_tf.load_run`, `python -m twins_tf.evaluate`, `python -m twins_tf.export`).

Twin and plain runs: a TWINS run's network *as it is evaluated* is its Adaptive wing (spec §2:
inference uses the Adaptive wing's moving statistics only; the Frozen wing is a training-time
device).  So each run is loaded with `twins_tf.load_run` (which gives an AutoLoRa run's
main path, the network the paper evaluates, without the LoRA branch) and a twin model is
turned into that plain network with `twins_tf.untwin`;
the interpolation is between the two plain networks, variable by variable (matched by path),
and the output is a plain-BN run (config.json `twin: false`).  A twin run and a plain run
(e.g. a run's `init/` linear-probe sub-run) therefore interpolate like any two runs.

No library does this: Keras has no model arithmetic, and the papers' code is PyTorch loops
over a state_dict.  Output files (`output_dir`):

    config.json            run B's settings (by convention the fine-tuned end) with
                           `model_dir` = output_dir, `twin` = false and the validation attack
                           used: what `load_run` / `evaluate` / `export` rebuild the network
                           and its data from.  It is not a run `train` can resume (no
                           backup/; `twin` is the network written, whatever `method` says)
    best.weights.h5        the selected alpha's network; last.weights.h5 the same file (an
                           interpolation has no epochs, and `weights="last"` should not fail)
    interpolation.json     both sources (directory, weights file, sha256), the grid, the
                           selection rule, the validation examples, the attack and the table;
                           "unfinished": a source that had not finished (allow_unfinished)
    interpolation.png      clean and PGD validation accuracy against alpha
    tensorboard/           the same curves as TensorBoard scalars (step = grid index)

A second call with the same request (sources, weights and their sha256, grid, selection,
examples, attack) returns the stored result; a different request into an output_dir that holds
an interpolation is refused unless `overwrite=True` (never into a directory holding anything
else).

It is long because it does one job, `interpolate_runs`, end to end: checking the two runs,
walking the path, choosing the point and keeping the record; its parts have no other caller.
"""

import dataclasses
import hashlib
import os

import numpy as np

from twins_tf.accuracy import accuracy_counter, count_correct
from twins_tf.input_checks import NORM_NAMES, check_norm, check_pixel_budget
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError

INTERPOLATION_FILE = run_files.INTERPOLATION_FILE
PLOT_FILE = "interpolation.png"
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SELECTIONS = ("robust", "clean")
# The runs' network and data, which must agree for an interpolation to mean anything.
_SAME_KEYS = ("arch", "num_classes", "image_size", "upsample", "dataset", "train_per_class")
_ATTACK_KEYS = ("attack_norm", "attack_eps", "attack_step", "attack_steps")
TIE_RULE = (
    "the highest accuracy of the selected kind (PGD for robust, clean for clean); "
    "ties broken by the other accuracy, then by the smaller alpha (closer to run A)"
)


@dataclasses.dataclass(frozen=True)
class InterpolationRow:
    """One alpha of the grid: its validation accuracies (fractions in [0, 1])."""

    alpha: float
    clean_accuracy: float
    pgd_accuracy: float


@dataclasses.dataclass(frozen=True)
class InterpolationResult:
    """What `interpolate_runs` found and wrote.

    Attributes:
      rows: one `InterpolationRow` per alpha, in grid order.
      best_alpha: the selected alpha (its network is `output_dir`'s best.weights.h5).
      select: "robust" or "clean", the selection criterion.
      output_dir: the written run directory.
      validation_examples: how many validation examples each accuracy counts.
      attack: the validation PGD ({"attack_norm", "attack_eps", "attack_step",
        "attack_steps", "random_start"}) the PGD accuracies are under.
    """

    rows: tuple
    best_alpha: float
    select: str
    output_dir: str
    validation_examples: int
    attack: dict = None

    @property
    def best(self):
        """The selected alpha's row."""
        return next(row for row in self.rows if row.alpha == self.best_alpha)


def interpolate(weights_a, weights_b, alpha):
    """(1 - alpha) * a + alpha * b for each pair of float arrays (WiSE-FT's formula).

    Non-float arrays (none in twins_tf's networks) must be equal in both and are kept.
    """
    out = []
    for a, b in zip(weights_a, weights_b):
        if np.issubdtype(a.dtype, np.floating):
            out.append(((1.0 - alpha) * a + alpha * b).astype(a.dtype))
        else:
            out.append(a)
    return out


def select_alpha(rows, select="robust"):
    """The alpha of `rows` that `select` picks (see `TIE_RULE`)."""
    if select not in SELECTIONS:
        raise SetupError(f"select={select!r}: choose one of {', '.join(SELECTIONS)}.")
    robust = select == "robust"

    def key(row):
        first, second = (
            (row.pgd_accuracy, row.clean_accuracy)
            if robust
            else (row.clean_accuracy, row.pgd_accuracy)
        )
        return (first, second, -row.alpha)

    return max(rows, key=key).alpha


def check_alphas(alphas):
    """The grid as a tuple of floats; refuses an empty grid, a value outside [0, 1] or a repeat."""
    try:
        alphas = tuple(float(a) for a in alphas)
    except (TypeError, ValueError):
        raise SetupError(
            f"alphas={alphas!r} are not numbers; pass e.g. 0,0.25,0.5,0.75,1."
        ) from None
    if not alphas:
        raise SetupError("the alpha grid is empty; pass e.g. --alphas=0,0.25,0.5,0.75,1.")
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside:
        raise SetupError(
            f"alpha {outside[0]:g} is outside [0, 1] (0 is run A, 1 is run B); "
            "extrapolation is not offered."
        )
    if len(set(alphas)) != len(alphas):
        raise SetupError(
            f"the alpha grid {', '.join(f'{a:g}' for a in alphas)} names an alpha twice."
        )
    return alphas


def _source_config(model_dir, name):
    from twins_tf.training import runs

    try:
        config = runs.read_run_config(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise SetupError(f"{name}: {error}") from None
    weights = os.path.abspath(runs.run_weights_path(model_dir, "best"))
    if not os.path.isfile(weights):
        raise SetupError(
            f"{name}: {model_dir} holds no {run_files.BEST_WEIGHTS} (the run has "
            "not finished an epoch yet?)."
        )
    if config.get("validation", "carve") == "none":
        raise SetupError(
            f"{name}: the run in {model_dir} trained on the whole train split "
            "(--validation=none), so no validation split is held out from it to "
            "choose alpha on: interpolate runs trained with --validation=carve."
        )
    return config, weights


def _unfinished_sources(model_dir_a, model_dir_b, allow):
    """{"run_a"/"run_b": why} for the runs that have not finished; refuses them unless
    `allow`."""
    from twins_tf.evaluation.inputs import unfinished_run

    unfinished = {}
    for key, name, model_dir in (("run_a", "run A", model_dir_a), ("run_b", "run B", model_dir_b)):
        why = unfinished_run(model_dir)
        if why is None:
            continue
        if not allow:
            raise SetupError(
                f"{name}: {why}: its best weights are of its first epochs only; pass "
                "allow_unfinished=True (--allow_unfinished) to interpolate them anyway "
                "(interpolation.json records it)."
            )
        unfinished[key] = why
    return unfinished


def _check_compatible(config_a, config_b, model_dir_a, model_dir_b):
    for key in _SAME_KEYS:
        if config_a.get(key) != config_b.get(key):
            raise SetupError(
                f"the runs differ in {key} ({config_a.get(key)!r} in {model_dir_a}, "
                f"{config_b.get(key)!r} in {model_dir_b}): only runs of the same "
                "architecture, head, input size and dataset interpolate."
            )


def _attack_settings(config_a, config_b, overrides):
    """The validation PGD that chooses alpha: each of `_ATTACK_KEYS` as given, else the runs'
    (which must agree).  A run without `attack_norm` (older than it) trained at L-inf; a norm
    other than the runs' needs its own radius and step, since theirs are in their norm."""
    runs = [{"attack_norm": "linf", **config} for config in (config_a, config_b)]
    attack = {}
    for key in _ATTACK_KEYS:
        if overrides.get(key) is not None:
            attack[key] = overrides[key]
        elif runs[0].get(key) != runs[1].get(key):
            raise SetupError(
                f"the runs validate with different {key} ({runs[0].get(key)!r} "
                f"and {runs[1].get(key)!r}): pass {key}= (--{key}) to say which "
                "PGD chooses alpha."
            )
        else:
            attack[key] = runs[0][key]
    norm = attack["attack_norm"] = check_norm(
        attack["attack_norm"], "attack_norm", error=SetupError
    )
    run_norm = check_norm(runs[0]["attack_norm"], "the runs' attack_norm", error=SetupError)
    for key in ("attack_eps", "attack_step"):
        if norm != run_norm and overrides.get(key) is None:
            raise SetupError(
                f"attack_norm={norm}: the runs' {key} is an {NORM_NAMES[run_norm]} one; pass "
                f"{key}= (--{key}) in {NORM_NAMES[norm]} units."
            )
        check_pixel_budget(
            attack[key],
            key,
            norm=norm,
            given_as="flag",
            error=SetupError,
            image_shape=(config_a["image_size"], config_a["image_size"], 3),
        )
    if int(attack["attack_steps"]) < 1:
        raise SetupError("attack_steps must be at least 1.")
    return attack


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored_result(output_dir, request, overwrite):
    """The stored result for the same request, None for a fresh output_dir (or an earlier
    interpolation to overwrite); refuses anything else."""
    path = os.path.join(output_dir, INTERPOLATION_FILE)
    if os.path.isfile(path):
        import json

        with open(path) as f:
            stored = json.load(f)
        if stored.get("request") == request and os.path.isfile(
            os.path.join(output_dir, run_files.BEST_WEIGHTS)
        ):
            return _result_from_record(stored, output_dir)
        if overwrite:
            return None
        raise SetupError(
            f"output_dir={output_dir} holds another interpolation (other sources, "
            "weights, grid, selection, examples or attack); refusing to overwrite "
            "it: use a new output_dir or overwrite=True (--overwrite)."
        )
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise SetupError(
            f"output_dir={output_dir} exists and is not empty; refusing to "
            "overwrite it: use a new output_dir."
        )
    return None


def _result_from_record(record, output_dir):
    rows = tuple(InterpolationRow(**row) for row in record["rows"])
    return InterpolationResult(
        rows=rows,
        best_alpha=record["best_alpha"],
        select=record["request"]["select"],
        output_dir=output_dir,
        validation_examples=record["validation"]["examples"],
        attack=dict(record["attack"]),
    )


def plain_network(model_dir):
    """The network of the run in `model_dir` as it is evaluated: `load_run`'s best weights,
    through `untwin` when the run is a twin one (its Adaptive wing)."""
    from twins_tf.layers import twin_layers
    from twins_tf.training import runs
    from twins_tf.twinify import untwin

    try:
        model = runs.load_run(model_dir, "best")
    except (FileNotFoundError, ValueError) as error:
        raise SetupError(str(error)) from None
    return untwin(model) if twin_layers(model) else model


def _weights_by_path(model):
    return {variable.path: variable for variable in model.weights}


def _validation_batches(config, examples, batch_size):
    """The batches the alphas are chosen on and their count: run A's carved validation split
    (`examples` of it, class-stratified; all when None), loaded as an evaluation loads a split."""
    from twins_tf.evaluation.inputs import load_examples

    settings = {
        "dataset": config["dataset"],
        "image_size": config["image_size"],
        "upsample": config["upsample"],
        **{
            key: config.get(key)
            for key in ("data_dir", "tfds_data_dir", "train_per_class", "skip_bad_images")
        },
        "num_classes": int(config["num_classes"]),
        "split": "validation",
        "max_examples": examples,
        "batch_size": batch_size,
    }
    return load_examples(settings, whose_classes="the runs have")


def _accuracy(counter, batches):
    correct, total = count_correct(counter, batches)
    return correct / total if total else float("nan")


def _write_plot(path, rows, best_alpha, select):
    import matplotlib

    matplotlib.use("Agg")  # no screen; PNG only
    from matplotlib import pyplot

    alphas = [row.alpha for row in rows]
    figure, axis = pyplot.subplots(figsize=(6, 4))
    axis.plot(alphas, [100 * row.clean_accuracy for row in rows], marker="o", label="clean")
    axis.plot(alphas, [100 * row.pgd_accuracy for row in rows], marker="o", label="PGD")
    axis.axvline(
        best_alpha, color="grey", linestyle="--", label=f"selected ({select}): alpha {best_alpha:g}"
    )
    axis.set_xlabel("alpha  (0: run A, 1: run B)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("Weight-space interpolation")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _verbosity(verbose):
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):
        raise SetupError(f"verbose={verbose!r}: use 'auto', 0, 1 or 2.")
    return verbose


def interpolate_runs(
    model_dir_a,
    model_dir_b,
    output_dir,
    *,
    alphas=DEFAULT_ALPHAS,
    select="robust",
    validation_examples=None,
    batch_size=None,
    verbose="auto",
    attack_eps=None,
    attack_step=None,
    attack_steps=None,
    attack_norm=None,
    overwrite=False,
    allow_unfinished=False,
):
    """Interpolates run A and run B in weight space; writes the best-on-validation point.

    Args:
      model_dir_a, model_dir_b: two train/pretrain runs (or sub-runs such as `<run>/init`) of
        the same arch, class count, input size and dataset; their best weights are used.
        alpha 0 is A, alpha 1 is B.
      output_dir: the run directory to write (new or empty; or holding this very request,
        which is then returned without recomputation).
      alphas: the grid, values in [0, 1] (default 0, 0.1, ..., 1).
      select: "robust" (highest validation PGD accuracy) or "clean"; ties: `TIE_RULE`.
      validation_examples: a class-stratified subset of the validation split (as the train
        binary's `--max_validation_examples`); None: run A's `max_validation_examples`
        (all when that is unset).
      batch_size: evaluation batch size; None: run A's.
      verbose: "auto" or 1 (progress bar over the alphas), 2 (one line at the end), 0.
      attack_eps, attack_step, attack_steps, attack_norm: the validation PGD; None: the
        runs' (which must then agree; a norm other than theirs needs attack_eps and
        attack_step too).
      overwrite: replace an earlier interpolation (a different request) in output_dir.
      allow_unfinished: interpolate a run that has not finished (no summary.json: killed or
        still training), whose best weights are of its first epochs only; refused otherwise.
        interpolation.json records it ("unfinished").

    Returns:
      An `InterpolationResult`.

    Raises:
      SetupError: a missing or unfinished run, runs that do not match, a bad grid or
        selection, or a used output_dir; all before any evaluation.
    """
    import keras

    model_dir_a, model_dir_b = os.fspath(model_dir_a), os.fspath(model_dir_b)
    output_dir = os.path.abspath(os.fspath(output_dir))
    config_a, weights_a = _source_config(model_dir_a, "run A")
    config_b, weights_b = _source_config(model_dir_b, "run B")
    _check_compatible(config_a, config_b, model_dir_a, model_dir_b)
    unfinished = _unfinished_sources(model_dir_a, model_dir_b, allow_unfinished)
    if output_dir in (os.path.abspath(model_dir_a), os.path.abspath(model_dir_b)):
        raise SetupError(
            "output_dir is one of the two runs; write the interpolation to a new directory."
        )
    alphas = check_alphas(alphas)
    if select not in SELECTIONS:
        raise SetupError(f"select={select!r}: choose one of {', '.join(SELECTIONS)}.")
    if validation_examples is None:
        validation_examples = config_a.get("max_validation_examples")
    if validation_examples is not None and int(validation_examples) < 1:
        raise SetupError("validation_examples must be at least 1 (or None: the run's).")
    batch_size = int(config_a.get("batch_size") or 128) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise SetupError("batch_size must be at least 1.")
    verbose = _verbosity(verbose)
    attack = _attack_settings(
        config_a,
        config_b,
        dict(
            attack_norm=attack_norm,
            attack_eps=attack_eps,
            attack_step=attack_step,
            attack_steps=attack_steps,
        ),
    )
    request = {
        "run_a": {
            "model_dir": os.path.abspath(model_dir_a),
            "weights": weights_a,
            "sha256": _sha256(weights_a),
        },
        "run_b": {
            "model_dir": os.path.abspath(model_dir_b),
            "weights": weights_b,
            "sha256": _sha256(weights_b),
        },
        "alphas": list(alphas),
        "select": select,
        "validation_examples": None if validation_examples is None else int(validation_examples),
        "attack": attack,
    }
    stored = _stored_result(output_dir, request, overwrite)
    if stored is not None:
        return stored
    for name, why in unfinished.items() if verbose else ():
        print(f"warning: {name}: {why}; interpolating its weights as they are.", flush=True)

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # evaluate's arithmetic, whatever the runs used
    try:
        return _run(config_a, config_b, request, output_dir, batch_size, verbose, unfinished)
    finally:
        keras.config.set_dtype_policy(policy)


def _run(config_a, config_b, request, output_dir, batch_size, verbose, unfinished):
    import keras
    import tensorflow as tf

    from twins_tf.attacks.pgd import PGD

    model_a = plain_network(request["run_a"]["model_dir"])
    model_b = plain_network(request["run_b"]["model_dir"])
    by_path_a, by_path_b = _weights_by_path(model_a), _weights_by_path(model_b)
    if sorted(by_path_a) != sorted(by_path_b):
        raise SetupError(
            "the runs' networks hold different variables (not the same "
            "architecture after untwin); they cannot interpolate."
        )
    paths = list(by_path_a)
    values_a = [by_path_a[p].numpy() for p in paths]
    values_b = [by_path_b[p].numpy() for p in paths]
    for path, a, b in zip(paths, values_a, values_b):
        if not np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, b):
            raise SetupError(
                f"the runs differ in the non-float variable {path}; cannot interpolate it."
            )
    del model_b
    batches, count = _validation_batches(config_a, request["validation_examples"], batch_size)
    attack = request["attack"]
    pgd = PGD(
        attack["attack_eps"],
        attack["attack_step"],
        int(attack["attack_steps"]),
        norm=attack["attack_norm"],
        random_start=False,
        seed=int(config_a.get("seed") or 0),
    )
    # One compiled counter each, reused along the path: they read the variables assigned below.
    clean_counter = accuracy_counter(model_a, None)
    pgd_counter = accuracy_counter(model_a, pgd)
    targets = [by_path_a[p] for p in paths]

    alphas = request["alphas"]
    progress = (
        keras.utils.Progbar(
            len(alphas), verbose=verbose, stateful_metrics=["alpha", "clean", "pgd"]
        )
        if verbose
        else None
    )
    rows = []
    for index, alpha in enumerate(alphas):
        for variable, value in zip(targets, interpolate(values_a, values_b, alpha)):
            variable.assign(value)
        rows.append(
            InterpolationRow(
                alpha=alpha,
                clean_accuracy=_accuracy(clean_counter, batches),
                pgd_accuracy=_accuracy(pgd_counter, batches),
            )
        )
        if progress is not None:
            progress.update(
                index + 1,
                values=[
                    ("alpha", alpha),
                    ("clean", rows[-1].clean_accuracy),
                    ("pgd", rows[-1].pgd_accuracy),
                ],
            )
    best_alpha = select_alpha(rows, request["select"])

    os.makedirs(output_dir, exist_ok=True)
    _remove_earlier_interpolation(output_dir)  # overwrite=True; nothing there otherwise
    _write_tensorboard(os.path.join(output_dir, run_files.TENSORBOARD_DIR), rows, tf)
    for variable, value in zip(targets, interpolate(values_a, values_b, best_alpha)):
        variable.assign(value)
    model_a.save_weights(os.path.join(output_dir, run_files.BEST_WEIGHTS))
    model_a.save_weights(os.path.join(output_dir, run_files.LAST_WEIGHTS))
    config = {**config_b, **request["attack"], "model_dir": output_dir, "twin": False}
    run_files.write_json(os.path.join(output_dir, run_files.CONFIG_FILE), config)
    _write_plot(os.path.join(output_dir, PLOT_FILE), rows, best_alpha, request["select"])
    record = {
        "request": request,
        "formula": "theta = (1 - alpha) * theta_A + alpha * theta_B over every variable of the "
        "evaluated (untwinned) network, BN moving statistics included (WiSE-FT)",
        "validation": {
            "split": "validation",
            "dataset": config_a["dataset"],
            "examples": count,
            "batch_size": batch_size,
        },
        "attack": {**request["attack"], "random_start": False},
        "tie_rule": TIE_RULE,
        "rows": [dataclasses.asdict(row) for row in rows],
        "best_alpha": best_alpha,
        # the sources that had not finished (allow_unfinished), with why: {"run_a": ...}
        "unfinished": unfinished,
    }
    # Written last: its presence says the output_dir is complete (see _stored_result).
    run_files.write_json(os.path.join(output_dir, INTERPOLATION_FILE), record)
    return _result_from_record(record, output_dir)


def _remove_earlier_interpolation(output_dir):
    """Removes what an earlier `interpolate_runs` wrote (its record first: an interrupted
    rewrite must not look complete) and the evaluation reports of its network, now gone."""
    import shutil

    from twins_tf.evaluation.inputs import REPORT_PREFIX

    reports = [n for n in os.listdir(output_dir) if n.startswith(REPORT_PREFIX)]
    for name in (
        INTERPOLATION_FILE,
        run_files.BEST_WEIGHTS,
        run_files.LAST_WEIGHTS,
        run_files.CONFIG_FILE,
        PLOT_FILE,
        *reports,
    ):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    shutil.rmtree(os.path.join(output_dir, run_files.TENSORBOARD_DIR), ignore_errors=True)


def _write_tensorboard(log_dir, rows, tf):
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for step, row in enumerate(rows):
            tf.summary.scalar("interpolation/alpha", row.alpha, step=step)
            tf.summary.scalar("interpolation/val_clean_accuracy", row.clean_accuracy, step=step)
            tf.summary.scalar("interpolation/val_pgd_accuracy", row.pgd_accuracy, step=step)
    writer.close()
