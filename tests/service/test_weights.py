"""WeightStore against a real Redis: exact round trips, integrity checks, versions, notices."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch

from common.transport.redis.weights import WeightIntegrityError, WeightNotFoundError, WeightStore

SECRET = b"test-secret"


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    """A LoRA-like adapter in every dtype a drafter may ship."""
    g = torch.Generator().manual_seed(seed)
    return {
        "exit.q_proj.lora_A": torch.randn(4, 16, generator=g),
        "exit.q_proj.lora_B": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "exit.lm_head.lora_A": torch.randn(4, 16, generator=g).to(torch.float16),
        "exit.step": torch.tensor([seed], dtype=torch.int64),
    }


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].view(torch.uint8).tolist() == tensor.view(torch.uint8).tolist(), name


def _record_key(ns: str, version: int) -> str:
    return f"{ns}:weights:v:{version}"


def test_publish_fetch_round_trip_is_bit_exact(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns)
    assert store.latest_version() is None
    with pytest.raises(WeightNotFoundError, match="no adapter weights published"):
        store.fetch()
    tensors = _adapter(0)
    tensors["exit.q_proj.lora_A"][0, :3] = torch.tensor([1e-45, -0.0, 3.4e38])  # subnormal, -0, near max
    published = store.publish(tensors, version=1, learner_id="learner-0", metadata={"step": "10"})
    record = store.fetch()
    assert store.latest_version() == 1 and store.versions() == [1]
    assert (record.version, record.learner_id, record.metadata, record.signature) == (
        1,
        "learner-0",
        {"step": "10"},
        None,
    )
    assert (
        record.sha256
        == published.sha256
        == hashlib.sha256(redis_client.hget(_record_key(redis_ns, 1), "tensors")).hexdigest()
    )
    assert record.created_at == published.created_at
    _assert_bit_exact(record.tensors, tensors)


def test_versions_must_strictly_increase(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns)
    store.publish(_adapter(0), version=5, learner_id="learner-0")
    for stale in (5, 4):
        with pytest.raises(
            ValueError, match=f"weight version {stale} is not newer than the latest published version 5"
        ):
            store.publish(_adapter(1), version=stale, learner_id="learner-1")
    _assert_bit_exact(store.fetch(5).tensors, _adapter(0))  # the refused publish changed nothing
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="version must be an int >= 0"):
            store.publish(_adapter(1), version=bad, learner_id="learner-0")  # type: ignore[arg-type]


def test_an_identical_retry_is_accepted_once_and_anything_else_refused(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns, clock=lambda: 1_700_000_000.25)
    first = store.publish(_adapter(0), version=1, learner_id="learner-0")
    # a retry after a dropped connection replays the same record: accepted, nothing changes
    assert store.publish(_adapter(0), version=1, learner_id="learner-0").sha256 == first.sha256
    assert store.versions() == [1] and store.fetch(1).created_at == 1_700_000_000.25
    with pytest.raises(ValueError, match="weight version 1 is not newer"):
        store.publish(_adapter(1), version=1, learner_id="learner-0")


def test_old_versions_are_pruned_and_the_previous_one_stays_for_rollback(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns, keep=2)
    for version in (1, 2, 3):
        store.publish(_adapter(version), version=version, learner_id="learner-0")
    assert store.versions() == [2, 3]
    assert not redis_client.exists(_record_key(redis_ns, 1))
    with pytest.raises(WeightNotFoundError, match=r"weight version 1 is not in the store \(kept: \[2, 3\]\)"):
        store.fetch(1)
    assert store.previous_version() == 2 and store.previous_version(2) is None
    _assert_bit_exact(store.fetch(store.previous_version()).tensors, _adapter(2))


def test_tampered_bytes_are_refused(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns)
    store.publish(_adapter(0), version=1, learner_id="learner-0")
    blob = bytearray(redis_client.hget(_record_key(redis_ns, 1), "tensors"))
    blob[-1] ^= 0x01  # one flipped bit in the last tensor's data
    redis_client.hset(_record_key(redis_ns, 1), "tensors", bytes(blob))
    with pytest.raises(WeightIntegrityError, match="weight version 1: sha256 mismatch .*bytes corrupted"):
        store.fetch(1)
    # consistent garbage (hash updated too) passes the hash but is not safetensors
    redis_client.hset(
        _record_key(redis_ns, 1), mapping={"tensors": b"junk", "sha256": hashlib.sha256(b"junk").hexdigest()}
    )
    with pytest.raises(WeightIntegrityError, match="unreadable record"):
        store.fetch(1)


def test_signatures_are_required_and_checked_with_a_secret(redis_client, redis_ns) -> None:
    signed = WeightStore(redis_client, redis_ns, secret=SECRET)
    record = signed.publish(_adapter(1), version=1, learner_id="learner-0")
    assert record.signature is not None and len(record.signature) == 64
    _assert_bit_exact(signed.fetch(1).tensors, _adapter(1))
    assert WeightStore(redis_client, redis_ns).fetch(1).version == 1  # a reader without a secret skips it

    with pytest.raises(WeightIntegrityError, match="signature mismatch"):
        WeightStore(redis_client, redis_ns, secret=b"other-secret").fetch(1)

    key = _record_key(redis_ns, 1)
    # an attacker who rewrites the bytes and their hash still cannot forge the signature
    forged = WeightStore(redis_client, f"{redis_ns}:scratch").publish(
        _adapter(9), version=1, learner_id="evil"
    )
    redis_client.hset(
        key,
        mapping={
            "tensors": redis_client.hget(f"{redis_ns}:scratch:weights:v:1", "tensors"),
            "sha256": forged.sha256,
        },
    )
    with pytest.raises(WeightIntegrityError, match="signature mismatch"):
        signed.fetch(1)

    signed.publish(_adapter(2), version=2, learner_id="learner-0")
    redis_client.hset(_record_key(redis_ns, 2), "learner_id", "someone-else")  # signed fields too
    with pytest.raises(WeightIntegrityError, match="signature mismatch"):
        signed.fetch(2)
    redis_client.hset(_record_key(redis_ns, 2), mapping={"learner_id": "learner-0", "signature": ""})
    with pytest.raises(
        WeightIntegrityError, match="version 2 is unsigned but this store requires a signature"
    ):
        signed.fetch(2)

    WeightStore(redis_client, redis_ns).publish(_adapter(3), version=3, learner_id="learner-0")  # no secret
    with pytest.raises(WeightIntegrityError, match="version 3 is unsigned"):
        signed.fetch(3)


def test_subscriber_receives_publish_notices(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns)
    raw = redis_client.pubsub(ignore_subscribe_messages=True)
    raw.subscribe(store.channel)
    with store.subscribe() as subscriber:
        start = time.monotonic()
        assert subscriber.wait(newer_than=None, timeout_s=0.2) is None
        assert time.monotonic() - start >= 0.19

        publisher = threading.Timer(
            0.1, lambda: store.publish(_adapter(1), version=7, learner_id="learner-0")
        )
        publisher.start()
        start = time.monotonic()
        assert subscriber.wait(newer_than=None, timeout_s=5.0) == 7
        assert time.monotonic() - start < 2.0  # woken by the notice, not the timeout
        publisher.join()
        assert subscriber.wait(newer_than=7, timeout_s=0.1) is None
        assert subscriber.wait(newer_than=6, timeout_s=5.0) == 7  # already published: no waiting

    message = None
    for _ in range(50):
        message = raw.get_message(timeout=0.1)
        if message is not None:
            break
    raw.close()
    assert message is not None
    notice = json.loads(message["data"])
    assert notice["version"] == 7 and notice["learner_id"] == "learner-0" and len(notice["sha256"]) == 64


def test_malformed_notices_are_ignored(redis_client, redis_ns) -> None:
    store = WeightStore(redis_client, redis_ns)
    with store.subscribe() as subscriber:
        redis_client.publish(store.channel, b"not json")
        redis_client.publish(store.channel, json.dumps({"version": "9"}))
        assert subscriber.wait(newer_than=None, timeout_s=0.2) is None


# ---- the adversarial suite (issue 14): every forgery refused, nothing spins ------------------


def _store(client, ns: str, secret: bytes | None = SECRET, model_id: str = "stories260K", exit_layer: int = 2):
    return WeightStore(client, ns, secret, model_id=model_id, exit_layer=exit_layer)


def test_a_record_verifies_only_in_its_own_run_model_exit_layer_and_version(redis_client, redis_ns) -> None:
    run_a = _store(redis_client, f"{redis_ns}:a")
    run_a.publish(_adapter(1), version=1, learner_id="learner-0")
    record = {k.decode(): v for k, v in redis_client.hgetall(f"{redis_ns}:a:weights:v:1").items()}
    # cross-run replay: the same bytes and signature copied into another run's namespace
    redis_client.hset(_record_key(f"{redis_ns}:b", 1), mapping=record)
    with pytest.raises(WeightIntegrityError, match="signature mismatch"):
        _store(redis_client, f"{redis_ns}:b").fetch(1)
    # the same run's record read by a drafter of another model or exit layer
    for other in (_store(redis_client, f"{redis_ns}:a", model_id="smollm2"), _store(redis_client, f"{redis_ns}:a", exit_layer=3)):
        with pytest.raises(WeightIntegrityError, match="signature mismatch"):
            other.fetch(1)
    # relabelled as a later version (the record's own version field rewritten to match)
    redis_client.hset(_record_key(f"{redis_ns}:a", 7), mapping={**record, "version": "7"})
    with pytest.raises(WeightIntegrityError, match="signature mismatch"):
        run_a.fetch(7)
    assert run_a.fetch(1).version == 1


def test_unsigned_and_non_finite_weights_are_refused_before_anyone_swaps_them(redis_client, redis_ns) -> None:
    signed = _store(redis_client, redis_ns)
    unsigned = WeightStore(redis_client, redis_ns, model_id="stories260K", exit_layer=2)
    unsigned.publish(_adapter(1), version=1, learner_id="evil")
    with pytest.raises(WeightIntegrityError, match="version 1 is unsigned"):
        signed.fetch(1)
    poisoned = _adapter(2)
    poisoned["exit.q_proj.lora_A"][:] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in exit.q_proj.lora_A: not published"):
        signed.publish(poisoned, version=2, learner_id="learner-0")
    # written around the store (valid sha256 of NaN bytes): refused on fetch, signed or not
    from safetensors.torch import save

    blob = save(poisoned)
    redis_client.hset(_record_key(redis_ns, 3), mapping={
        "tensors": blob, "sha256": hashlib.sha256(blob).hexdigest(), "version": "3", "created_at": "1.0",
        "learner_id": "evil", "metadata": "{}", "signature": ""})
    with pytest.raises(WeightIntegrityError, match="non-finite values in exit.q_proj.lora_A"):
        unsigned.fetch(3)


def test_a_forged_latest_pointer_is_ignored_and_does_not_block_publishing(redis_client, redis_ns) -> None:
    store = _store(redis_client, redis_ns)
    store.publish(_adapter(1), version=1, learner_id="learner-0")
    assert store.latest_version() == 1
    redis_client.set(f"{redis_ns}:weights:latest", 10**12)
    assert store.latest_version() is None  # its signature does not verify: ignored
    store.publish(_adapter(2), version=2, learner_id="learner-0")  # judged by the stored records
    assert store.latest_version() == 2
    redis_client.set(f"{redis_ns}:weights:latest:sig", "0" * 64)
    assert store.latest_version() is None


def test_blocked_versions_are_stored_signed(redis_client, redis_ns) -> None:
    store = _store(redis_client, redis_ns)
    store.block(4, actor="actor-1", reason="acceptance 0.61 -> 0.02")
    assert store.blocked_versions() == {4}
    assert _store(redis_client, redis_ns).blocked_versions() == {4}  # another process, same run
    WeightStore(redis_client, redis_ns).block(5, actor="evil", reason="unsigned")
    redis_client.hset(f"{redis_ns}:weights:blocked", "6", "not json")
    assert store.blocked_versions() == {4}  # unsigned and malformed verdicts ignored
    assert _store(redis_client, f"{redis_ns}:other").blocked_versions() == set()


def test_the_secret_comes_from_a_file_or_the_environment_never_from_arguments(tmp_path, monkeypatch) -> None:
    from common.core.errors import ServiceError
    from common.transport.redis.weights import load_secret, write_secret_file

    monkeypatch.delenv("DVI_WEIGHT_SECRET", raising=False)
    monkeypatch.delenv("DVI_WEIGHT_SECRET_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.dvi/weight-secret
    assert load_secret() is None
    path = write_secret_file(tmp_path / "run" / "weight-secret")
    assert path.stat().st_mode & 0o777 == 0o600 and len(load_secret(path)) == 64
    monkeypatch.setenv("DVI_WEIGHT_SECRET_FILE", str(path))
    assert load_secret() == path.read_bytes().strip()
    monkeypatch.setenv("DVI_WEIGHT_SECRET", "from-env")
    assert load_secret() == b"from-env"
    with pytest.raises(ServiceError, match="cannot read the weight secret file"):
        load_secret(tmp_path / "missing")
