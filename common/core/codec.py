"""Wire format of a `Trajectory`: one msgpack map per record, strict on the way in.

Layout (schema version `common.core.types.SCHEMA_VERSION`):

    {"schema_version": 1,
     "scalars": {"request_id": str, "weight_version": int, ...},     # exactly SCALAR_FIELDS
     "tensors": {"hidden": {"dtype": "float16", "shape": [T, H], "data": <bin>}, ...}}
                                                                      # exactly TENSOR_FIELDS

Tensor bytes are the C-contiguous little-endian element bytes, so a round trip is bit-exact for
every dtype in `_DTYPES` (NaN payloads and -0.0 included) on any host byte order.

Decoding trusts nothing: the size cap is checked before parsing, every key, dtype, rank, shape
and byte length is checked before a tensor is built, the result must pass
`Trajectory.validate()`, and, given `RecordLimits`, the record must fit the model that will
train on it (vocabulary, hidden size, exit layer). Every failure raises `CodecError` (and only
`CodecError`: an unexpected numpy or torch error on hostile bytes is turned into one) whose
message is a short reason; the transport stores that reason in the dead-letter stream. Imports
only numpy, torch, msgpack.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import torch

from dataclasses import dataclass

from common.core.types import SCALAR_FIELDS, SCHEMA_VERSION, TENSOR_FIELDS, Trajectory, TrajectoryError

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# wire dtype name -> (torch dtype, explicit little-endian numpy dtype)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float16": (torch.float16, np.dtype("<f2")),
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "int64": (torch.int64, np.dtype("<i8")),
    "bool": (torch.bool, np.dtype("?")),
}
_NAME_OF: dict[torch.dtype, str] = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_MAX_DIM = 2**31 - 1
_TOP_KEYS = frozenset({"schema_version", "scalars", "tensors"})
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


class CodecError(ValueError):
    """A record that cannot be encoded or decoded; `str(err)` is a short reason for the dead letter."""


@dataclass(frozen=True)
class RecordLimits:
    """What a trajectory must fit to be trained on by one model's drafter (`check_limits`)."""

    vocab_size: int
    """Token ids (tokens, token, target_token, top-K ids) must lie in [0, vocab_size)."""
    hidden_size: int
    """`hidden` must have exactly this many columns."""
    exit_layer: int
    """The record's exit_layer must equal the drafter's k."""
    max_context: int | None = None
    """Most context positions T a record may carry (None: no cap beyond the message size)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "exit_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context must be >= 1 or None, got {self.max_context}")


_ID_FIELDS = ("tokens", "token", "target_token", "verifier_topk_ids", "verified_topk_ids")


def check_limits(traj: Trajectory, limits: RecordLimits) -> Trajectory:
    """Raise CodecError naming the first way `traj` does not fit `limits`' model; return `traj`."""
    if traj.exit_layer != limits.exit_layer:
        raise CodecError(f"exit_layer {traj.exit_layer}, this drafter's is {limits.exit_layer}")
    if traj.hidden.shape[1] != limits.hidden_size:
        raise CodecError(f"hidden has {traj.hidden.shape[1]} columns, the model's hidden size is {limits.hidden_size}")
    if limits.max_context is not None and traj.num_context > limits.max_context:
        raise CodecError(f"{traj.num_context} context positions > cap {limits.max_context}")
    for name in _ID_FIELDS:
        ids = getattr(traj, name)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limits.vocab_size):
            raise CodecError(f"{name} holds token ids outside [0, {limits.vocab_size})")
    for name in ("drafter_logprob", "verifier_topk_logprobs", "verified_topk_logprobs"):
        values = getattr(traj, name)
        if values.numel() and not bool((values <= 0).all()):  # NaN compares False: refused too
            raise CodecError(f"{name} holds values that are not log-probabilities (NaN or > 0)")
    return traj


def encode_trajectory(traj: Trajectory, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Validate `traj` and serialise it; raise CodecError if invalid or longer than `max_bytes`.

    Tensors may live on any device and need not be contiguous; they are copied to CPU.
    """
    try:
        traj.validate()
    except TrajectoryError as err:
        raise CodecError(f"invalid trajectory: {err}") from err
    message = {
        "schema_version": SCHEMA_VERSION,
        "scalars": traj.scalars(),
        "tensors": {name: _encode_tensor(value) for name, value in traj.tensors().items()},
    }
    data = msgpack.packb(message, use_bin_type=True)
    if len(data) > max_bytes:
        raise CodecError(f"message too large: {len(data)} bytes > cap {max_bytes}")
    return data


def decode_trajectory(
    data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, limits: RecordLimits | None = None
) -> Trajectory:
    """Parse and fully validate one record (against `limits` when given); raise CodecError with a
    short reason on any breach, and nothing else.

    Returns a Trajectory whose tensors are CPU, contiguous, writable and own their memory.
    """
    try:
        traj = _decode(data, max_bytes)
        return traj if limits is None else check_limits(traj, limits)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError, RuntimeError, MemoryError) as err:
        # hostile bytes can reach numpy/torch corners the checks above do not name
        raise CodecError(f"malformed record: {type(err).__name__}: {str(err)[:200]}") from err


def _decode(data: bytes, max_bytes: int) -> Trajectory:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"message too large: {len(data)} bytes > cap {max_bytes}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (msgpack.UnpackException, ValueError, TypeError) as err:
        raise CodecError(f"not a msgpack record: {type(err).__name__}") from err
    if not isinstance(message, dict):
        raise CodecError(f"record must be a map, got {type(message).__name__}")
    version = message.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CodecError(f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})")
    _check_keys("record", message, _TOP_KEYS)
    scalars, tensors = message["scalars"], message["tensors"]
    if not isinstance(scalars, dict) or not isinstance(tensors, dict):
        raise CodecError("scalars and tensors must be maps")
    _check_keys("scalars", scalars, frozenset(SCALAR_FIELDS))
    _check_keys("tensors", tensors, frozenset(TENSOR_FIELDS))
    values = dict(scalars)
    for name, (expected_dtype, rank) in TENSOR_FIELDS.items():
        values[name] = _decode_tensor(name, tensors[name], expected_dtype, rank)
    try:
        return Trajectory(**values).validate()
    except TrajectoryError as err:
        raise CodecError(f"invalid trajectory: {err}") from err


def _check_keys(where: str, mapping: dict, expected: frozenset[str]) -> None:
    unknown = sorted(str(key) for key in mapping if key not in expected)
    if unknown:
        raise CodecError(f"unknown {where} field(s): {', '.join(unknown)}")
    missing = sorted(expected - set(mapping))
    if missing:
        raise CodecError(f"missing {where} field(s): {', '.join(missing)}")


def _encode_tensor(tensor: torch.Tensor) -> dict[str, object]:
    """{dtype name, shape list, little-endian bytes} of one tensor whose dtype is in `_DTYPES`."""
    name = _NAME_OF.get(tensor.dtype)
    if name is None:
        raise CodecError(f"cannot encode dtype {tensor.dtype}")
    array = tensor.detach().cpu().contiguous().numpy()
    return {
        "dtype": name,
        "shape": list(tensor.shape),
        "data": array.astype(_DTYPES[name][1], copy=False).tobytes(),
    }


def _decode_tensor(field: str, entry: object, expected: torch.dtype, rank: int) -> torch.Tensor:
    """Rebuild `field` from its wire map, checking dtype, rank, shape and byte length first."""
    if not isinstance(entry, dict):
        raise CodecError(f"tensor {field}: must be a map")
    _check_keys(f"tensor {field}", entry, _TENSOR_KEYS)
    dtype_name, shape, raw = entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise CodecError(f"tensor {field}: unknown dtype {dtype_name!r}")
    torch_dtype, np_dtype = _DTYPES[dtype_name]
    if torch_dtype != expected:
        raise CodecError(f"tensor {field}: dtype {dtype_name}, expected {_NAME_OF[expected]}")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise CodecError(f"tensor {field}: shape must be a list of non-negative ints")
    if len(shape) != rank:
        raise CodecError(f"tensor {field}: rank {len(shape)}, expected {rank}")
    if any(dim > _MAX_DIM for dim in shape):  # a zero next to a huge dim passes the byte check
        raise CodecError(f"tensor {field}: dimension over {_MAX_DIM} in shape {shape}")
    if not isinstance(raw, bytes):
        raise CodecError(f"tensor {field}: data must be bytes")
    expected_len = math.prod(shape) * np_dtype.itemsize
    if len(raw) != expected_len:
        raise CodecError(
            f"tensor {field}: {len(raw)} bytes, expected {expected_len} for shape {shape} {dtype_name}"
        )
    array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if torch_dtype == torch.bool and array.size and array.view(np.uint8).max() > 1:
        raise CodecError(f"tensor {field}: bool bytes must be 0 or 1")
    # astype to native byte order, then copy: the tensor must own writable memory.
    return torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))
