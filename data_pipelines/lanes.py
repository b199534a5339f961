"""The document-lane splitter: pure functions of (document lengths, B, L, seed, epoch, lane).

B lanes (global batch rows) each read documents one L-length sequence per step. A document of n
tokens (its leading <|endoftext|> included) has n - 1 targets and so ceil((n - 1) / L) sequences;
only its last sequence is padded, and no sequence holds two documents.

Each epoch deals every document to one lane: documents are taken in an order shuffled by
(seed, epoch, split) and each goes to the lane with the fewest sequences so far (ties: the lowest
lane). The lanes then hold about equal work, so an evaluation pass (num_epochs=1) ends with few
idle lanes, and the first B documents of the order go one to each lane, so no lane is empty
when there are at least B documents. A lane reads its documents in the order dealt; when it has
read them all it starts its share of the next epoch without waiting for the other lanes.

A lane's position is (epoch, k, s): sequence s of the k-th document dealt to it in that epoch.
Every lane advances exactly one sequence per step, so positions depend only on the step, never on
how lanes are split over processes.
"""

from __future__ import annotations

import heapq
import zlib
from collections import OrderedDict

import numpy as np


def num_sequences(n_tokens: np.ndarray, L: int) -> np.ndarray:
    """Sequences per document: ceil(targets / L), targets = n_tokens - 1 (the EOT is input only)."""
    targets = np.asarray(n_tokens, dtype=np.int64) - 1
    return -(-targets // L)


def split_salt(split: str) -> int:
    """Different splits shuffle differently under the same seed."""
    return zlib.crc32(split.encode("utf-8"))


def deal_epoch(nseq: np.ndarray, num_lanes: int, seed: int, epoch: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's deal. Returns (order, starts): lane b reads index rows
    order[starts[b]:starts[b + 1]], in that order."""
    n = len(nseq)
    perm = np.random.default_rng([seed, epoch, salt]).permutation(n)
    lane_of = np.empty(n, dtype=np.int64)
    loads = [(0, b) for b in range(num_lanes)]  # a heap of (sequences so far, lane)
    seqs = nseq[perm].tolist()
    for i, w in enumerate(seqs):
        load, b = loads[0]
        lane_of[i] = b
        heapq.heapreplace(loads, (load + w, b))
    by_lane = np.argsort(lane_of, kind="stable")  # keep the dealt order within a lane
    order = perm[by_lane]
    starts = np.searchsorted(lane_of[by_lane], np.arange(num_lanes + 1))
    return order, starts


class LaneSchedule:
    """Which documents each lane reads in each epoch. Recent epochs' deals are cached (as arrays:
    lanes may drift many epochs apart when a few documents dwarf the rest)."""

    def __init__(self, nseq: np.ndarray, num_lanes: int, seed: int, salt: int, cache_epochs: int = 64):
        self.nseq = np.asarray(nseq, dtype=np.int64)
        self.nseq_list = self.nseq.tolist()  # scalar lookups per step: lists beat numpy indexing
        self.num_lanes = num_lanes
        self.seed = seed
        self.salt = salt
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_epochs = cache_epochs

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        entry = deal_epoch(self.nseq, self.num_lanes, self.seed, e, self.salt)
        self._cache[e] = entry
        while len(self._cache) > self._cache_epochs:
            self._cache.popitem(last=False)
        return entry

    def lane_rows(self, e: int, b: int) -> list[int]:
        """Index rows lane b reads in epoch e, in order."""
        order, starts = self._epoch(e)
        return order[starts[b]:starts[b + 1]].tolist()


class LaneCursor:
    """Positions of lanes [lo, hi), or of the global rows listed in `lanes` (any order, any gaps:
    the rows a process's devices hold): (epoch, k, s) each. `num_epochs=None` runs forever;
    otherwise a lane whose epoch reaches num_epochs is exhausted and stays so."""

    def __init__(self, schedule: LaneSchedule, lo: int, hi: int, num_epochs: int | None,
                 positions: list[list[int]] | None = None, step: int = 0, lanes: list[int] | None = None):
        self.schedule = schedule
        self.lanes = list(range(lo, hi)) if lanes is None else [int(b) for b in lanes]
        self.lo, self.hi = 0, len(self.lanes)  # local indices; self.lanes[i] is the global row
        n = len(self.lanes)
        self.num_epochs = num_epochs
        self.step = step
        if positions is None:
            positions = [[0, 0, 0] for _ in range(n)]
        if len(positions) != n:
            raise ValueError(f"{len(positions)} positions for {n} lanes")
        self.pos = [list(map(int, p)) for p in positions]
        self._rows: list[tuple[int, list[int]]] = [(-1, [])] * n  # per lane: (epoch, its rows)
        for i in range(n):
            self._settle(i)

    def _lane_rows(self, i: int, e: int) -> list[int]:
        cached = self._rows[i]
        if cached[0] != e:
            cached = (e, self.schedule.lane_rows(e, self.lanes[i]))
            self._rows[i] = cached
        return cached[1]

    def exhausted(self, i: int) -> bool:
        return self.num_epochs is not None and self.pos[i][0] >= self.num_epochs

    def all_exhausted(self) -> bool:
        return all(self.exhausted(i) for i in range(self.hi - self.lo))

    def _settle(self, i: int) -> None:
        """Move past finished documents and epochs (and epochs dealing this lane nothing)."""
        p, nseq = self.pos[i], self.schedule.nseq_list
        while not self.exhausted(i):
            e, k, s = p
            rows = self._lane_rows(i, e)
            if k >= len(rows):
                p[0], p[1], p[2] = e + 1, 0, 0
            elif s >= nseq[rows[k]]:
                p[1], p[2] = k + 1, 0
            else:
                return

    def current(self, i: int) -> tuple[int, int] | None:
        """(index row, sequence index) that lane lo + i reads now; None when exhausted."""
        if self.exhausted(i):
            return None
        e, k, s = self.pos[i]
        return self._lane_rows(i, e)[k], s

    def advance(self, steps: int = 1) -> None:
        """Every lane moves on by `steps` sequences (crossing documents and epochs)."""
        nseq = self.schedule.nseq_list
        for i in range(self.hi - self.lo):
            p = self.pos[i]
            left = steps
            while left and not self.exhausted(i):
                e, k, s = p
                remaining = nseq[self._lane_rows(i, e)[k]] - s
                if left < remaining:
                    p[2] = s + left
                    break
                left -= remaining
                p[1], p[2] = k + 1, 0
                self._settle(i)
        self.step += steps

    def positions(self) -> list[list[int]]:
        return [list(p) for p in self.pos]
