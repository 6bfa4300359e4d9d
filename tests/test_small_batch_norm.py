"""BatchNorm batch statistics of too few values: warned at start-up, named when a run diverges.

A new user's `train --batch_size=4` on 16-pixel digits diverged (6.6 -> 8128 -> 3.5e27 -> NaN)
and the message blamed the source's BN statistics or the learning rate while printing a
normal Frozen-wing logit: the cause was 2 images per BN wing at ResNet-18's 1x1 last stage,
so each Adaptive wing normalised every channel with the mean and variance of 2 numbers.
"""

import re

import numpy as np
import pytest
from binaries_testlib import TINY, settings

from twins_tf.models import build_resnet
from twins_tf.training import loop, run_callbacks


@pytest.fixture(scope="module")
def twin16():
    return build_resnet("resnet18", 5, twin=True, input_shape=(16, 16, 3), upsample=1)


def test_the_threshold_is_where_the_variance_s_standard_error_passes_50_percent():
    m = run_callbacks.BN_MIN_VALUES
    assert np.sqrt(2 / (m - 1)) <= 0.5 < np.sqrt(2 / (m - 2))


@pytest.mark.parametrize(
    "twin, batch_size, replicas, values",
    [
        (True, 4, 1, 2),  # the new user's run: 2 images per wing x the 1x1 map
        (True, 16, 1, 8),
        (True, 32, 1, 16),
        (True, 32, 2, 8),  # each replica splits its own 16
        (False, 4, 1, 4),
    ],
)
def test_the_fewest_values_are_counted_at_the_smallest_map(twin, batch_size, replicas, values):
    model = build_resnet("resnet18", 5, twin=twin, input_shape=(16, 16, 3), upsample=1)
    found = run_callbacks.batch_norm_batch(model, batch_size, replicas)
    assert (found.values, found.map_size, found.twin) == (values, "1x1", twin)
    assert found.layer.startswith(("layer3", "layer4"))  # 1x1 from layer3 on at 16 px
    assert found.too_few == (values < run_callbacks.BN_MIN_VALUES)
    bigger = build_resnet("resnet18", 5, twin=twin, input_shape=(64, 64, 3), upsample=1)
    assert run_callbacks.batch_norm_batch(bigger, batch_size, replicas).values == 4 * values


def test_synchronized_and_frozen_layers():
    plain = build_resnet(
        "resnet18", 5, twin=False, input_shape=(16, 16, 3), upsample=1, synchronized=True
    )
    assert run_callbacks.batch_norm_batch(plain, 8, 2).images == 8  # every replica's batch
    for layer in plain.layers:
        layer.trainable = False
    assert run_callbacks.batch_norm_batch(plain, 8, 2) is None  # inference mode


def _diverge(callback):
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    with pytest.raises(run_callbacks.DivergenceError) as error:
        callback.on_train_batch_end(2, {"loss": float("nan")})
    return str(error.value)


def test_the_divergence_message_names_the_measured_cause(twin16):
    few = run_callbacks.batch_norm_batch(twin16, 4, 1)
    probe = np.random.default_rng(0).random((8, 16, 16, 3)).astype("float32")
    message = _diverge(
        run_callbacks.StopOnDivergence(twin16, 4, probe=probe, lr=0.01, bn_batch=few)
    )
    assert re.search(
        r"the Frozen wing's max \|logit\| on a batch of the task's images was \S+ at the "
        r"start, a normal value; likely the BatchNorm batch statistics from 2 value\(s\) per "
        r"channel at layer\S+ \(2 image\(s\) per wing per replica x its 1x1 map\), fewer "
        r"than 9: statistics of so few values are noise; raise --batch_size",
        message,
    ), message
    assert "learning rate" not in message and "\n" not in message
    enough = run_callbacks.batch_norm_batch(twin16, 64, 1)
    message = _diverge(
        run_callbacks.StopOnDivergence(twin16, 4, probe=probe, lr=0.01, bn_batch=enough)
    )
    assert "BatchNorm batch statistics from" not in message
    assert "a learning rate too high (--lr=0.01)" in message
    plain = build_resnet("resnet18", 5, twin=False, input_shape=(16, 16, 3), upsample=1)
    message = _diverge(
        run_callbacks.StopOnDivergence(
            plain, 4, lr=0.01, bn_batch=run_callbacks.batch_norm_batch(plain, 4, 1)
        )
    )
    assert "likely the BatchNorm batch statistics from 4 value(s) per channel" in message


def test_start_up_warns_with_the_numbers(tmp_path, capsys):
    args = [
        "--dataset=digits_5_9",
        *TINY,
        "--method=twins_at",
        "--allow_random_init",
        "--batch_size=4",
        f"--model_dir={tmp_path / 'run'}",
    ]
    prepared = loop.prepare(settings("train", args))
    out = capsys.readouterr().out
    assert re.search(
        r"^train: warning: BatchNorm batch statistics from 2 value\(s\) per channel at "
        r"layer\S+ \(2 image\(s\) per wing per replica x its 1x1 map\), fewer than 9",
        out,
        re.M,
    ), out
    assert prepared.bn_batch.values == 2
    loop.prepare(settings("train", [*args[:-2], "--batch_size=64", f"--model_dir={tmp_path}/b"]))
    assert "warning: BatchNorm" not in capsys.readouterr().out
