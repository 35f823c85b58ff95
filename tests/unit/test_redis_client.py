"""redis_client without a server: URL masking (every form a password can take)."""

from __future__ import annotations

import pytest

from factory_worker.redis_client import mask_url


@pytest.mark.parametrize("url, secret", [
    ("redis://:s3cret@h:6379/0", "s3cret"),
    ("redis://user:s3cret@h:6379/0", "s3cret"),
    ("rediss://user:s3cret@h:6380/1", "s3cret"),
    ("redis://h:6379/0?password=s3cret", "s3cret"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "s3cret"),
    ("unix://:s3cret@/run/redis.sock?db=1", "s3cret"),
])
def test_every_url_form_is_masked(url, secret):
    masked = mask_url(url)
    assert secret not in masked and "***" in masked
