"""The trajectory wire format: exact round trips and one precise reason per malformation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from common.core.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CodecError,
    RecordLimits,
    decode_trajectory,
    encode_trajectory,
)
from common.core.types import SCHEMA_VERSION
from tests.helpers import assert_trajectories_equal, make_trajectory


def _message(**overrides) -> dict:
    """A valid record as a mutable msgpack map."""
    return msgpack.unpackb(encode_trajectory(make_trajectory(**overrides)), raw=False)


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _reason(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> str:
    with pytest.raises(CodecError) as info:
        decode_trajectory(data, max_bytes)
    return str(info.value)


@pytest.mark.parametrize("n_drafted", [0, 1, 9, 40])
def test_round_trip_is_bit_exact(n_drafted: int) -> None:
    traj = make_trajectory(n_drafted=n_drafted, seed=n_drafted, k=3, weight_version=7)
    assert_trajectories_equal(decode_trajectory(encode_trajectory(traj)), traj)


def test_round_trip_keeps_special_float_bits_in_every_dtype() -> None:
    traj = make_trajectory(n_drafted=4, seed=1)
    # float16 hidden: -0.0, smallest subnormal, largest finite (validate forbids non-finite hidden)
    traj.hidden[0, :3] = torch.tensor([-0.0, 2.0**-24, 65504.0], dtype=torch.float16)
    # float32: a NaN with a custom payload, -inf, -0.0
    bits = np.array([0x7FC00123, 0xFF800000, 0x80000000, 0], dtype=np.uint32)
    traj.drafter_logprob[:] = torch.from_numpy(bits.view(np.float32))
    # float64: inf and the smallest subnormal
    traj.timestamp[:2] = torch.tensor([float("inf"), 5e-324], dtype=torch.float64)
    decoded = decode_trajectory(encode_trajectory(traj))
    assert_trajectories_equal(decoded, traj)
    assert decoded.drafter_logprob.numpy().view(np.uint32)[0] == 0x7FC00123


def test_non_contiguous_input_is_encoded_by_value() -> None:
    traj = make_trajectory(n_drafted=3, hidden=6, seed=2)
    traj.hidden = traj.hidden.t().contiguous().t()  # same values, transposed strides
    assert not traj.hidden.is_contiguous()
    assert torch.equal(decode_trajectory(encode_trajectory(traj)).hidden, traj.hidden)


def test_wire_bytes_are_little_endian_and_decoded_tensors_are_writable() -> None:
    traj = make_trajectory(n_drafted=1, seed=3)
    message = msgpack.unpackb(encode_trajectory(traj), raw=False)
    assert message["schema_version"] == SCHEMA_VERSION
    assert message["tensors"]["position"] == {
        "dtype": "int64",
        "shape": [1],
        "data": int(traj.position[0]).to_bytes(8, "little"),
    }
    decoded = decode_trajectory(_pack(message))
    decoded.hidden.add_(1)  # owns writable memory (np.frombuffer alone would be read-only)


def test_size_cap_on_encode_and_decode() -> None:
    traj = make_trajectory(n_drafted=8, hidden=64, seed=4)
    data = encode_trajectory(traj)
    assert decode_trajectory(data, max_bytes=len(data)).request_id == traj.request_id
    with pytest.raises(CodecError, match=rf"message too large: {len(data)} bytes > cap {len(data) - 1}"):
        encode_trajectory(traj, max_bytes=len(data) - 1)
    assert (
        _reason(data, max_bytes=len(data) - 1)
        == f"message too large: {len(data)} bytes > cap {len(data) - 1}"
    )
    # the cap is checked before parsing: oversized garbage gets the size reason, not a parse error
    assert _reason(b"\xc1" * 100, max_bytes=10).startswith("message too large: 100 bytes")


def test_encode_refuses_an_invalid_trajectory() -> None:
    traj = make_trajectory(n_drafted=3, seed=5)
    traj.position = traj.position.to(torch.int32)
    with pytest.raises(CodecError, match="invalid trajectory: position must be a rank-1 torch.int64"):
        encode_trajectory(traj)


def _mutated(mutate) -> bytes:
    message = _message(n_drafted=3, seed=6)
    mutate(message)
    return _pack(message)


def _set_tensor(name: str, **fields):
    return lambda m: m["tensors"][name].update(fields)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1\x00garbage", "not a msgpack record: "),
        (encode_trajectory(make_trajectory(n_drafted=2)) + b"\x00", "not a msgpack record: ExtraData"),
        (b"", "not a msgpack record: "),
        (_pack([1, 2, 3]), "record must be a map, got list"),
        (
            _mutated(lambda m: m.update(schema_version=SCHEMA_VERSION + 1)),
            f"unsupported schema version {SCHEMA_VERSION + 1}",
        ),
        (_mutated(lambda m: m.pop("schema_version")), "unsupported schema version None"),
        (_mutated(lambda m: m.update(extra=1)), "unknown record field(s): extra"),
        (_mutated(lambda m: m["scalars"].update(colour="red")), "unknown scalars field(s): colour"),
        (_mutated(lambda m: m["scalars"].pop("exit_layer")), "missing scalars field(s): exit_layer"),
        (_mutated(lambda m: m["tensors"].pop("hidden")), "missing tensors field(s): hidden"),
        (
            _mutated(lambda m: m["tensors"].update(logits=m["tensors"]["token"])),
            "unknown tensors field(s): logits",
        ),
        (_mutated(lambda m: m.update(tensors=[])), "scalars and tensors must be maps"),
        (_mutated(lambda m: m["tensors"].update(token=[1, 2])), "tensor token: must be a map"),
        (_mutated(lambda m: m["tensors"]["token"].pop("shape")), "missing tensor token field(s): shape"),
        (_mutated(_set_tensor("hidden", dtype="bfloat16")), "tensor hidden: unknown dtype 'bfloat16'"),
        (_mutated(_set_tensor("token", dtype="int32")), "tensor token: unknown dtype 'int32'"),
        # right byte count for float32 ([3] x 4 bytes = 12), wrong dtype for the field
        (
            _mutated(_set_tensor("position", dtype="float32", data=b"\x00" * 12)),
            "tensor position: dtype float32, expected int64",
        ),
        # [3] int64 needs 3 * 8 = 24 bytes
        (
            _mutated(_set_tensor("token", data=b"\x00" * 23)),
            "tensor token: 23 bytes, expected 24 for shape [3] int64",
        ),
        (
            _mutated(_set_tensor("token", shape=[-3])),
            "tensor token: shape must be a list of non-negative ints",
        ),
        (_mutated(_set_tensor("token", shape=[10**12])), "tensor token: dimension over"),
        # a zero next to a huge dimension has the right byte count (0) and would overflow numpy
        (_mutated(_set_tensor("verified_topk_ids", shape=[0, 2**62], data=b"")), "tensor verified_topk_ids: dimension over"),
        (_mutated(_set_tensor("token", shape=[1] * 65)), "tensor token: rank 65, expected 1"),
        (_mutated(_set_tensor("token", data="abc")), "tensor token: data must be bytes"),
        (
            _mutated(_set_tensor("accepted", data=b"\x01\x02\x00")),
            "tensor accepted: bool bytes must be 0 or 1",
        ),
        (_mutated(_set_tensor("token", shape=[1, 3])), "tensor token: rank 2, expected 1"),
        (
            _mutated(lambda m: m["scalars"].update(request_id="r" * 7_000_000)),
            "invalid trajectory: request_id must have 1..256 characters",
        ),
        (
            _mutated(lambda m: m["scalars"].update(weight_version="3")),
            "invalid trajectory: weight_version must be int",
        ),
        (
            _mutated(_set_tensor("position", data=np.array([0, 1, 10_000], dtype="<i8").tobytes())),
            "invalid trajectory: position must index hidden",
        ),
    ],
)
def test_each_malformation_has_its_reason(data: bytes, reason: str) -> None:
    assert _reason(data).startswith(reason)


def test_non_bytes_payload_is_refused() -> None:
    with pytest.raises(CodecError, match="payload must be bytes, got str"):
        decode_trajectory("not bytes", DEFAULT_MAX_MESSAGE_BYTES)  # type: ignore[arg-type]


# make_trajectory's defaults: hidden size 16, exit layer 2, token ids below 100
LIMITS = RecordLimits(vocab_size=100, hidden_size=16, exit_layer=2)


def _limit_reason(traj) -> str:
    with pytest.raises(CodecError) as info:
        decode_trajectory(encode_trajectory(traj), limits=LIMITS)
    return str(info.value)


def test_a_record_that_fits_the_model_passes_its_limits() -> None:
    traj = make_trajectory(n_drafted=5, seed=8)
    assert_trajectories_equal(decode_trajectory(encode_trajectory(traj), limits=LIMITS), traj)


def test_records_are_validated_against_the_model() -> None:
    traj = make_trajectory(n_drafted=5, seed=9)
    traj.token[0] = 100  # one past the vocabulary: an IndexError in the learner, before the check
    assert _limit_reason(traj) == "token holds token ids outside [0, 100)"
    traj = make_trajectory(n_drafted=5, seed=9)
    traj.verifier_topk_ids[1, 0] = -1
    assert _limit_reason(traj) == "verifier_topk_ids holds token ids outside [0, 100)"
    assert _limit_reason(make_trajectory(n_drafted=5, hidden=8)).startswith("hidden has 8 columns")
    assert _limit_reason(make_trajectory(n_drafted=5, exit_layer=3)) == "exit_layer 3, this drafter's is 2"
    traj = make_trajectory(n_drafted=5, seed=9)
    traj.verifier_topk_logprobs[0, 0] = float("nan")
    assert _limit_reason(traj).startswith("verifier_topk_logprobs holds values that are not log-probabilities")


def test_random_corruption_raises_only_codec_errors() -> None:
    """Seeded byte flips, truncations and splices of valid records: CodecError or a valid record."""
    rng = np.random.default_rng(0)
    good = encode_trajectory(make_trajectory(n_drafted=6, seed=10))
    for _ in range(400):
        data = bytearray(good)
        kind = rng.integers(3)
        if kind == 0:
            for pos in rng.integers(len(data), size=rng.integers(1, 8)):
                data[pos] = int(rng.integers(256))
        elif kind == 1:
            data = data[: rng.integers(len(data))]
        else:
            cut = rng.integers(len(data))
            data = data[:cut] + bytes(rng.integers(256, size=rng.integers(1, 64), dtype=np.uint8)) + data[cut:]
        try:
            decode_trajectory(bytes(data), limits=LIMITS)
        except CodecError:
            pass
