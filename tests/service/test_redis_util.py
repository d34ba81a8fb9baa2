"""connect / embedded_redis against real redis-server processes, and redis-py's retries across a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.core.errors import ServiceError
from common.transport.redis.client import (
    PrivateRedis,
    RedisAuthError,
    RedisUnreachableError,
    connect,
    embedded_redis,
    free_port,
    redact,
    redis_call,
)


@pytest.fixture(scope="module")
def password_server() -> Iterator[PrivateRedis]:
    with PrivateRedis(["--requirepass", "s3cret"]) as server:
        yield server


def _with_password(url: str, password: str) -> str:
    return url.replace("redis://", f"redis://:{password}@")


def test_unreachable_redis_gives_the_advice() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnreachableError) as info:
        connect(url, retries=2, backoff_s=0.01)
    message = str(info.value)
    assert message.startswith(f"cannot reach Redis at {url} (")
    assert message.endswith("start one with `redis-server` or pass --redis-url")
    assert isinstance(info.value, ServiceError)


def test_missing_and_wrong_passwords_are_told_apart(password_server) -> None:
    url = password_server.url
    with pytest.raises(RedisAuthError, match=f"Redis at {url} requires a password: pass it in --redis-url"):
        connect(url)
    bad = _with_password(url, "wrong")
    with pytest.raises(RedisAuthError) as info:
        connect(bad)
    assert "rejected the password" in str(info.value) and "check the password in --redis-url" in str(
        info.value
    )
    assert "wrong" not in str(info.value)  # the password never reaches a message
    client = connect(_with_password(url, "s3cret"))
    assert client.ping() is True
    client.close()


def test_embedded_redis_uses_a_live_server_as_is(redis_url) -> None:
    with embedded_redis(redis_url) as url:
        assert url == redis_url


def test_embedded_redis_starts_and_stops_a_private_server() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with embedded_redis(dead) as url:
        assert url != dead
        client = connect(url)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()
    with pytest.raises(RedisUnreachableError):
        connect(url, retries=1)


def test_embedded_redis_does_not_hide_an_auth_failure(password_server) -> None:
    with pytest.raises(RedisAuthError), embedded_redis(password_server.url):
        pass


def test_bad_urls_and_redaction() -> None:
    with pytest.raises(ServiceError, match="bad Redis URL http://x"):
        connect("http://x")
    assert redact("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_redis_call_turns_what_the_client_could_not_retry_into_a_service_error() -> None:
    def gone() -> None:
        raise redis.ConnectionError("reset by peer")

    with pytest.raises(ServiceError, match="PING failed: Redis unreachable \\(reset by peer\\)"):
        redis_call(gone, what="PING")

    def broken() -> None:
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):  # not a connection problem: unchanged
        redis_call(broken, what="GET")
    assert redis_call(lambda: "ok", what="GET") == "ok"


def test_the_client_retries_with_backoff_across_a_restart_and_the_aof_keeps_the_data(tmp_path) -> None:
    """redis-py's own Retry rides out a kill -9 and restart on the same AOF; no hand-written loop."""
    server = PrivateRedis(directory=tmp_path).start()
    try:
        client = connect(server.url, retries=8, backoff_s=0.05)
        client.set("k", "v")
        time.sleep(1.2)  # appendfsync everysec: the write is on disk after a second
        server.kill()
        restart = threading.Timer(0.3, server.start)
        restart.start()
        started = time.monotonic()
        assert client.get("k") == b"v"  # refused, backed off, retried until the server was back
        assert time.monotonic() - started >= 0.25
        restart.join()
        server.kill()
        short = connect(server.url, retries=1, backoff_s=0.01, ping=False)
        with pytest.raises(ServiceError, match="GET k failed: Redis unreachable"):
            redis_call(lambda: short.get("k"), what="GET k")
    finally:
        server.stop()


def test_a_password_file_supplies_the_password_a_url_lacks(password_server, tmp_path, monkeypatch) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("DVI_REDIS_PASSWORD_FILE", str(secret))
    assert connect(password_server.url).ping()
    monkeypatch.setenv("DVI_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ServiceError, match="cannot read the Redis password file"):
        connect(password_server.url)
