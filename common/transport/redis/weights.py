"""Versioned drafter-adapter weights in Redis: the learner publishes, actors fetch and verify.

Each weight version is one Redis hash `{namespace}:weights:v:{version}` holding the safetensors
bytes of the adapter, their sha256, and who made them when. Versions strictly increase; the
store keeps the newest `keep` so an actor can roll back to the previous one (a learner that
wants to *republish* old weights does so under a new, higher version). `{namespace}:weights:latest`
points at the newest. After a publish a small JSON notice goes out on the pub/sub channel
`{namespace}:weights:notices`; notices are unauthenticated hints and can be missed (pub/sub is
fire-and-forget), so actors verify on `fetch` and may also poll `latest_version()`.

Trust. The service always runs with a secret (`load_secret`: a file or an environment variable,
never a pickled argument; `dvi run`/`dvi demo` make one per run when none is given). With it:
  * each record carries an HMAC-SHA256 over the canonical JSON [namespace, model id, exit layer,
    version, sha256, created_at, learner_id, metadata], so a record signed in another run
    (namespace), for another model or exit layer, or under another version number never
    verifies; `fetch` refuses a record whose signature is missing or wrong;
  * the `latest` pointer carries its own HMAC (`latest:sig`); `latest_version` ignores a
    pointer that does not verify, so a forged `latest` = 10**12 wakes no one up;
  * `block(version)` stores a signed rollback verdict; `blocked_versions` returns the verified
    ones, so a restarted actor or learner never takes a rolled-back version again.
`fetch` also refuses non-finite tensors, signed or not, before anyone swaps them in. A store
without a secret (tests, tools) checks sha256 only. No pickle: safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from common.core.errors import ServiceError, VersionConflictError, WeightIntegrityError, WeightNotFoundError
from common.transport.redis.client import check_bytes_client, redis_call

log = logging.getLogger(__name__)
T = TypeVar("T")

# KEYS: latest pointer, versions zset, record hash, latest signature. ARGV: version, keep, record
# key prefix, channel, notice, latest signature, then the record's field/value pairs. Returns
# {1, "ok"}, {1, "duplicate"} (an identical retry of an applied publish) or {0, newest} (refused:
# not newer than the newest stored record; the pointer itself may be forged, the zset is not
# read by anyone but this script).
_PUBLISH_LUA = """
local version = tonumber(ARGV[1])
local newest = redis.call('ZREVRANGE', KEYS[2], 0, 0)[1]
if newest and tonumber(newest) >= version then
  local fields = {}
  for i = 7, #ARGV, 2 do fields[ARGV[i]] = ARGV[i + 1] end
  local old = redis.call('HMGET', KEYS[3], 'sha256', 'created_at')
  if old[1] == fields['sha256'] and old[2] == fields['created_at'] then return {1, 'duplicate'} end
  return {0, newest}
end
redis.call('HSET', KEYS[3], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], version, ARGV[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[6])
local keep = tonumber(ARGV[2])
for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, -(keep + 1))) do
  redis.call('DEL', ARGV[3] .. old)
  redis.call('ZREM', KEYS[2], old)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {1, 'ok'}
"""

_FIELDS = ("tensors", "sha256", "version", "created_at", "learner_id", "metadata", "signature")


SECRET_ENV = "DVI_WEIGHT_SECRET"
"""Environment variable holding the weight-signing secret itself."""
SECRET_FILE_ENV = "DVI_WEIGHT_SECRET_FILE"
"""Environment variable naming a file that holds it (cluster.yaml writes ~/.dvi/weight-secret)."""
DEFAULT_SECRET_FILE = "~/.dvi/weight-secret"
"""Where a cluster node keeps the secret when neither variable is set."""


def load_secret(path: str | Path | None = None) -> bytes | None:
    """The weight-signing secret: the file `path` if given, else $DVI_WEIGHT_SECRET, else the
    file named by $DVI_WEIGHT_SECRET_FILE, else DEFAULT_SECRET_FILE if it exists; None if none.

    ServiceError for a named file that is missing or empty. Surrounding whitespace is stripped.
    """
    if path is None and os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].strip().encode()
    if path is None:
        path = os.environ.get(SECRET_FILE_ENV) or None
    if path is None:
        default = Path(DEFAULT_SECRET_FILE).expanduser()
        if not default.is_file():
            return None
        path = default
    file = Path(path).expanduser()
    try:
        secret = file.read_bytes().strip()
    except OSError as err:
        raise ServiceError(f"cannot read the weight secret file {file}: {err.strerror or err}") from err
    if not secret:
        raise ServiceError(f"the weight secret file {file} is empty")
    return secret


def service_store(client: redis.Redis, namespace: str, split, secret_file: str | None, **kwargs) -> "WeightStore":
    """The weight store of a service process (actor or learner) for drafter `split`: signed with
    the secret `load_secret(secret_file)` finds; ServiceError naming the fix when there is none."""
    secret = load_secret(secret_file)
    if secret is None:
        raise ServiceError(
            f"no weight-signing secret: set ${SECRET_ENV} or ${SECRET_FILE_ENV}, or write one to "
            f"{DEFAULT_SECRET_FILE} on every node (cluster.yaml does)"
        )
    return WeightStore(client, namespace, secret, model_id=split.model_id, exit_layer=split.exit_layer, **kwargs)


def write_secret_file(path: str | Path) -> Path:
    """Write a fresh random secret (64 hex characters) to `path`, readable by its owner only."""
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return file


@dataclass(frozen=True)
class WeightRecord:
    """One verified weight version.

    tensors: name -> CPU tensor, exactly as published (dtype and shape kept bit-exact).
    sha256: hex digest of the safetensors bytes. created_at: unix seconds at publish.
    signature: hex HMAC-SHA256, or None when published without a secret.
    """

    version: int
    sha256: str
    created_at: float
    learner_id: str
    metadata: dict[str, str]
    signature: str | None
    tensors: dict[str, torch.Tensor]
    nbytes: int


def _checked_publish_args(tensors: dict, version: int, learner_id: str, metadata: dict | None) -> dict[str, str]:
    """ValueError unless `publish`'s arguments are well formed and the tensors finite; returns a
    copy of `metadata` ({} for None)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")
    if not isinstance(learner_id, str) or not learner_id:
        raise ValueError(f"learner_id must be a non-empty str, got {learner_id!r}")
    if not tensors or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise ValueError("tensors must be a non-empty dict of str -> torch.Tensor")
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str -> str")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"weight version {version}: non-finite values in {', '.join(bad)}: not published")
    return metadata


def _record(version: int, sha: str, created_at: str, learner_id: str, metadata: dict, signature: str,
            tensors: dict[str, torch.Tensor], blob: bytes) -> "WeightRecord":
    """The `WeightRecord` of one stored version (`blob`: its safetensors bytes; "" signature: unsigned)."""
    return WeightRecord(version=version, sha256=sha, created_at=float(created_at), learner_id=learner_id,
                        metadata=metadata, signature=signature or None, tensors=tensors, nbytes=len(blob))


class WeightStore:
    """Versioned adapter weights under `namespace`; signs and verifies when `secret` is given.

    `client` must return bytes (decode_responses=False). `keep` (>= 1) versions are kept.
    `model_id` and `exit_layer` name the drafter the weights belong to; the signature covers
    them (and the namespace), so a reader with another identity refuses the record.
    `clock` gives created_at (unix seconds); pass a fixed one for reproducible records.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "dvi",
        secret: bytes | None = None,
        *,
        model_id: str = "",
        exit_layer: int = 0,
        keep: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_bytes_client(client, namespace)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ValueError("secret must be non-empty bytes or None")
        self.client = client
        self.namespace = namespace
        self.keep = keep
        self._secret = secret
        self.model_id = str(model_id)
        self.exit_layer = int(exit_layer)
        self._clock = clock
        self._latest_key = f"{namespace}:weights:latest"
        self._latest_sig_key = f"{namespace}:weights:latest:sig"
        self._blocked_key = f"{namespace}:weights:blocked"
        self._ignored_latest: bytes | None = None
        self._versions_key = f"{namespace}:weights:versions"
        self._publish_log_key = f"{namespace}:weights:log"
        self._record_prefix = f"{namespace}:weights:v:"
        self.channel = f"{namespace}:weights:notices"
        self._publish_script = client.register_script(_PUBLISH_LUA)

    def publish(
        self,
        tensors: dict[str, torch.Tensor],
        version: int,
        learner_id: str,
        metadata: dict[str, str] | None = None,
    ) -> WeightRecord:
        """Store `tensors` as `version` (must exceed the latest, else ValueError), then notify.

        Atomic: the record, the version list, the latest pointer, pruning to `keep` versions and
        the notice happen in one script. Safe to retry: an identical replay is accepted once.
        """
        metadata = _checked_publish_args(tensors, version, learner_id, metadata)
        cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        blob = save_safetensors(cpu)
        sha = hashlib.sha256(blob).hexdigest()
        created_at = repr(float(self._clock()))
        meta_json = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
        signature = self._sign(version, sha, created_at, learner_id, meta_json) if self._secret else ""
        notice = json.dumps(
            {"version": version, "sha256": sha, "created_at": float(created_at), "learner_id": learner_id}
        )
        record = {
            "tensors": blob,
            "sha256": sha,
            "version": str(version),
            "created_at": created_at,
            "learner_id": learner_id,
            "metadata": meta_json,
            "signature": signature,
        }
        latest_sig = self._sign_parts("latest", version) if self._secret else ""
        args: list[object] = [version, self.keep, self._record_prefix, self.channel, notice, latest_sig]
        for name in _FIELDS:
            args += [name, record[name]]
        ok, detail = self._retry(
            lambda: self._publish_script(
                keys=[self._latest_key, self._versions_key, self._record_key(version), self._latest_sig_key],
                args=args,
            ),
            "publish weights",
        )
        if not int(ok):
            raise VersionConflictError(version, int(detail))
        if _text(detail) != "duplicate":
            entry = {"version": version, "step": int(metadata.get("step", -1)), "t": float(created_at),
                     "learner_id": learner_id}
            self._retry(lambda: self.client.rpush(self._publish_log_key, json.dumps(entry)), "RPUSH publish log")
        log.info(
            "weights %s: learner %s published version %d (%d bytes, sha256 %s)%s",
            self.namespace,
            learner_id,
            version,
            len(blob),
            sha[:12],
            " [duplicate replay]" if _text(detail) == "duplicate" else "",
        )
        return _record(version, sha, created_at, learner_id, metadata, signature, cpu, blob)

    def latest_version(self) -> int | None:
        """The newest published version, or None if none was (or, with a secret, if the pointer's
        signature does not verify: a forged or corrupted pointer is ignored, logged once)."""
        value, sig = self._retry(lambda: self.client.mget(self._latest_key, self._latest_sig_key), "GET latest")
        if value is None:
            return None
        try:
            version = int(value)
        except ValueError:
            version = None
        if version is not None and (
            self._secret is None
            or (sig is not None and hmac.compare_digest(self._sign_parts("latest", version), _text(sig)))
        ):
            return version
        if value != self._ignored_latest:
            self._ignored_latest = value
            log.error("weights %s: ignoring a `latest` pointer (%r) whose signature does not verify",
                      self.namespace, value[:32])
        return None

    def block(self, version: int, actor: str, reason: str) -> None:
        """Record, signed, that `version` was rolled back: no actor or learner takes it again."""
        entry = {"actor": actor, "reason": reason[:500], "t": time.time(),
                 "sig": self._sign_parts("blocked", version) if self._secret else ""}
        self._retry(lambda: self.client.hset(self._blocked_key, str(version), json.dumps(entry)), "HSET blocked")

    def blocked_versions(self) -> set[int]:
        """Versions a rollback blocked (with a secret: only verdicts whose signature verifies)."""
        raw = self._retry(lambda: self.client.hgetall(self._blocked_key), "HGETALL blocked")
        out: set[int] = set()
        for key, value in raw.items():
            try:
                version, entry = int(key), json.loads(value)
                sig = entry["sig"]
            except (ValueError, TypeError, KeyError):
                log.warning("weights %s: ignoring a malformed blocked-version entry %r", self.namespace, key[:32])
                continue
            if self._secret is None or (isinstance(sig, str) and hmac.compare_digest(self._sign_parts("blocked", version), sig)):
                out.add(version)
            else:
                log.warning("weights %s: ignoring an unsigned blocked-version entry %d", self.namespace, version)
        return out

    def publish_log(self) -> list[dict]:
        """One entry per version published here, oldest first: {version, step (the metadata's,
        -1 when absent), t (unix seconds), learner_id}; pruned versions stay listed."""
        raw = self._retry(lambda: self.client.lrange(self._publish_log_key, 0, -1), "LRANGE publish log")
        return [json.loads(entry) for entry in raw]

    def versions(self) -> list[int]:
        """Versions still kept, ascending."""
        values = self._retry(lambda: self.client.zrange(self._versions_key, 0, -1), "ZRANGE versions")
        return sorted(int(v) for v in values)

    def previous_version(self, version: int | None = None) -> int | None:
        """The newest kept version below `version` (default: below the latest): the rollback target."""
        kept = self.versions()
        if version is None:
            version = kept[-1] if kept else None
        older = [v for v in kept if version is not None and v < version]
        return older[-1] if older else None

    def fetch(self, version: int | None = None) -> WeightRecord:
        """Load and verify `version` (default latest).

        Raises WeightNotFoundError if it is not kept, WeightIntegrityError if the record is
        incomplete, its sha256 does not match its bytes, or (store with a secret) its signature is
        missing or wrong, or the bytes are not safetensors.
        """
        if version is None:
            version = self.latest_version()
            if version is None:
                raise WeightNotFoundError(f"no adapter weights published under namespace {self.namespace!r}")
        fields = self._retry(lambda: self.client.hgetall(self._record_key(version)), "HGETALL weights")
        if not fields:
            raise WeightNotFoundError(
                f"weight version {version} is not in the store (kept: {self.versions()})"
            )
        record = {_text(k): v for k, v in fields.items()}
        missing = [name for name in _FIELDS if name not in record]
        if missing:
            raise WeightIntegrityError(f"weight version {version}: record lacks {', '.join(missing)}")
        blob: bytes = record["tensors"]
        sha, created_at, learner_id = (
            _text(record["sha256"]),
            _text(record["created_at"]),
            _text(record["learner_id"]),
        )
        meta_json, signature = _text(record["metadata"]), _text(record["signature"])
        if _text(record["version"]) != str(version):
            raise WeightIntegrityError(
                f"weight version {version}: record says version {_text(record['version'])}"
            )
        actual = hashlib.sha256(blob).hexdigest()
        if not hmac.compare_digest(actual, sha):
            raise WeightIntegrityError(
                f"weight version {version}: sha256 mismatch (stored {sha[:12]}, computed {actual[:12]}): "
                "bytes corrupted"
            )
        if self._secret is not None:
            if not signature:
                raise WeightIntegrityError(
                    f"weight version {version} is unsigned but this store requires a signature"
                )
            expected = self._sign(version, sha, created_at, learner_id, meta_json)
            if not hmac.compare_digest(expected, signature):
                raise WeightIntegrityError(
                    f"weight version {version}: signature mismatch (wrong secret or tampered record)"
                )
        try:
            tensors = load_safetensors(blob)
            metadata = json.loads(meta_json)
        except (SafetensorError, ValueError) as err:
            raise WeightIntegrityError(f"weight version {version}: unreadable record: {err}") from err
        bad = _non_finite(tensors)
        if bad:
            raise WeightIntegrityError(f"weight version {version}: non-finite values in {', '.join(bad)}")
        return _record(version, sha, created_at, learner_id, metadata, signature, tensors, blob)

    def subscribe(self) -> WeightSubscriber:
        """A subscriber to this store's publish notices (subscribed from this call on)."""
        return WeightSubscriber(self)

    def _sign(self, version: int, sha: str, created_at: str, learner_id: str, meta_json: str) -> str:
        """HMAC of a record; `created_at` and `meta_json` are the exact stored strings."""
        return self._sign_parts("record", version, sha, created_at, learner_id, meta_json)

    def _sign_parts(self, kind: str, version: int, *parts: str) -> str:
        """HMAC-SHA256 over canonical JSON [kind, namespace, model id, exit layer, version, *parts]."""
        assert self._secret is not None
        message = json.dumps([kind, self.namespace, self.model_id, self.exit_layer, version, *parts],
                             separators=(",", ":")).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _record_key(self, version: int) -> str:
        return f"{self._record_prefix}{version}"

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return redis_call(fn, what=f"{what} ({self.namespace})")


class WeightSubscriber:
    """Waits for newer weight versions: pub/sub notices, backed by a `latest_version()` check.

    Subscribes on construction, so `wait` sees every version published after that moment, and
    one published before it through `latest_version()`. Close it (or use `with`) when done.
    """

    def __init__(self, store: WeightStore) -> None:
        self.store = store
        self._pubsub = store.client.pubsub(ignore_subscribe_messages=True)
        redis_call(lambda: self._pubsub.subscribe(store.channel), what=f"SUBSCRIBE {store.channel}")

    def wait(self, newer_than: int | None, timeout_s: float) -> int | None:
        """The newest version > `newer_than` (None: any), or None if none appears within `timeout_s`."""

        def newer(v: int | None) -> bool:
            return v is not None and (newer_than is None or v > newer_than)

        latest = self.store.latest_version()  # a version published before we subscribed
        best = latest if newer(latest) else None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            wait_s = 0.0 if best is not None else max(0.0, remaining)  # once found, only drain
            message = redis_call(
                lambda wait_s=wait_s: self._pubsub.get_message(timeout=wait_s),
                what=f"pub/sub {self.store.channel}",
            )
            if message is None:
                if best is not None or remaining <= 0:
                    break
                continue
            version = self._parse(message.get("data"))
            if newer(version) and (best is None or version > best):
                best = version
        if best is None:  # a notice lost while the connection was re-established
            latest = self.store.latest_version()
            best = latest if newer(latest) else None
        return best

    def _parse(self, data: object) -> int | None:
        try:
            version = json.loads(data)["version"]
        except (TypeError, ValueError, KeyError) as err:
            log.warning("weights %s: ignoring malformed notice %r: %s", self.store.namespace, data, err)
            return None
        if isinstance(version, bool) or not isinstance(version, int):
            log.warning("weights %s: ignoring notice with version %r", self.store.namespace, version)
            return None
        return version

    def close(self) -> None:
        self._pubsub.close()

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names (first three) of floating tensors holding NaN or infinity."""
    return sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))[:3]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
