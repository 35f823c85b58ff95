"""The ledger's Redis clients decode their replies, which is what the ``decoded*`` helpers tell the type checker."""

from __future__ import annotations

import pytest

from factory_worker.ledger.redis_client import (
    client_from_url,
    decoded,
    decoded_hash,
    decoded_members,
    decoded_scored,
    hash_mapping,
)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "unix:///nonexistent/redis.sock", "sentinel://127.0.0.1:1/mymaster/0"],
)
def test_every_client_decodes_its_replies(url):
    # no connection is made: the pool only holds the options its connections will get
    pool = client_from_url(url).connection_pool
    assert pool.connection_kwargs["decode_responses"] is True


def test_replies_come_back_str_and_the_helpers_pass_them_through(fake_redis):
    r = fake_redis
    r.set("s", "v")
    r.hset("h", mapping=hash_mapping({"a": "1"}))
    r.sadd("m", "x")
    r.zadd("z", {"x": 2.0})
    s, h, m, z = r.get("s"), r.hgetall("h"), r.smembers("m"), r.zrange("z", 0, -1, withscores=True)
    assert (s, h, m, z) == ("v", {"a": "1"}, {"x"}, [("x", 2.0)])
    assert decoded(s) is s and decoded(r.get("missing")) is None
    assert decoded_hash(h) is h and decoded_members(m) is m and decoded_scored(z) is z
