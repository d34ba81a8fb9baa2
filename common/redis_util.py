"""Connecting to Redis with clear errors, bounded retries, and a private server when none runs.

`connect` pings with bounded retries and turns every failure into a one-line `ServiceError` that
says what to do. `with_retries` is the one retry loop the transport and weight store share.
`PrivateRedis` / `embedded_redis` start a throw-away `redis-server` (no persistence, temp dir)
for `dvi demo` and for tests when no server answers.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.errors import ServiceError

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


class RedisUnreachableError(ServiceError):
    """No Redis answers at the URL (refused, timed out, unknown host)."""


class RedisAuthError(ServiceError):
    """Redis answered but refused the credentials, or needs some that were not given."""



def check_bytes_client(client, namespace: str | None = None) -> None:
    """ValueError unless `client` returns bytes (decode_responses=False, as `connect` gives) and,
    when given, `namespace` is a non-empty key prefix without spaces. Every Redis-backed class
    (trajectory stream, weight store, telemetry) checks its arguments through here."""
    if client.connection_pool.connection_kwargs.get("decode_responses", False):
        raise ValueError("the Redis client must use decode_responses=False (see common.redis_util.connect)")
    if namespace is not None and (
        not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace)
    ):
        raise ValueError(f"namespace must be a non-empty name without spaces, got {namespace!r}")

def redact(url: str) -> str:
    """`url` with any password replaced by `***`, safe to log or show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(
    url: str = DEFAULT_REDIS_URL,
    *,
    retries: int = 3,
    backoff_s: float = 0.2,
    timeout_s: float = 10.0,
) -> redis.Redis:
    """A pinged `redis.Redis` (bytes responses) for `url`, or a ServiceError saying what to do.

    Makes at most `retries` ping attempts, sleeping `backoff_s * 2**i` between them; auth
    failures are not retried. `timeout_s` is the socket connect and read timeout, so blocking
    stream reads must use a block time below it. The client itself does not retry: callers wrap
    commands in `with_retries` so the total number of attempts stays bounded and logged.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    shown = redact(url)
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
    except ValueError as err:
        raise ServiceError(
            f"bad Redis URL {shown}: {err} (expected redis://[:password@]host:port/db)"
        ) from err
    last: Exception | None = None
    for attempt in range(retries):
        try:
            client.ping()
            return client
        except redis.AuthenticationError as err:
            client.close()
            raise _auth_error(url, err) from err
        except redis.ResponseError as err:
            client.close()
            if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
                raise _auth_error(url, err) from err
            raise ServiceError(f"Redis at {shown} refused PING: {err}") from err
        except (redis.ConnectionError, redis.TimeoutError) as err:
            last = err
            log.debug("redis %s ping attempt %d/%d failed: %s", shown, attempt + 1, retries, err)
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2**attempt)
    client.close()
    raise RedisUnreachableError(
        f"cannot reach Redis at {shown} ({last}): start one with `redis-server` or pass --redis-url"
    )


def _auth_error(url: str, err: Exception) -> RedisAuthError:
    shown = redact(url)
    if urlsplit(url).password is None:
        return RedisAuthError(
            f"Redis at {shown} requires a password: pass it in --redis-url as redis://:PASSWORD@host:port/0"
        )
    return RedisAuthError(
        f"Redis at {shown} rejected the password ({err}): check the password in --redis-url"
    )


def with_retries(fn: Callable[[], T], *, what: str, retries: int = 3, backoff_s: float = 0.1) -> T:
    """Run `fn`, retrying connection errors and timeouts at most `retries` times in all.

    Other Redis errors propagate at once. After the last failed attempt raises ServiceError naming
    `what`. A retried write may have been applied before its connection dropped: callers state
    whether their writes are idempotent.
    """
    for attempt in range(retries):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if isinstance(err, redis.AuthenticationError):
                raise ServiceError(f"{what}: Redis rejected the credentials ({err})") from err
            log.warning("%s: attempt %d/%d failed: %s", what, attempt + 1, retries, err)
            if attempt + 1 == retries:
                raise ServiceError(f"{what} failed after {retries} attempts: {err}") from err
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable: retries >= 1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A throw-away `redis-server` on 127.0.0.1: no persistence, its own temp dir, stopped on exit.

    Usage: `with PrivateRedis() as server: connect(server.url)`. `extra_args` are appended to the
    command line (e.g. ["--requirepass", "s3cret"]; `url` then carries no password).
    """

    def __init__(self, extra_args: Sequence[str] = (), start_timeout_s: float = 10.0) -> None:
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("PrivateRedis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PrivateRedis:
        """Start the server and wait until it accepts connections; ServiceError if it cannot."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("`redis-server` is not on PATH: install Redis or pass --redis-url")
        self._dir = tempfile.TemporaryDirectory(prefix="dvi-redis-")
        for _ in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            logfile = Path(self._dir.name) / f"redis-{self.port}.log"
            cmd = [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--logfile",
                str(logfile),
                "--daemonize",
                "no",
                *self.extra_args,
            ]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_listening():
                log.info("started private redis-server pid=%d on port %d", self._proc.pid, self.port)
                return self
            self._terminate()
        tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        self._cleanup_dir()
        raise ServiceError(f"could not start a private redis-server: {tail.strip() or 'no log'}")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and delete its temp dir."""
        if self._proc is not None:
            log.info("stopping private redis-server pid=%d on port %s", self._proc.pid, self.port)
            self._terminate()
        self._cleanup_dir()

    def _terminate(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_redis(url: str = DEFAULT_REDIS_URL) -> Iterator[str]:
    """Yield the URL of a reachable Redis: `url` if it answers, else a private server's.

    A private server is started only when nothing answers at `url` (a server that refuses the
    credentials raises RedisAuthError instead) and is stopped when the block exits.
    """
    try:
        connect(url, retries=1).close()
    except RedisUnreachableError:
        log.info("no Redis at %s; starting a private redis-server", redact(url))
    else:
        yield url
        return
    with PrivateRedis() as server:
        yield server.url
