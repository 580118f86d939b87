"""Every registered mixer, with its own `test_options`: split-and-carry and padding at the mixer's limits.

A mixer declares small test options (short windows and conv histories, strong decays, small feature dims)
so that these checks' sequences slide its windows and cross its chunks many times: a state carried wrongly
beyond a window of 64 hides inside sequences of a few dozen tokens. A newly registered mixer is tested here
by what already exists.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mixer_testing import (
    CUTS,
    LENGTH,
    check_padding_adds_nothing,
    check_split_and_carry,
    make_test_mixer,
)

from zoo.mixers import get_mixer, list_mixers, register_mixer, unregister_mixer

NAMES = list_mixers()
#: the largest value of each option at which the checks' LENGTH tokens still push far past it
LIMITS = {"window": 8, "conv_size": 4}


@pytest.mark.parametrize("name", NAMES)
def test_test_options_reach_the_limits(name):
    """Each mixer's test options are valid and bring its windows and conv histories well inside the checks'
    sequences (a new mixer with a window of 64 fails here until it declares `test_options`)."""
    cls = get_mixer(name)
    options = cls.check_options(cls.test_options)
    for key, limit in LIMITS.items():
        if key in options:
            assert options[key] <= limit, (
                f"{name}: {key}={options[key]} in the registry tests; declare "
                f"test_options = {{'{key}': <= {limit}}} on {cls.__qualname__}"
            )
    y, _ = make_test_mixer(name)(*[torch.zeros(2, h, 3, 16) for h in (4, 2, 2)], torch.zeros(2, 3, 32))
    assert y.shape == (2, 4, 3, 16)


@pytest.mark.parametrize("name", NAMES)
def test_split_and_carry(name):
    check_split_and_carry(name)


@pytest.mark.parametrize("name", NAMES)
def test_padding_adds_nothing(name):
    check_padding_adds_nothing(name)


def test_a_broken_carry_hides_inside_default_options_but_fails_with_the_test_options():
    """A copy of `lolcats-terraced` whose state forgets where it is: on each call the token count restarts
    from the oldest token the state still holds (positions restart at 0 there), so the terraced blocks shift
    once a sequence outgrows the cache (2 windows). At the default window (64) that never happens within the
    29 tokens of a short test; with the test options (window 4) the split check fails."""
    name = "test-broken-carry"
    base = get_mixer("lolcats-terraced")

    class PositionsRestart(base):
        def forward(self, q, k, v, x, state=None, mask=None):
            if state is not None:
                state = dataclasses.replace(state, n=state.n.clamp(max=state.cached_tokens))
            return super().forward(q, k, v, x, state, mask)

    register_mixer(name)(PositionsRestart)
    try:
        assert PositionsRestart.test_options == base.test_options and base.test_options["window"] <= 8
        check_split_and_carry(name, options={}, length=29, cuts=[0, 11, 28, 29])  # blind at the defaults
        check_split_and_carry("lolcats-terraced")  # the real one passes with its test options
        with pytest.raises(AssertionError):
            check_split_and_carry(name)
    finally:
        unregister_mixer(name)
    assert name not in list_mixers()


def test_the_checks_cross_chunks_and_decode_single_tokens():
    pieces = [hi - lo for lo, hi in zip(CUTS[:-1], CUTS[1:])]
    assert CUTS[0] == 0 and CUTS[-1] == LENGTH > 2 * 64
    assert pieces.count(1) >= 4 and max(pieces) > 4  # recurrent steps and chunked prefills after a state
    assert 64 in CUTS and any(
        lo < 128 < hi for lo, hi in zip(CUTS[:-1], CUTS[1:])
    )  # on and across chunk edges
