"""Real-Redis fixtures: the local server on 127.0.0.1:6379, or a private one if none answers.

Set DVI_TEST_REDIS_URL to test against another server (a dead URL forces the private one).

Every test gets its own random key prefix (`redis_ns`) and its keys are deleted afterwards, so
tests running at the same time against the shared server never see each other's data.

Service processes always verify weight signatures; the test session signs with
`TEST_WEIGHT_SECRET`, set in the environment here, before any Ray starts (a local Ray's actors
inherit it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from common.transport.redis.client import PrivateRedis, RedisUnreachableError, connect

SHARED_URL = os.environ.get("DVI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_WEIGHT_SECRET = b"dvi-test-weight-secret"
os.environ["DVI_WEIGHT_SECRET"] = TEST_WEIGHT_SECRET.decode()
os.environ.pop("DVI_WEIGHT_SECRET_FILE", None)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a reachable Redis for the whole session."""
    try:
        connect(SHARED_URL, retries=1).close()
    except RedisUnreachableError:
        with PrivateRedis() as server:
            yield server.url
        return
    yield SHARED_URL


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client shared by the session's tests."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_ns(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh key prefix like "test:3f2a..."; every key under it is deleted after the test."""
    namespace = f"test:{uuid.uuid4().hex}"
    yield namespace
    keys = list(redis_client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        redis_client.delete(*keys)
