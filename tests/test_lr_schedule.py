"""The learning-rate schedules of the training loop: warm-up, then constant or cosine."""

import math

import pytest

from zoo.recipe import RecipeError, load_recipe
from zoo.transfer.loop import LR_SCHEDULES, lr_schedule


@pytest.mark.parametrize("kind", LR_SCHEDULES)
def test_warmup_is_linear_and_reaches_the_peak(kind):
    lr_at = lr_schedule(kind, 2e-3, steps=200)  # warm-up: min(20, 200 // 10) = 20 steps
    assert [lr_at(s) for s in (0, 9, 19)] == pytest.approx([1e-4, 1e-3, 2e-3])


def test_constant_stays_at_the_peak():
    lr_at = lr_schedule("constant", 1e-2, steps=100)
    assert {lr_at(s) for s in range(10, 100)} == {1e-2}


def test_cosine_decays_monotonically_to_a_tenth():
    steps = 100
    lr_at = lr_schedule("cosine", 1e-2, steps)
    after = [lr_at(s) for s in range(10, steps)]
    assert after[0] == pytest.approx(1e-2)
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(1e-3)
    middle = 10 + (steps - 1 - 10) / 2
    assert lr_at(math.floor(middle)) > 0.55e-2 > lr_at(math.ceil(middle) + 1)


def test_unknown_schedule_is_an_error_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="constant, cosine"):
        lr_schedule("linear", 1e-3, 10)
    with pytest.raises(RecipeError, match="stage1.lr_schedule: must be one of constant, cosine"):
        load_recipe("recipes/smollm2-135m/lolcats.yaml", ["stage1.lr_schedule=linear"])
