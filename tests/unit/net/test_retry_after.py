"""The one Retry-After reader: seconds, HTTP dates, epoch reset headers of spent windows; always within
``[0, cap]`` and never raising, whatever a server sends. (The GitHub reading's table of cases is in
``tests/unit/sources/test_github_limits.py``.)"""

from __future__ import annotations

import email.utils
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory_worker.net import DEFAULT_RETRY_S, GITHUB_RESETS, LINEAR_RESETS, ResetHeader, retry_after_s, retry_wait_s

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


@pytest.mark.parametrize(
    "value, wait",
    [
        ("30", 30),
        ("0.5", 0.5),
        (" 12 ", 12),
        ("inf", 100),
        ("1e999", 100),
        (http_date(NOW + 42), 42),
        (http_date(NOW - 42), 0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 100),
        ("-1", None),
        ("nan", None),
        ("-inf", None),
        ("soon", None),
        ("", None),
        ("Fri, 31 Dec 2023 23:59:59", None),  # a date without a zone is not a time
        ("Fri, 31 Dec 2023 23:59:59 -0000", None),  # RFC 5322: "-0000" is no zone either
    ],
)
def test_retry_after_seconds_and_dates(value, wait):
    got = retry_after_s({"retry-after": value}, NOW, cap=100.0)
    assert got == (None if wait is None else pytest.approx(wait, abs=1))


def test_nothing_usable_is_none_for_the_callers_backoff_and_the_default_for_a_rate_limit():
    assert retry_after_s({}, NOW, 100.0) is None
    assert retry_wait_s({}, NOW, 100.0) == DEFAULT_RETRY_S
    assert retry_wait_s({"retry-after": "soon"}, NOW, 100.0, default=7.0) == 7.0
    assert retry_wait_s({}, NOW, 5.0) == 5.0  # the default is capped too


def test_a_reset_header_counts_only_for_a_spent_window():
    reset = str(int(NOW) + 40)
    assert retry_after_s({"x-ratelimit-reset": reset}, NOW, 300, GITHUB_RESETS) == pytest.approx(40, abs=1)
    spent = {"x-ratelimit-reset": reset, "x-ratelimit-remaining": "0"}
    assert retry_after_s(spent, NOW, 300, GITHUB_RESETS) == pytest.approx(40, abs=1)
    left = {"x-ratelimit-reset": reset, "x-ratelimit-remaining": "4999"}
    assert retry_after_s(left, NOW, 300, GITHUB_RESETS) is None  # a secondary limit: not this window
    assert retry_wait_s(left, NOW, 300, resets=GITHUB_RESETS) == DEFAULT_RETRY_S
    assert retry_after_s({"x-ratelimit-reset": reset}, NOW, 300) is None  # no reset header named: not read


def test_retry_after_wins_over_a_reset_and_an_unusable_one_gives_way_to_it():
    reset = str(int(NOW) + 40)
    assert retry_after_s({"retry-after": "5", "x-ratelimit-reset": reset}, NOW, 300, GITHUB_RESETS) == 5
    got = retry_after_s({"retry-after": "later", "x-ratelimit-reset": reset}, NOW, 300, GITHUB_RESETS)
    assert got == pytest.approx(40, abs=1)


def test_linears_budgets_in_milliseconds_the_latest_spent_one_wins():
    requests_ms, complexity_ms = str(int((NOW + 20) * 1000)), str(int((NOW + 90) * 1000))
    both = {"x-ratelimit-requests-reset": requests_ms, "x-ratelimit-complexity-reset": complexity_ms}
    assert retry_after_s(both, NOW, 300, LINEAR_RESETS) == pytest.approx(90, abs=1)
    complexity_left = {**both, "x-ratelimit-complexity-remaining": "120"}
    assert retry_after_s(complexity_left, NOW, 300, LINEAR_RESETS) == pytest.approx(20, abs=1)
    assert retry_after_s({**both, "x-ratelimit-complexity-reset": "nan"}, NOW, 300, LINEAR_RESETS) == (
        pytest.approx(20, abs=1)
    )


def test_httpx_headers_are_read_whatever_their_case():
    headers = httpx.Headers({"Retry-After": "9", "X-RateLimit-Reset": str(int(NOW) + 50)})
    assert retry_after_s(headers, NOW, 300) == 9
    assert retry_after_s(httpx.Headers({"X-RateLimit-Reset": str(int(NOW) + 50)}), NOW, 300, GITHUB_RESETS) == (
        pytest.approx(50, abs=1)
    )


HEADER = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{0,5})?([eE][-+]?[0-9]{1,4})?", fullmatch=True),
    st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e999", "-0", "0x10", "1_000", "٣", "\x00", " "]),
    st.datetimes().map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S") + " GMT"),
    st.datetimes().map(lambda d: email.utils.format_datetime(d)),  # naive: "-0000"
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)
NAMES = st.sampled_from(
    [
        "retry-after",
        "x-ratelimit-reset",
        "x-ratelimit-remaining",
        "x-ratelimit-requests-reset",
        "x-ratelimit-requests-remaining",
        "x-ratelimit-complexity-reset",
        "x-ratelimit-complexity-remaining",
        "x-other",
    ]
)
RESETS = st.sampled_from([(), GITHUB_RESETS, LINEAR_RESETS, (ResetHeader("x-ratelimit-reset", 1e-9),)])


@settings(max_examples=1000, deadline=None)
@given(
    headers=st.dictionaries(NAMES, HEADER, max_size=5),
    now=st.floats(min_value=0, max_value=4e9),
    cap=st.floats(min_value=0, max_value=1e7),
    resets=RESETS,
)
def test_any_headers_give_a_wait_within_zero_and_the_cap_and_never_raise(headers, now, cap, resets):
    asked = retry_after_s(headers, now, cap, resets)
    assert asked is None or (0.0 <= asked <= cap and not math.isnan(asked))
    wait = retry_wait_s(headers, now, cap, DEFAULT_RETRY_S, resets)
    assert 0.0 <= wait <= cap and not math.isnan(wait)
    assert wait == (min(DEFAULT_RETRY_S, cap) if asked is None else asked)
