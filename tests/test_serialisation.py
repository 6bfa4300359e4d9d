"""AdversarialTrainer and twins_tf models as Keras serialisables.

`trainer.save("x.keras")` + `keras.models.load_model` and `ModelCheckpoint("ckpt.keras")`
must give back the trainer as it was: the same configuration, the same outputs, every weight
(model, L2-SP anchors, the eval-attack counter) and the optimizer state (SGD momentum and the
step counter that seeds the random start).  The reference is the trainer that was saved; the
strongest check is that both then train on to the same weights, which only holds if the
momentum and the step counter came back.  A fresh Python process shows what a user without
`import twins_tf` gets.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_trainer import (
    ALPHA,
    BETA,
    EPS,
    L2SP_ALPHA,
    LAMBDA,
    LR,
    MOMENTUM,
    WD,
    _dataset,
    make_batches,
    small_pair,
)

from twins_tf import AdversarialTrainer
from twins_tf.attacks import PGD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(method, kind, seed=0):
    model, _ = small_pair(kind, seed=seed)
    # every hyperparameter off its default, and an eval attack "auto" would not derive, so a
    # value from_config drops shows as a different config
    trainer = AdversarialTrainer(
        model,
        method=method,
        attack=PGD(EPS, ALPHA, 2, random_start=True, seed=5),
        eval_attack=PGD(EPS / 2, ALPHA, 1, random_start=True, seed=7),
        lambda_twins=LAMBDA,
        beta=BETA / 2,
        weight_decay=WD,
        l2sp_alpha=L2SP_ALPHA,
    )
    trainer.compile(keras.optimizers.SGD(LR, momentum=MOMENTUM))
    return trainer


def _values(variables):
    return {v.path: np.asarray(v).copy() for v in variables}


def _as_json(config):
    """A config as the file holds it (tuples become lists)."""
    return json.loads(json.dumps(config))


def assert_same_trainer(loaded, saved, images):
    assert isinstance(loaded, AdversarialTrainer)
    assert _as_json(loaded.get_config()) == _as_json(saved.get_config())
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(saved(images)))
    for what in ("weights", "optimizer"):
        got = _values(loaded.weights if what == "weights" else loaded.optimizer.variables)
        want = _values(saved.weights if what == "weights" else saved.optimizer.variables)
        assert list(got) == list(want), what
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what}: {key}")


@pytest.mark.parametrize("method,kind", [("twins_trades", "twin"), ("l2sp", "plain")])
def test_keras_file_round_trip_keeps_weights_optimizer_and_config(tmp_path, method, kind):
    data = _dataset(make_batches(3, seed=11))
    ((x, _),) = make_batches(1, seed=12)
    trainer = _trainer(method, kind)
    trainer.fit(data, epochs=1, verbose=0, validation_data=data)
    assert int(trainer.optimizer.iterations) == 3
    assert int(trainer._eval_batches) == 3
    path = str(tmp_path / "trainer.keras")
    trainer.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.method is trainer.method
    assert loaded.attack.get_config() == trainer.attack.get_config()
    assert loaded.eval_attack.get_config() == trainer.eval_attack.get_config()
    assert_same_trainer(loaded, trainer, x)
    momentum = [v for v in loaded.optimizer.variables if "momentum" in v.path]
    assert momentum and any(np.abs(np.asarray(v)).sum() > 0 for v in momentum)
    if method == "l2sp":  # the anchors are the pre-trained start, not the trained weights
        anchors = [np.asarray(a) for a in loaded._l2sp_anchors]
        assert not all(
            np.array_equal(a, np.asarray(v)) for a, v in zip(anchors, loaded._l2sp_variables)
        )
    # the optimizer state came back: one more epoch gives the same weights on both sides
    logs = [
        t.fit(data, epochs=1, verbose=0, validation_data=data).history for t in (trainer, loaded)
    ]
    assert logs[0] == logs[1]
    for key, want in _values(trainer.weights).items():
        np.testing.assert_allclose(
            _values(loaded.weights)[key], want, rtol=1e-6, atol=1e-7, err_msg=key
        )


def test_model_checkpoint_saves_a_keras_file_every_epoch(tmp_path):
    data = _dataset(make_batches(2, seed=13))
    ((x, _),) = make_batches(1, seed=14)
    trainer = _trainer("twins_at", "twin", seed=1)
    pattern = str(tmp_path / "ckpt-{epoch}.keras")
    trainer.fit(data, epochs=2, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(pattern)])
    for epoch in (1, 2):
        assert os.path.getsize(pattern.format(epoch=epoch)) > 0
    assert_same_trainer(keras.models.load_model(pattern.format(epoch=2)), trainer, x)
    first = keras.models.load_model(pattern.format(epoch=1))
    assert int(first.optimizer.iterations) == 2


def test_an_unregistered_attack_is_a_clear_error_and_leaves_no_file(tmp_path):
    model, _ = small_pair("twin")

    def shift(model, images, labels):
        return tf.clip_by_value(images + EPS, 0.0, 1.0)

    trainer = AdversarialTrainer(model, method="twins_at", attack=shift)
    trainer.compile("sgd")
    path = tmp_path / "trainer.keras"
    with pytest.raises(
        ValueError, match="attack .* is not a registered Keras serialisable.*save_weights_only=True"
    ):
        trainer.save(str(path))
    assert not path.exists()


def test_keras_files_in_a_fresh_process_need_import_twins_tf(tmp_path):
    """A `.keras` file names twins_tf's classes (module and "twins_tf>" registered name), but
    Keras imports the module of a saved class only for its own packages (keras, keras_hub,
    keras_cv, keras_nlp): without `import twins_tf` the load fails with Keras's message, which
    names the module and says to import it; after `import twins_tf` (nothing more) a model
    file and a trainer file load, with identical outputs."""
    from twins_tf.models import build_resnet

    model = build_resnet("resnet18", 3, input_shape=(32, 32, 3))
    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    model.save(str(tmp_path / "resnet.keras"))
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "resnet_logits.npy", np.asarray(model(images)))
    trainer = _trainer("twins_at", "twin", seed=2)
    trainer.fit(_dataset(make_batches(1, seed=15)), verbose=0)
    trainer.save(str(tmp_path / "trainer.keras"))
    np.save(
        tmp_path / "trainer_logits.npy",
        np.asarray(trainer(tf.constant(make_batches(1, seed=16)[0][0]))),
    )
    np.save(tmp_path / "trainer_images.npy", make_batches(1, seed=16)[0][0])

    script = textwrap.dedent("""
        import sys
        import keras
        import numpy as np
        try:
            keras.models.load_model("resnet.keras")
            print("LOADED WITHOUT twins_tf")
        except TypeError as error:
            print("ERROR:", str(error).replace("\\n", " "))
        assert not [m for m in sys.modules if m.startswith("twins_tf")]
        import twins_tf
        model = keras.models.load_model("resnet.keras")
        np.testing.assert_array_equal(np.asarray(model(np.load("images.npy"))),
                                      np.load("resnet_logits.npy"))
        trainer = keras.models.load_model("trainer.keras")
        assert type(trainer).__name__ == "AdversarialTrainer", type(trainer)
        np.testing.assert_array_equal(np.asarray(trainer(np.load("trainer_images.npy"))),
                                      np.load("trainer_logits.npy"))
        print("LOADED AFTER import twins_tf")
    """)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "LOADED WITHOUT twins_tf" not in out
    error = next(line for line in out.splitlines() if line.startswith("ERROR:"))
    assert "Could not locate class 'ImageNetNormalization'" in error
    assert "make sure they are all imported" in error
    assert "'module': 'twins_tf.models.common'" in error
    assert "'registered_name': 'twins_tf>ImageNetNormalization'" in error
    assert "LOADED AFTER import twins_tf" in out
