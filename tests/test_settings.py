"""`training.Settings`: typed, frozen, checked; config.json round trip, old config.json files.

The expected values come from the documentation (the binaries' recipes in train.py /
pretrain.py and the README) and from a config.json written by hand in the format of runs
made before `Settings` existed, not from the code under test.
"""

import dataclasses
import json

import pytest
from absl import flags
from binaries_testlib import FINETUNE_ARGS, settings

from twins_tf.training import flags as flags_lib
from twins_tf.training import model_dir as model_dir_lib
from twins_tf.training.settings import Settings, SetupError

# The keys of a train run's config.json as twins_tf wrote it before Settings (one per train
# flag, plus the derived `twin` and `num_classes`), and those of a pretrain run.
TRAIN_CONFIG_KEYS = {
    "allow_random_init",
    "arch",
    "attack_eps",
    "attack_norm",
    "attack_step",
    "attack_steps",
    "batch_size",
    "beta",
    "binary",
    "data_dir",
    "dataset",
    "deterministic",
    "epochs",
    "image_size",
    "jit_compile",
    "l2sp_alpha",
    "lambda_twins",
    "lr",
    "lr_decay_epochs",
    "max_train_examples",
    "max_validation_examples",
    "method",
    "precision",
    "model_dir",
    "num_classes",
    "pretrained",
    "seed",
    "skip_bad_images",
    "strategy",
    "tfds_data_dir",
    "tpu_address",
    "train_per_class",
    "twin",
    "upsample",
    "validation",
    "weight_decay",
}
PRETRAIN_CONFIG_KEYS = TRAIN_CONFIG_KEYS - {"allow_random_init", "lambda_twins", "l2sp_alpha"}
# Keys train runs have written since --init (README: the init flag group), pretrain runs not.
INIT_CONFIG_KEYS = {"init", "init_epochs", "init_lr", "init_weight_decay", "stage"}


def test_the_binaries_recipes_are_the_defaults(tmp_path):
    pretrain = Settings(binary="pretrain", dataset="cifar10", model_dir=str(tmp_path))
    assert (
        pretrain.method,
        pretrain.arch,
        pretrain.epochs,
        pretrain.lr,
        pretrain.lr_decay_epochs,
        pretrain.weight_decay,
    ) == ("at", "resnet18", 100, 0.1, (50, 75), 5e-4)
    train = Settings(dataset="cifar10", model_dir=str(tmp_path), pretrained="x.weights.h5")
    assert (
        train.method,
        train.arch,
        train.epochs,
        train.lr,
        train.lr_decay_epochs,
        train.weight_decay,
        train.twin,
    ) == ("twins_at", "resnet50", 60, 0.003, (30, 50), 1e-3, True)
    # the dataset's input size and upsampling (CIFAR: 32 pixels, 7x nearest, README)
    assert (train.image_size, train.upsample) == (32, 7)
    assert (train.attack_eps, train.attack_step, train.attack_steps) == (8 / 255, 2 / 255, 10)


def test_settings_are_frozen_and_a_replacement_is_checked_again(tmp_path):
    s = Settings(binary="pretrain", dataset="cifar10", model_dir=str(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 3
    assert s.replace(epochs=3).epochs == 3 and s.epochs == 100
    with pytest.raises(SetupError, match="--epochs must be at least 1"):
        s.replace(epochs=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dataset=None), "--dataset is required"),
        (dict(dataset="imagenet22k"), "imagenet22k"),
        (dict(arch="resnet19"), "Unknown arch 'resnet19'"),
        (dict(method="twins_at", binary="pretrain"), "use python -m twins_tf.train"),
        (dict(method="nope"), "Unknown --method='nope' for train"),
        (dict(attack_eps=8.0), r"--attack_eps=8 is outside \[0, 1\]"),
        (dict(attack_step=-0.1), r"--attack_step=-0.1 is outside \[0, 1\]"),
        (dict(attack_steps=-1), "--attack_steps must be >= 0"),
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(batch_size=0), "--batch_size must be at least 1"),
        (dict(lr=0.0), "--lr must be positive"),
        (dict(weight_decay=-1e-3), "--weight_decay must be >= 0"),
        (dict(beta=-1.0), "--beta must be >= 0"),
        (dict(lambda_twins=-1.0), "--lambda_twins must be >= 0"),
        (dict(l2sp_alpha=-1.0), "--l2sp_alpha must be >= 0"),
        (dict(max_train_examples=0), "--max_train_examples must be at least 1"),
        (dict(lr_decay_epochs=("50", "30")), "--lr_decay_epochs must be increasing"),
        (dict(lr_decay_epochs=("x",)), "--lr_decay_epochs must be comma-separated"),
        (dict(pretrained=None), "fine-tunes a pre-trained model but no --pretrained"),
        (dict(model_dir=None), "--model_dir is required"),
        (dict(strategy="tpu", jit_compile="false"), "--strategy=tpu always compiles with XLA"),
        (dict(strategy="horovod"), "--strategy='horovod' is not one of"),
        (dict(epochs="10"), "--epochs must be an integer, got '10'"),
        (dict(lr=True), "--lr must be a number, got True"),
    ],
)
def test_every_wrong_value_is_a_one_line_setup_error(tmp_path, change, message):
    values = dict(
        dataset="cifar10", model_dir=str(tmp_path), pretrained="x.weights.h5", method="twins_at"
    )
    values.update(change)
    with pytest.raises(SetupError, match=message) as error:
        Settings(**values)
    assert "\n" not in str(error.value)


def test_an_unknown_key_is_refused():
    with pytest.raises(SetupError, match="unknown setting.*learning_rate"):
        Settings.from_dict({"dataset": "cifar10", "learning_rate": 0.1})


def test_config_json_round_trip_keeps_the_old_format(tmp_path):
    s = Settings.from_dict(
        settings("train", [*FINETUNE_ARGS, "--pretrained=x.weights.h5", f"--model_dir={tmp_path}"])
    ).replace(num_classes=5)
    model_dir_lib.write_config(str(tmp_path), s)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert set(stored) == TRAIN_CONFIG_KEYS | INIT_CONFIG_KEYS
    assert (stored["init"], stored["stage"]) == ("random", "main")
    assert stored["lr_decay_epochs"] == [] and stored["attack_eps"] == 8 / 255
    assert stored["twin"] is True and stored["num_classes"] == 5
    assert model_dir_lib.read_settings(str(tmp_path)) == s
    source = Settings(
        binary="pretrain", dataset="digits_0_4", model_dir=str(tmp_path / "p"), num_classes=5
    )
    model_dir_lib.write_config(str(tmp_path / "p"), source)
    assert set(json.loads((tmp_path / "p" / "config.json").read_text())) == (PRETRAIN_CONFIG_KEYS)


def test_a_config_json_written_before_the_newer_settings_reads_with_their_old_values(tmp_path):
    """A run from before --validation, --allow_random_init, --skip_bad_images and --init, and
    from when --precision was --mixed_precision (none = float32)."""
    old = {
        "arch": "resnet18",
        "attack_eps": 0.03137254901960784,
        "attack_step": 0.01568627450980392,
        "attack_steps": 1,
        "batch_size": 16,
        "beta": 6.0,
        "binary": "train",
        "data_dir": None,
        "dataset": "digits_5_9",
        "deterministic": False,
        "epochs": 2,
        "image_size": 16,
        "jit_compile": "auto",
        "l2sp_alpha": 0.01,
        "lambda_twins": 0.5,
        "lr": 0.01,
        "lr_decay_epochs": [],
        "max_train_examples": 64,
        "max_validation_examples": 32,
        "method": "twins_at",
        "mixed_precision": "none",  # the flag's earlier name and value (now --precision)
        "model_dir": str(tmp_path),
        "num_classes": 5,
        "pretrained": "/src/best.weights.h5",
        "seed": 7,
        "strategy": "default",
        "tfds_data_dir": None,
        "tpu_address": None,
        "train_per_class": None,
        "twin": True,
        "upsample": 1,
        "weight_decay": 0.0001,
    }
    (tmp_path / "config.json").write_text(json.dumps(old))
    s = model_dir_lib.read_settings(str(tmp_path))
    assert (s.validation, s.allow_random_init, s.skip_bad_images) == ("carve", False, False)
    assert (s.init, s.stage) == ("random", "main")
    assert (s.method, s.num_classes, s.lr_decay_epochs, s.attack_steps) == ("twins_at", 5, (), 1)
    assert s.precision == "float32"
    # and the run is the one these flags describe: it resumes
    now = settings(
        "train", [*FINETUNE_ARGS, "--pretrained=/src/best.weights.h5", f"--model_dir={tmp_path}"]
    )
    assert model_dir_lib.check_model_dir(
        str(tmp_path), Settings.from_dict(now).replace(num_classes=5)
    ) == ("resume")
    # a bfloat16 run of then is a mixed_bfloat16 run now (the step in bfloat16, attack float32)
    (tmp_path / "config.json").write_text(json.dumps({**old, "mixed_precision": "mixed_bfloat16"}))
    assert model_dir_lib.read_settings(str(tmp_path)).precision == "mixed_bfloat16"


def test_data_flags_for_evaluate_default_to_the_run(tmp_path):
    for from_run, skip_default in ((False, False), (True, None)):
        values = flags.FlagValues()
        names = flags_lib.define_data_flags(values, from_run=from_run)
        assert names == [
            "dataset",
            "data_dir",
            "tfds_data_dir",
            "image_size",
            "upsample",
            "train_per_class",
            "skip_bad_images",
        ]
        values(["evaluate"])
        assert values["skip_bad_images"].value is skip_default
        assert all(values[n].value is None for n in names[:-1])
        values(["evaluate", "--dataset=folder", "--image_size=64", "--skip_bad_images"])
        assert (values.dataset, values.image_size, values.skip_bad_images) == ("folder", 64, True)
