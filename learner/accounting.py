"""Counting trajectories that never arrived: holes in each producer's numbering.

Every generation actor numbers the trajectories it produces (producer id, pseq = 1, 2, ...;
`actors.generator`), and the transport carries that origin next to the payload. A trajectory
can vanish between producer and learner: dropped from a full outbox while Redis was away,
trimmed from the stream before the learner read it, or lost in a Redis crash (the last second
of the AOF). Each shows up here as a number the learner never received, below a higher one it
did. The service's accounting invariant (`dvi/driver.py`):

    produced = applied (or dropped as stale) + dead-lettered + counted as lost

`ProducerGaps.lost()` is the learner's part of "counted as lost"; the driver adds each live
producer's tail (numbers after the last one received). Duplicates (a retried send, a replay
after a restart) are ignored, so observing an origin twice changes nothing.

Pure: no Redis, no torch. Memory per producer is bounded by `max_out_of_order`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Producer:
    low: int = 0
    """Every number <= low is accounted for (received, or counted lost)."""
    above: set[int] = field(default_factory=set)
    """Numbers received above `low` while a hole below them is still open."""
    lost: int = 0
    """Holes given up on (confirmed lost) so far."""


class ProducerGaps:
    """Per-producer received numbers; `lost()` counts the holes below the highest received.

    A hole is usually final (a producer sends in order), but entries can arrive a little out of
    order (a crash replay, a claim); holes stay open until `max_out_of_order` later numbers have
    arrived, then count as confirmed losses. `lost()` includes the open ones.
    """

    def __init__(self, max_out_of_order: int = 1024) -> None:
        if max_out_of_order < 1:
            raise ValueError(f"max_out_of_order must be >= 1, got {max_out_of_order}")
        self.max_out_of_order = max_out_of_order
        self._producers: dict[str, _Producer] = {}

    def observe(self, producer: str, pseq: int) -> None:
        """Record that `producer`'s trajectory number `pseq` (>= 1) arrived."""
        p = self._producers.setdefault(producer, _Producer())
        if pseq <= p.low or pseq in p.above:
            return  # a duplicate delivery
        p.above.add(pseq)
        self._advance(p)
        if len(p.above) > self.max_out_of_order:
            first = min(p.above)
            p.lost += first - p.low - 1
            p.low = first - 1
            self._advance(p)

    @staticmethod
    def _advance(p: _Producer) -> None:
        while p.low + 1 in p.above:
            p.low += 1
            p.above.discard(p.low)

    def highest(self) -> dict[str, int]:
        """producer -> the highest number received from it."""
        return {name: max(p.above) if p.above else p.low for name, p in self._producers.items()}

    def lost(self) -> int:
        """Numbers never received below each producer's highest received one (confirmed + open holes)."""
        return sum(p.lost + ((max(p.above) - p.low - len(p.above)) if p.above else 0)
                   for p in self._producers.values())

    def state(self) -> dict[str, list]:
        """JSON-able {producer: [low, sorted above, lost]} (saved with each learner checkpoint)."""
        return {name: [p.low, sorted(p.above), p.lost] for name, p in self._producers.items()}

    def load(self, state: dict) -> None:
        """Replace the contents with a `state()`; ValueError if it is malformed."""
        producers: dict[str, _Producer] = {}
        try:
            for name, (low, above, lost) in state.items():
                if not (isinstance(name, str) and all(isinstance(x, int) for x in (low, lost, *above))):
                    raise TypeError(name)
                producers[name] = _Producer(low, set(above), lost)
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed producer accounting state: {err}") from err
        self._producers = producers
