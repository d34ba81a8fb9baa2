"""The learner's memory of request ids it has taken in, bounded by weight version and by count.

At-least-once delivery can hand the learner a trajectory twice (a producer retry, a replay after
a crash); the learner applies a request id once. Remembering every id forever grows without
bound (and every id is rewritten into each checkpoint), so `SeenWindow` forgets an id once its
weight version is more than `window_versions` below the learner's current version. Under the
"drop" staleness policy the window is `max_staleness`: a duplicate older than that is dropped as
stale anyway, so forgetting it changes no update. `max_ids` caps the count as well (oldest
versions forgotten first) against a flood of distinct ids within one version.

Pure: no torch, no Redis.
"""

from __future__ import annotations

from collections.abc import Iterable


class SeenWindow:
    """Request ids with the weight version that drafted them; `add` says whether an id is new."""

    def __init__(self, window_versions: int, max_ids: int = 200_000) -> None:
        if window_versions < 0 or max_ids < 1:
            raise ValueError(f"need window_versions >= 0 and max_ids >= 1, got {window_versions}, {max_ids}")
        self.window_versions = window_versions
        self.max_ids = max_ids
        self._ids: dict[str, int] = {}
        self.forgotten = 0
        """Ids dropped from the window so far (by version or count)."""

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def add(self, request_id: str, version: int) -> bool:
        """Remember `request_id` (drafted by `version`); False if it was already remembered."""
        if request_id in self._ids:
            return False
        self._ids[request_id] = int(version)
        if len(self._ids) > self.max_ids:
            self._forget(sorted(self._ids, key=self._ids.__getitem__)[: len(self._ids) - self.max_ids])
        return True

    def prune(self, current_version: int) -> int:
        """Forget ids drafted more than `window_versions` below `current_version`; return how many."""
        oldest = current_version - self.window_versions
        old = [rid for rid, v in self._ids.items() if v < oldest]
        self._forget(old)
        return len(old)

    def _forget(self, ids: Iterable[str]) -> None:
        for rid in ids:
            del self._ids[rid]
            self.forgotten += 1

    def state(self) -> list[list]:
        """JSON-able [[request_id, version], ...], sorted by id (the checkpoint's form)."""
        return [[rid, v] for rid, v in sorted(self._ids.items())]

    def load(self, state: list, default_version: int) -> None:
        """Replace the contents with `state` (pairs, or bare ids of an older checkpoint, which get
        `default_version`). ValueError for anything else."""
        ids: dict[str, int] = {}
        for item in state:
            if isinstance(item, str):
                ids[item] = default_version
            elif (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], int) and not isinstance(item[1], bool)):
                ids[item[0]] = item[1]
            else:
                raise ValueError(f"seen request ids must be [id, version] pairs or ids, got {item!r:.60}")
        self._ids = ids
