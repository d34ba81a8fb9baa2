"""On-disk learner checkpoints: one directory, written atomically, read back with full validation.

Layout of a checkpoint directory (format `CHECKPOINT_FORMAT`; no pickle anywhere):

  adapter/                  the drafter adapter, `SplitModel.save_adapter` (peft format: loadable by a plain
                            `peft.PeftModel.from_pretrained`) + dvi_adapter.json (model fingerprint, exit layer)
  learner.json              step, weight version, EMA baseline, counters, seen request ids, optimiser
                            hyper-parameters (for the record), the LearnerConfig (for the record)
  learner_state.safetensors optimiser moments keyed `optim/<param name>/<key>` and RNG states `rng/<name>`
  replay.msgpack            a msgpack array of replay trajectories, oldest first, each in the wire codec

`write_checkpoint` builds the directory under a temporary name beside the target and renames it
into place, so a crash never leaves a half-written checkpoint at the target path (an older checkpoint
there is renamed aside first and deleted last). `read_checkpoint` parses every file before returning,
raising `AdapterError` naming the file and the problem, so a caller can validate everything before
it changes any state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.core.codec import CodecError, decode_trajectory, encode_trajectory
from common.core.errors import AdapterError
from common.model.split import ADAPTER_META_FILE, with_draft_vocab
from common.core.types import Trajectory

CHECKPOINT_FORMAT = 1
ADAPTER_DIR = "adapter"
META_FILE = "learner.json"
TENSORS_FILE = "learner_state.safetensors"
REPLAY_FILE = "replay.msgpack"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_MAX_RECORD_BYTES = 1 << 31  # a full-vocabulary trajectory can exceed the wire cap; disk has no such limit


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, parsed but not yet applied to any learner.

    meta: learner.json; adapter_meta: adapter/dvi_adapter.json; adapter_tensors: peft names -> tensors;
    tensors: learner_state.safetensors (optimiser moments and RNG states); replay: oldest first.
    """

    directory: Path
    meta: dict
    adapter_meta: dict
    adapter_tensors: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    replay: list[Trajectory]


def write_checkpoint(
    directory: str | Path,
    save_adapter,  # callable(Path) writing the adapter directory (SplitModel.save_adapter)
    meta: dict,
    tensors: dict[str, torch.Tensor],
    replay: list[Trajectory],
) -> Path:
    """Write a checkpoint at `directory` atomically (temp dir + rename); returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_adapter(staging / ADAPTER_DIR)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / TENSORS_FILE))
        records = [encode_trajectory(t, max_bytes=_MAX_RECORD_BYTES) for t in replay]
        (staging / REPLAY_FILE).write_bytes(msgpack.packb(records, use_bin_type=True))
        (staging / META_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **meta}, indent=1))
        _fsync_tree(staging)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rmdir(old)
            os.rename(directory, old)
        os.rename(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_checkpoint(directory: str | Path) -> CheckpointContents:
    """Parse a checkpoint directory; AdapterError naming the file for anything missing or corrupt."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"checkpoint not found: {directory}")
    adapter = directory / ADAPTER_DIR
    for path in (directory / META_FILE, directory / TENSORS_FILE, directory / REPLAY_FILE,
                 adapter / ADAPTER_META_FILE, adapter / ADAPTER_WEIGHTS_FILE):
        if not path.is_file():
            raise AdapterError(f"{directory} is not a complete dvi learner checkpoint ({path.name} is missing)")
    meta = _read_json(directory / META_FILE)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise AdapterError(f"{directory / META_FILE}: unsupported checkpoint format {meta.get('format')!r}")
    for key, kind in (("step", int), ("version", int), ("counters", dict), ("seen_request_ids", list),
                      ("baseline", dict), ("replay_counters", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise AdapterError(f"{directory / META_FILE} is corrupt: '{key}' must be a {kind.__name__}")
    adapter_meta = _read_json(adapter / ADAPTER_META_FILE)
    adapter_tensors = with_draft_vocab(_read_safetensors(adapter / ADAPTER_WEIGHTS_FILE), adapter_meta, str(adapter / ADAPTER_META_FILE))
    tensors = _read_safetensors(directory / TENSORS_FILE)
    replay = _read_replay(directory / REPLAY_FILE)
    return CheckpointContents(directory, meta, adapter_meta, adapter_tensors, tensors, replay)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupt: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path} is corrupt: expected a JSON object")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} is corrupt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _read_replay(path: Path) -> list[Trajectory]:
    try:
        records = msgpack.unpackb(path.read_bytes(), raw=False, use_list=True)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise AdapterError(f"{path} is corrupt: not a msgpack array ({type(exc).__name__})") from None
    if not isinstance(records, list):
        raise AdapterError(f"{path} is corrupt: expected an array of trajectory records")
    out = []
    for i, record in enumerate(records):
        try:
            out.append(decode_trajectory(record, max_bytes=_MAX_RECORD_BYTES))
        except CodecError as exc:
            raise AdapterError(f"{path} is corrupt: record {i}: {exc}") from None
    return out


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk before the rename publishes the directory."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def has_checkpoint(directory: str | Path | None) -> bool:
    """True when `directory` holds something a previous run saved."""
    if directory is None:
        return False
    path = Path(directory)
    return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())


def find_checkpoint(directory: str | Path | None) -> Path | None:
    """The checkpoint to resume from: `directory`, or, if a crash hit the moment between the
    writer moving the old checkpoint aside and renaming the new one in, the newest set-aside one."""
    if directory is None:
        return None
    path = Path(directory)
    if has_checkpoint(path):
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime) if path.parent.is_dir() else []
    return aside[-1] if aside and has_checkpoint(aside[-1]) else None
