"""The one backoff: ``min(base * 2**(n-1), max)``, jittered as asked, never sooner than the server asked,
never beyond ``max``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factory_worker.net import Backoff, Jitter


def test_the_window_doubles_from_base_up_to_max():
    b = Backoff(2.0, 30.0)
    assert [b.wait_s(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.wait_s(0) == b.wait_s(-5) == 2.0  # below the first retry counts as the first
    assert b.wait_s(10**9) == 30.0  # no overflow however long it failed
    assert Backoff(1e308, 5.0).wait_s(4000) == 5.0


def test_never_sooner_than_the_server_asked_never_beyond_max():
    b = Backoff(1.0, 60.0)
    assert b.wait_s(1, retry_after=7.0) == 7.0
    assert b.wait_s(4, retry_after=3.0) == 8.0  # the window is longer
    assert b.wait_s(1, retry_after=600.0) == 60.0
    assert b.wait_s(1, retry_after=None) == 1.0


@pytest.mark.parametrize(
    "jitter, draw, wait",
    [
        (Jitter.NONE, 0.0, 8.0),
        (Jitter.FULL, 0.0, 0.0),
        (Jitter.FULL, 0.5, 4.0),
        (Jitter.EQUAL, 0.0, 4.0),
        (Jitter.EQUAL, 0.5, 6.0),
        (Jitter.EQUAL, 0.999, pytest.approx(8.0, abs=0.01)),
    ],
)
def test_jitter(jitter, draw, wait):
    assert Backoff(1.0, 60.0, jitter).wait_s(4, rng=lambda: draw) == wait


def test_jitter_never_cuts_a_servers_wait():
    assert Backoff(1.0, 60.0, Jitter.FULL).wait_s(4, retry_after=5.0, rng=lambda: 0.0) == 5.0


@given(
    base=st.floats(min_value=0, max_value=1e6),
    cap=st.floats(min_value=0, max_value=1e6),
    attempt=st.integers(min_value=-10, max_value=10**6),
    asked=st.none() | st.floats(min_value=0, max_value=1e9),
    jitter=st.sampled_from(Jitter),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_always_within_zero_and_max(base, cap, attempt, asked, jitter, draw):
    b = Backoff(base, cap, jitter)
    wait = b.wait_s(attempt, asked, rng=lambda: draw)
    assert 0.0 <= wait <= cap
    assert wait >= min(asked or 0.0, cap)
    assert b.window_s(attempt) <= b.window_s(attempt + 1) <= cap
