"""The document-lane loader: a Grain pipeline that yields, every step, the next L-length sequence
of each of this process's lanes (docs/training.md, "Batch").

  LaneDataset   grain IterDataset over this process's lanes; sliceable, so Grain's mp_prefetch
                can run it in K worker processes (worker i makes steps i, i+K, ...)
  LaneIterator  its iterator: reads only its lanes' documents, never stops (an exhausted lane
                yields zero rows)
  LaneLoader    what make_loader returns: owns the position of every lane (so any process's
                state restores onto any process count), decides when an epoch-limited stream
                ends, and rebuilds the pipeline on set_state

The saved state (JSON; docs/data.md):
  {"format": "bst_dist.lanes/1", "dataset": <manifest checksum>, "split", "seq_len",
   "global_batch_size", "seed", "num_epochs", "step", "lanes": [[epoch, k, s], ...],  # all B lanes
   "assignment": {"<process>": [global rows it fed], ...}}  # the layout that saved it

Lane b is global batch row b on every layout (its cache is row b of the saved cache), so a state
restores onto any process count and any device order: each process picks its own lanes'
positions; "assignment" only records (and lets `bst-dist inspect` show) which process fed what.
"""

from __future__ import annotations

import weakref
from typing import Any

import grain
import numpy as np

from data_pipelines import lanes as lanes_lib
from data_pipelines.errors import DataError
from data_pipelines.prepared import N_TOKENS, Prepared, ensure_prepared

STATE_FORMAT = "bst_dist.lanes/1"
_SPEC_KEYS = ("dataset", "split", "seq_len", "global_batch_size", "seed", "num_epochs")


class _Stream:
    """What fixes the stream of batches (picklable; shared by the dataset and the loader)."""

    def __init__(self, data: Prepared, split: str, seq_len: int, global_batch_size: int, seed: int,
                 num_epochs: int | None, lanes: list[int]):
        self.data, self.split = data, split
        self.L, self.B = seq_len, global_batch_size
        self.seed, self.num_epochs = seed, num_epochs
        self.lanes = list(lanes)  # the global rows this process feeds, in its local row order
        self.lo, self.hi = 0, len(self.lanes)
        self.index = data.index(split)
        self.nseq = lanes_lib.num_sequences(self.index[:, N_TOKENS], seq_len)
        self._schedule = None

    def __getstate__(self):
        return {**self.__dict__, "_schedule": None}  # workers deal their own epochs

    def schedule(self) -> lanes_lib.LaneSchedule:
        if self._schedule is None:  # one per process: the loader and in-process lanes share it
            self._schedule = lanes_lib.LaneSchedule(self.nseq, self.B, self.seed, lanes_lib.split_salt(self.split))
        return self._schedule

    def spec(self) -> dict:
        return {"dataset": self.data.checksum, "split": self.split, "seq_len": self.L,
                "global_batch_size": self.B, "seed": self.seed, "num_epochs": self.num_epochs}


class LaneIterator(grain.DatasetIterator):
    """Batches for lanes [lo, hi) from `positions` on, moving `stride` steps per batch."""

    def __init__(self, stream: _Stream, positions: list[list[int]], step: int, stride: int):
        super().__init__()
        self._s = stream
        self._cursor = lanes_lib.LaneCursor(stream.schedule(), 0, 0, stream.num_epochs, positions, step,
                                            lanes=stream.lanes)
        self._stride = stride
        self._docs: list[tuple[int, np.ndarray] | None] = [None] * (stream.hi - stream.lo)

    def _tokens(self, i: int, row: int) -> np.ndarray:
        cached = self._docs[i]
        if cached is None or cached[0] != row:
            cached = (row, self._s.data.read(self._s.split, row))
            self._docs[i] = cached  # one document per lane in memory
        return cached[1]

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        s, L = self._s, self._s.L
        b = s.hi - s.lo
        inputs = np.zeros((b, L), np.int32)
        targets = np.zeros((b, L), np.int32)
        loss_mask = np.zeros((b, L), np.float32)
        doc_start = np.zeros((b,), np.bool_)
        doc_id = np.full((b,), -1, np.int64)
        seq_index = np.full((b,), -1, np.int32)
        for i in range(b):
            cur = self._cursor.current(i)
            if cur is None:  # this lane's epochs are done: an all-zero row
                continue
            row, seq = cur
            tokens = self._tokens(i, row)
            start = seq * L
            n = min(L, tokens.size - 1 - start)  # targets run one token past the inputs
            inputs[i, :n] = tokens[start:start + n]
            targets[i, :n] = tokens[start + 1:start + 1 + n]
            loss_mask[i, :n] = 1.0
            doc_start[i] = seq == 0
            doc_id[i] = s.index[row, 0]
            seq_index[i] = seq
        self._cursor.advance(self._stride)
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "doc_start": doc_start,
                "doc_id": doc_id, "seq_index": seq_index}

    def get_state(self) -> dict[str, Any]:
        return {"step": self._cursor.step, "lanes": self._cursor.positions()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._cursor = lanes_lib.LaneCursor(self._cursor.schedule, 0, 0, self._s.num_epochs,
                                            state["lanes"], state["step"], lanes=self._s.lanes)
        self._docs = [None] * len(self._docs)

    def close(self) -> None:
        if not self._closed:
            self._s.data.close()
        super().close()


class LaneDataset(grain.IterDataset):
    """This process's lanes from `positions` (at global `step`) on. `set_slice(slice(i, None, K))`
    (Grain's mp_prefetch calls it in worker i of K) makes it yield steps step+i, step+i+K, ..."""

    def __init__(self, stream: _Stream, positions: list[list[int]], step: int):
        super().__init__()
        self._stream, self._positions, self._step = stream, positions, step
        self._offset, self._stride = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # steps must stay in order within a worker
        self._offset, self._stride = sl.start or 0, sl.step or 1

    def __iter__(self) -> LaneIterator:
        it = LaneIterator(self._stream, self._positions, self._step, self._stride)
        if self._offset:
            it._cursor.advance(self._offset)  # pylint: disable=protected-access
        return it

    def __str__(self) -> str:
        s = self._stream
        return f"LaneDataset(split={s.split}, L={s.L}, {len(s.lanes)} lanes of {s.B})"


class LaneLoader(grain.DatasetIterator):
    """The loader make_loader returns. Tracks all B lanes (cheap: positions only, no tokens) so that
    its state restores onto any process count and so that every process stops on the same step."""

    def __init__(self, stream: _Stream, workers: int, buffer: int):
        super().__init__()
        self._stream, self._workers, self._buffer = stream, workers, buffer
        self._all = lanes_lib.LaneCursor(stream.schedule(), 0, stream.B, stream.num_epochs)
        # The pipeline lives in a box the finalizer can reach without keeping `self` alive: an
        # unclosed loader still stops its workers at interpreter exit, while modules are intact.
        self._box: list = [None]
        weakref.finalize(self, _close_box, self._box)

    @property
    def lanes(self) -> list[int]:
        """The global rows this loader's batches fill, in row order."""
        return list(self._stream.lanes)

    @property
    def _it(self):
        return self._box[0]

    @_it.setter
    def _it(self, it) -> None:
        self._box[0] = it

    def _pipeline(self):
        s, every = self._stream, self._all.positions()
        ds = LaneDataset(s, [every[b] for b in s.lanes], self._all.step)
        if self._workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                             per_worker_buffer_size=self._buffer))
        return iter(ds)

    def start_prefetch(self) -> None:
        if self._closed:
            raise ValueError("Attempting to use a closed iterator.")
        if self._it is None:
            self._it = self._pipeline()
        self._it.start_prefetch()

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._all.all_exhausted():
            raise StopIteration
        if self._it is None:
            self._it = self._pipeline()
        batch = next(self._it)
        if self._workers > 0:
            # Own the memory: worker batches arrive in shared memory that must be unlinked
            # promptly, not whenever (or never, at exit) the caller drops the arrays.
            batch = {k: np.array(v) for k, v in batch.items()}
        self._all.advance(1)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self._stream.spec(), "step": self._all.step,
                "lanes": self._all.positions(), "assignment": self._stream.assignment}

    def set_state(self, state: dict[str, Any]) -> None:
        check_state(state, self._stream.spec())
        self._all = lanes_lib.LaneCursor(self._all.schedule, 0, self._stream.B, self._stream.num_epochs,
                                         state["lanes"], int(state["step"]))
        self._stop_pipeline()

    def _stop_pipeline(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        if self._closed:
            return
        self._stop_pipeline()
        self._stream.data.close()
        super().close()

    def __enter__(self) -> "LaneLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        s = self._stream
        return f"LaneLoader(split={s.split}, L={s.L}, {len(s.lanes)} lanes of {s.B}, workers={self._workers})"


def _close_box(box: list) -> None:
    if box[0] is not None:
        box[0].close()
        box[0] = None


def check_state(state: Any, spec: dict) -> None:
    """Refuse a state from another stream, naming the first difference."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"loader state: format {got!r}, expected {STATE_FORMAT!r}")
    for k in _SPEC_KEYS:
        if state.get(k) != spec[k]:
            what = "prepared dataset (manifest checksum)" if k == "dataset" else k
            raise DataError(f"loader state: saved with {what}={state.get(k)!r}, this loader has {spec[k]!r}")
    lanes = state.get("lanes")
    if not isinstance(lanes, list) or len(lanes) != spec["global_batch_size"] or \
            not all(isinstance(p, list) and len(p) == 3 for p in lanes):
        raise DataError(f"loader state: 'lanes' must list [epoch, k, s] for each of the "
                        f"{spec['global_batch_size']} lanes")
    saved = state.get("assignment")  # absent in states written before lanes followed the mesh
    if saved is not None:
        B = spec["global_batch_size"]
        rows = [b for v in saved.values() for b in v] if isinstance(saved, dict) and \
            all(isinstance(v, list) for v in saved.values()) else None
        if rows is None or not all(isinstance(b, int) and 0 <= b < B for b in rows) or set(rows) != set(range(B)):
            raise DataError(f"loader state: 'assignment' must map processes to global rows covering each of the "
                            f"{B} lanes")


def make_loader(data_cfg, *, seq_len: int, global_batch_size: int, process_index: int = 0,
                process_count: int = 1, split: str = "train", seed: int = 0,
                num_epochs: int | None = None, lanes: list[int] | None = None,
                assignment: dict[str, list[int]] | None = None) -> LaneLoader:
    """This process's rows of the global batch, one step per `next()` (docs/training.md, "Batch"),
    row i being global lane lanes[i]. Training passes `lanes` from the batch sharding
    (bst_dist.parallel.process_lanes: the rows this process's devices hold, ascending) and the
    whole `assignment` (process -> lanes), which the saved state records; without them process
    p of P owns lanes [p*B/P, (p+1)*B/P). Close it (or use `with`) to stop its workers."""
    B, P, p = global_batch_size, process_count, process_index
    if seq_len <= 0:
        raise DataError(f"seq_len: must be > 0, got {seq_len}")
    if B <= 0 or P <= 0 or not 0 <= p < P:
        raise DataError(f"process {p} of {P} with global batch {B}: need B > 0 and 0 <= p < P")
    if B % P:
        raise DataError(f"global batch size {B} is not divisible by the process count {P}: "
                        "each process owns B/P lanes")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs: must be >= 1 or None, got {num_epochs}")
    workers = data_cfg.prefetch_workers
    if workers < 0:
        raise DataError(f"data.prefetch_workers: must be >= 0, got {workers}")
    if lanes is None and assignment is None:
        assignment = {str(q): list(range(q * B // P, (q + 1) * B // P)) for q in range(P)}
    if lanes is None:
        lanes = list(range(p * B // P, (p + 1) * B // P))
    elif not lanes or len(set(lanes)) != len(lanes) or not all(0 <= int(b) < B for b in lanes):
        raise DataError(f"lanes: need distinct global rows in [0, {B}), got {list(lanes)[:8]}")
    if assignment is not None and [int(b) for b in assignment.get(str(p), [])] != [int(b) for b in lanes]:
        raise DataError(f"lanes: process {p}'s lanes {list(lanes)[:8]} differ from its entry in the assignment")
    data = Prepared(ensure_prepared(data_cfg))
    stream = _Stream(data, split, seq_len, B, seed, num_epochs, [int(b) for b in lanes])
    stream.assignment = None if assignment is None else {str(k): [int(b) for b in v] for k, v in assignment.items()}
    n_docs = len(stream.index)
    if num_epochs is None and n_docs < B:
        raise DataError(f"prepared data {data.path}: the {split} split has {n_docs} documents, fewer than the "
                        f"{B} lanes of the global batch (each lane needs documents); use a smaller batch or more data")
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
    return LaneLoader(stream, workers, max(1, data_cfg.prefetch_buffer))
