"""Square Attack against independent references.

* the p schedule against the paper's table, and the side lengths it gives;
* the L2 bump against a loop-by-loop construction of the concentric rectangles;
* seeded runs repeat, and bad arguments fail clearly.
The p schedule and window sizes against the official code's, and robust accuracy against the
official Square (fra31/auto-attack) on the same network, are in `test_autoattack_official.py`.
"""

import attack_testbed as tb
import numpy as np
import pytest

from twins_tf.attacks import Square
from twins_tf.attacks.square import bump, p_schedule


def paper_p(iteration, p_init=0.8):
    """Andriushchenko et al. 2020, the schedule of their code for 10,000 iterations."""
    table = [
        (0, 10, 1),
        (11, 50, 2),
        (51, 200, 4),
        (201, 500, 8),
        (501, 1000, 16),
        (1001, 2000, 32),
        (2001, 4000, 64),
        (4001, 6000, 128),
        (6001, 8000, 256),
    ]
    for first, last, divisor in table:
        if first <= iteration <= last:
            return p_init / divisor
    return p_init / 512


@pytest.mark.parametrize(
    "iteration",
    [
        0,
        10,
        11,
        50,
        51,
        200,
        201,
        499,
        500,
        501,
        1000,
        1001,
        2000,
        3999,
        4000,
        4001,
        4999,
        6000,
        8000,
        8001,
        9999,
    ],
)
def test_p_schedule_is_the_papers(iteration):
    assert p_schedule(iteration, 0.8, 5000) == pytest.approx(paper_p(iteration))
    # rescaled to a 1000-query budget: iteration i behaves like 10 i
    assert p_schedule(iteration // 10, 0.8, 1000, rescale=True) == pytest.approx(
        paper_p(iteration // 10 * 10)
    )


def test_phases_cover_the_query_budget():
    square = Square(0.1, n_queries=5000)
    phases = square.phases(32, 32)
    assert phases[0][0] == 0 and sum(count for _, count, _ in phases) == 5000  # after the start
    for first, count, side in phases:
        for iteration in (first, first + count - 1):
            want = int(round(np.sqrt(paper_p(iteration) * 32 * 32)))
            assert side == min(max(want, 1), 31)


def loop_rectangles(rows, cols):
    """The concentric rectangles, drawn one ring at a time as the paper's code does."""
    patch = np.zeros([rows, cols])
    centre_r, centre_c = rows // 2, cols // 2
    for ring in range(max(centre_r, centre_c) + 1):
        patch[
            max(centre_r - ring, 0) : min(centre_r + ring + 1, rows),
            max(centre_c - ring, 0) : min(centre_c + ring + 1, cols),
        ] += 1.0 / (ring + 1) ** 2
    return patch / np.sqrt(np.sum(patch**2))


@pytest.mark.parametrize("side", [3, 5, 6, 11, 29])
def test_bump_is_two_opposite_rectangle_stacks(side):
    want = np.zeros([side, side])
    want[: side // 2] = loop_rectangles(side // 2, side)
    want[side // 2 :] = -loop_rectangles(side - side // 2, side)
    want /= np.sqrt(np.sum(want**2))
    np.testing.assert_allclose(bump(side), want, atol=1e-6)


def test_seeded_runs_repeat():
    bed = tb.robust_digits()
    x, y = bed.x_test[:50], bed.y_test[:50]
    square = Square(tb.epsilon("l2"), norm="l2", n_queries=50)
    np.testing.assert_array_equal(
        square(bed.keras_model, x, y, seed=5).numpy(), square(bed.keras_model, x, y, seed=5).numpy()
    )


def test_bad_arguments_fail_clearly():
    model = tb.keras_convnet()
    with pytest.raises(ValueError, match="p_init must be in"):
        Square(0.1, p_init=2.0)
    with pytest.raises(ValueError, match="n_queries must be a positive integer"):
        Square(0.1, n_queries=0)
    with pytest.raises(ValueError, match="got 2 images but 3 labels"):
        Square(0.1)(model, np.zeros((2, 16, 16, 3), np.float32), [0, 1, 2])
