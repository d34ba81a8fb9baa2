"""Connecting to Redis with clear errors, bounded retries, and a private server when none runs.

`connect` builds a client that retries connection errors and timeouts itself, with redis-py's
own `Retry(ExponentialBackoff(...), retries)` (so every command, pub/sub read and pipeline gets
the same bounded, backed-off retries), pings it, and turns every failure into a one-line
`ServiceError` that says what to do. `redis_call` runs one command on such a client and turns
the error left after the client's retries into a `ServiceError` naming the command: callers
that can wait out an outage (actors, the learner) catch that and try again later.
`PrivateRedis` / `embedded_redis` start a `redis-server` (AOF with `appendfsync everysec`, in a
temp dir or a given one that survives a restart) for `dvi demo` and for tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from common.core.errors import ServiceError

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PASSWORD_FILE_ENV = "DVI_REDIS_PASSWORD_FILE"
"""Names a file holding the Redis password, used when the URL carries none (cluster.yaml sets it)."""
DEFAULT_RETRIES = 3
"""Retries redis-py makes of one command on a connection error or timeout (after the first try)."""
DEFAULT_BACKOFF_S = 0.1
"""First retry delay; redis-py's ExponentialBackoff doubles it up to DEFAULT_BACKOFF_CAP_S."""
DEFAULT_BACKOFF_CAP_S = 1.0
"""Longest delay between two retries of one command."""
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
        raise ValueError("the Redis client must use decode_responses=False (see common.transport.redis.client.connect)")
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


def client_retry(retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 cap_s: float = DEFAULT_BACKOFF_CAP_S) -> Retry:
    """redis-py's Retry: `retries` retries of a connection error or timeout, exponential backoff."""
    if retries < 0 or backoff_s < 0 or cap_s < backoff_s:
        raise ValueError(f"need retries >= 0 and 0 <= backoff_s <= cap_s, got {retries}, {backoff_s}, {cap_s}")
    return Retry(ExponentialBackoff(cap=cap_s, base=backoff_s), retries,
                 supported_errors=(redis.ConnectionError, redis.TimeoutError))


def connect(
    url: str = DEFAULT_REDIS_URL,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    timeout_s: float = 10.0,
    ping: bool = True,
) -> redis.Redis:
    """A `redis.Redis` (bytes responses) for `url` that retries by itself, pinged unless `ping`
    is False, or a ServiceError saying what to do.

    Every command is retried `retries` times on connection errors and timeouts (redis-py's
    `Retry` with `ExponentialBackoff` from `backoff_s`, capped at DEFAULT_BACKOFF_CAP_S), then
    raises; `redis_call` turns that into a ServiceError. `timeout_s` is the socket connect and
    read timeout, so blocking stream reads must use a block time below it. `ping=False` is for
    service processes that must start while Redis is away: the first command connects. A URL
    without a password takes it from the file $DVI_REDIS_PASSWORD_FILE names, when set.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    shown = redact(url)
    extra = _password_from_file(url)
    try:
        client = redis.Redis.from_url(
            url,
            **extra,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=client_retry(retries, backoff_s),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            decode_responses=False,
        )
    except ValueError as err:
        raise ServiceError(
            f"bad Redis URL {shown}: {err} (expected redis://[:password@]host:port/db)"
        ) from err
    if ping:
        _ping(client, url)
    return client


def _password_from_file(url: str) -> dict[str, str]:
    """{"password": ...} from the file $DVI_REDIS_PASSWORD_FILE names, when set and `url` has none."""
    password_file = os.environ.get(PASSWORD_FILE_ENV)
    if not password_file or urlsplit(url).password is not None:
        return {}
    try:
        return {"password": Path(password_file).expanduser().read_text().strip()}
    except OSError as err:
        raise ServiceError(f"cannot read the Redis password file ${PASSWORD_FILE_ENV}={password_file}: "
                           f"{err.strerror or err}") from err


def _ping(client: redis.Redis, url: str) -> None:
    """PING through `client`; on failure close it and raise the ServiceError that names the fix."""
    shown = redact(url)
    try:
        client.ping()
    except redis.AuthenticationError as err:
        client.close()
        raise _auth_error(url, err) from err
    except redis.ResponseError as err:
        client.close()
        if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
            raise _auth_error(url, err) from err
        raise ServiceError(f"Redis at {shown} refused PING: {err}") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        client.close()
        raise RedisUnreachableError(
            f"cannot reach Redis at {shown} ({err}): start one with `redis-server` or pass --redis-url"
        ) from err


def _auth_error(url: str, err: Exception) -> RedisAuthError:
    shown = redact(url)
    if urlsplit(url).password is None:
        return RedisAuthError(
            f"Redis at {shown} requires a password: pass it in --redis-url as redis://:PASSWORD@host:port/0"
        )
    return RedisAuthError(
        f"Redis at {shown} rejected the password ({err}): check the password in --redis-url"
    )


def redis_call(fn: Callable[[], T], *, what: str) -> T:
    """Run `fn` (Redis commands on a `connect` client, which retries them itself); turn the
    connection error or timeout left after those retries into a ServiceError naming `what`.

    Other Redis errors propagate unchanged. A retried write may have been applied before its
    connection dropped: callers state whether their writes are idempotent.
    """
    try:
        return fn()
    except redis.AuthenticationError as err:
        raise ServiceError(f"{what}: Redis rejected the credentials ({err})") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise ServiceError(f"{what} failed: Redis unreachable ({err})") from err


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A private `redis-server` on 127.0.0.1 with an append-only file (`appendfsync everysec`).

    Usage: `with PrivateRedis() as server: connect(server.url)`. Without `directory` it lives in
    its own temp dir, deleted on `stop`; with one, its AOF stays there. `kill()` ends it with
    SIGKILL (a crash) and a later `start()` brings it back on the same port from the same AOF:
    at most the last second of writes is lost. `extra_args` are appended to the command line
    (e.g. ["--requirepass", "s3cret"]; `url` then carries no password).
    """

    def __init__(self, extra_args: Sequence[str] = (), start_timeout_s: float = 10.0,
                 directory: str | Path | None = None) -> None:
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._directory = Path(directory).resolve() if directory is not None else None  # redis-server chdirs

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("PrivateRedis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> Path:
        """Where the AOF and the log live."""
        if self._directory is None:
            self._dir = tempfile.TemporaryDirectory(prefix="dvi-redis-")
            self._directory = Path(self._dir.name)
        self._directory.mkdir(parents=True, exist_ok=True)
        return self._directory

    def start(self) -> PrivateRedis:
        """Start the server (again on its port after `kill`) and wait until it accepts
        connections; ServiceError if it cannot."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("`redis-server` is not on PATH: install Redis or pass --redis-url")
        directory = self.directory
        fixed = self.port is not None
        for _ in range(1 if fixed else 3):  # a free port can be taken between probing and binding
            if not fixed:
                self.port = free_port()
            logfile = directory / f"redis-{self.port}.log"
            cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(directory),
                   "--logfile", str(logfile), "--daemonize", "no", *self.extra_args]
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

    def kill(self) -> None:
        """SIGKILL the server (a crash: no final fsync); its port and AOF stay for `start()`."""
        if self._proc is not None:
            log.info("killing private redis-server pid=%d on port %s", self._proc.pid, self.port)
            self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None

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
            self._directory = None

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


def expire_namespace(client: redis.Redis, namespace: str, seconds: float) -> int:
    """Give every key under `namespace` a time to live (a finished run must not fill a shared
    Redis); returns how many keys got one."""
    pipe = client.pipeline(transaction=False)
    n = 0
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        pipe.expire(key, max(1, int(seconds)))
        n += 1
    pipe.execute()
    return n
