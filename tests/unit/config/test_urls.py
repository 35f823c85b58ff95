"""URLs without a server: masking (every form a password can take), Sentinel URLs parsed and checked."""

from __future__ import annotations

import pytest

from factory_worker.config import urls
from factory_worker.config.settings import ConfigError, load_settings
from factory_worker.config.urls import SentinelURL, mask_url, parse_sentinel_url
from factory_worker.worker.transport import broker_options, transport_for


@pytest.mark.parametrize(
    "url, secret",
    [
        ("redis://:s3cret@h:6379/0", "s3cret"),
        ("redis://user:s3cret@h:6379/0", "s3cret"),
        ("rediss://user:s3cret@h:6380/1", "s3cret"),
        ("redis://h:6379/0?password=s3cret", "s3cret"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "s3cret"),
        ("unix://:s3cret@/run/redis.sock?db=1", "s3cret"),
        ("sentinel://:s3cret@h1:26379,h2/mymaster/0", "s3cret"),
        ("sentinel://h1:26379/mymaster?sentinel_password=s3cret", "s3cret"),
    ],
)
def test_every_url_form_is_masked(url, secret):
    masked = mask_url(url)
    assert secret not in masked and "***" in masked


def test_a_sentinel_url_names_sentinels_master_db_and_passwords():
    t = parse_sentinel_url("sentinel://app:pw@10.0.0.1:26380,10.0.0.2/my-master/3?sentinel_password=spw")
    assert t == SentinelURL((("10.0.0.1", 26380), ("10.0.0.2", 26379)), "my-master", 3, "app", "pw", "spw")
    assert parse_sentinel_url("sentinel://h/m").db == 0


@pytest.mark.parametrize(
    "url, words",
    [
        ("sentinel://h:26379", "master's name"),
        ("sentinel://h:26379/m/x", "database must be a number"),
        ("sentinel://h:26379,/m", r"host\[:port\] entries"),
        ("sentinel://h:port/m", "bad port"),
        ("sentinel://h/m?timeout=1", "unknown parameter"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_naming_what_is_wrong(url, words):
    with pytest.raises(ConfigError, match=words) as err:
        load_settings(redis_url=url)
    assert "\n" not in str(err.value) and "redis_url" in str(err.value)


def test_a_sentinel_broker_becomes_kombus_sentinel_transport_with_the_master_name():
    url, options = broker_options("sentinel://:pw@h1:26379,h2:26380/mymaster/2?sentinel_password=spw")
    assert url == "sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2"
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "spw"}}
    assert transport_for(url) == "factory_worker.worker.transport:SentinelTransport"
    assert broker_options("redis://h:6379/0") == ("redis://h:6379/0", {})


def test_the_broker_defaults_to_a_sentinel_ledger_url():
    from factory_worker.worker.app import celery_config

    conf = celery_config(load_settings(redis_url="sentinel://h1:26379/mymaster/0"))
    assert conf["broker_url"] == "sentinel://h1:26379/0"
    assert conf["broker_transport_options"]["master_name"] == "mymaster"


@pytest.mark.parametrize("url", ["redis://h:6379/0?protocol=3", "rediss://h/0?Protocol=3", "unix:///s.sock?protocol=3"])
def test_resp3_is_refused_in_one_line(url):
    """RESP3 changes the replies every reader parses (the outbox's XREADGROUP would become a map)."""
    with pytest.raises(ValueError, match="protocol=3"):
        urls.validate(url)


def test_resp2_spelt_out_is_accepted():
    assert urls.validate("redis://h:6379/0?protocol=2") == "redis://h:6379/0?protocol=2"


@pytest.mark.parametrize("url", ["amqp://guest:guest@rabbit:5672/factory", "amqps://u:p@rabbit.example/%2F"])
def test_rabbitmq_is_a_broker_with_kombus_pyamqp_transport_and_the_ledger_stays_on_redis(url):
    from factory_worker.worker.app import celery_config

    s = load_settings(broker_url=url)
    assert s.effective_broker_url == url and s.effective_redis_url.startswith("redis://")
    conf = celery_config(s)
    tls = url.startswith("amqps")
    assert conf["broker_transport"] == f"kombu.transport.pyamqp:{'SSLTransport' if tls else 'Transport'}"
    # agent tasks are acknowledged at begin (late, then early by worker/acks.py); loop tasks as on Redis
    assert conf["task_acks_late"] is False
    assert conf["task_annotations"] == {n: {"acks_late": True} for n in ("factory.agent.run", "factory.agent.stage")}
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert "p@" not in mask_url(url) and "guest:guest" not in mask_url(url)
    with pytest.raises(ConfigError, match="must start with redis://"):
        load_settings(redis_url=url)  # the ledger is Redis only


def test_a_redis_broker_keeps_early_acks_and_the_visibility_timeout():
    from factory_worker.worker.app import celery_config

    conf = celery_config(load_settings())
    assert conf["task_annotations"] is None and conf["task_acks_late"] is False
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600.0


@pytest.mark.parametrize(
    "url, words", [("amqp:///vhost", "needs a host"), ("amqp://h:port/v", "bad URL"), ("kafka://h", "amqp://")]
)
def test_a_bad_broker_url_is_one_line(url, words):
    with pytest.raises(ValueError, match=words):
        urls.validate_broker(url)
