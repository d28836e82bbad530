"""Several named data streams mixed into one deterministic, resumable order (LLM-Foundry style).

Each stream is a dataset with either a ``repeat`` count (examples per epoch =
``repeat * len``; 2 doubles a small high-quality set, 0.5 takes a fresh half
each epoch) or a ``weight`` (its share of an epoch of ``samples_per_epoch``
examples). Within a stream, examples are taken in a seeded permutation, a new
one each time the stream is exhausted, so nothing repeats before everything has
been seen; the epoch's picks of all streams are then shuffled together.

The order depends only on ``seed``, so a run that saves :meth:`MixedStreams.state_dict`
(the epoch and the number of examples consumed in it, the same on every rank)
and loads it after a crash continues with exactly the examples the
uninterrupted run would have seen. With ``world_size > 1`` rank ``r`` takes
positions ``r, r + world, ...`` of the global order (counted across epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from distillzoo.errors import ConfigError


@dataclass(frozen=True)
class Stream:
    name: str
    dataset: Sequence
    repeat: float | None = None
    weight: float | None = None


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


class MixedStreams:
    """An epoch-by-epoch order of ``(stream index, example index)`` over several streams.

    Args:
        streams: all with ``repeat``, or all with ``weight`` (then ``samples_per_epoch``,
            default the sum of the stream sizes, is split by weight).
        seed: the only source of randomness.
        rank, world_size: this process's share of each global position.
    """

    def __init__(self, streams: Sequence[Stream], *, seed: int = 0, samples_per_epoch: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if not streams:
            raise ConfigError("data: no streams given")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ConfigError(f"data: stream names must be unique, got {names}")
        by_repeat = [s.repeat is not None for s in streams]
        by_weight = [s.weight is not None for s in streams]
        if not (all(by_repeat) and not any(by_weight)) and not (all(by_weight) and not any(by_repeat)):
            raise ConfigError(f"data streams {names}: give every stream a repeat count or every stream a weight, "
                              "not a mix (and not both on one stream)")
        for s in streams:
            if len(s.dataset) == 0:
                raise ConfigError(f"data stream {s.name!r} is empty")
            share = s.repeat if s.repeat is not None else s.weight
            if not (isinstance(share, (int, float)) and math.isfinite(share) and share >= 0):
                raise ConfigError(f"data stream {s.name!r}: {'repeat' if s.repeat is not None else 'weight'} must be "
                                  f"a finite number >= 0, got {share!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.streams, self.seed, self.rank, self.world_size = list(streams), int(seed), rank, world_size
        sizes = [len(s.dataset) for s in streams]
        if all(by_repeat):
            counts = [round(s.repeat * n) for s, n in zip(streams, sizes)]
        else:
            total_weight = sum(s.weight for s in streams)
            if total_weight <= 0:
                raise ConfigError(f"data streams {names}: the weights sum to 0")
            total = samples_per_epoch if samples_per_epoch is not None else sum(sizes)
            counts = _apportion(total, [s.weight / total_weight for s in streams])
        if sum(counts) == 0:
            raise ConfigError(f"data streams {names}: an epoch would hold no examples")
        self.counts = counts
        self.epoch, self.position = 0, 0

    @property
    def epoch_size(self) -> int:
        """Global examples per epoch."""
        return sum(self.counts)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``[epoch_size, 2]`` (stream, example) pairs of one epoch, the same on every rank."""
        parts = []
        for k, (stream, count) in enumerate(zip(self.streams, self.counts)):
            n = len(stream.dataset)
            first = epoch * count  # examples of this stream consumed before this epoch
            picks = []
            for cycle in range(first // n, (first + count - 1) // n + 1 if count else 0):
                perm = _rng(self.seed, k, cycle).permutation(n)
                lo, hi = max(first - cycle * n, 0), min(first + count - cycle * n, n)
                picks.append(perm[lo:hi])
            idx = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
            parts.append(np.stack([np.full(len(idx), k), idx], axis=1))
        order = np.concatenate(parts)
        return order[_rng(self.seed, 1 << 20, epoch).permutation(len(order))]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """This rank's (stream, example) pairs from the current state on, epoch after epoch; advances the state."""
        while True:
            order = self.epoch_order(self.epoch)
            while self.position < len(order):
                pos = self.position
                self.position += 1
                if (self.epoch * len(order) + pos) % self.world_size == self.rank:  # global position
                    yield int(order[pos, 0]), int(order[pos, 1])
            self.epoch, self.position = self.epoch + 1, 0

    def take(self, n: int) -> list:
        """The next ``n`` examples of this rank, as the datasets return them (an example that is a dict with its
        stream's name under ``"stream"``, what a teacher routed by stream reads).

        One call consumes ``n * world_size`` global positions (every rank's share
        of the step), so the state after it is the same on every rank and any
        rank's checkpointed state resumes all of them.
        """
        out = []
        order = self._order()
        for _ in range(n * self.world_size):
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            pos = self.position
            self.position += 1
            if (self.epoch * len(order) + pos) % self.world_size == self.rank:
                stream, index = order[pos]
                item = self.streams[int(stream)].dataset[int(index)]
                out.append({**item, "stream": self.streams[int(stream)].name} if isinstance(item, dict) else item)
        return out

    def peek(self, n: int, ahead: int = 1) -> list:
        """What the ``ahead``-th next :meth:`take` of ``n`` will return, leaving the state as it is (what a prefetch
        reads: it never changes which examples a step draws, so a resumed run draws the same)."""
        state = (self.epoch, self.position)
        try:
            for _ in range(ahead - 1):
                self.take(n)
            return self.take(n)
        finally:
            self.epoch, self.position = state

    def _order(self) -> np.ndarray:
        if getattr(self, "_cached", (None,))[0] != self.epoch:
            self._cached = (self.epoch, self.epoch_order(self.epoch))
        return self._cached[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("counts") != list(self.counts):
            raise ConfigError(f"data state from a checkpoint (seed {state.get('seed')}, per-stream counts "
                              f"{state.get('counts')}) does not match this run's (seed {self.seed}, counts "
                              f"{self.counts}); the streams or seed changed, so the order cannot be resumed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Integers summing to ``total`` in proportion to ``shares`` (largest remainders)."""
    raw = [total * s for s in shares]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts
