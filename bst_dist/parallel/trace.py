"""A debugging record of what each batch row read: with $BST_DIST_LANE_TRACE=DIR set, every
training process appends one JSON line per step to DIR/process_<i>.jsonl:

    {"step": s, "rows": [global rows], "doc_id": [...], "seq_index": [...]}

A resumed run appends again from its restored step, so the last line of a step is the one the
run's trajectory kept. The tests read it to prove that every row reads its own lane's documents
on any layout and that no document sequence is delivered twice (docs/scaling.md).
"""

from __future__ import annotations

import json
import os

import jax

ENV = "BST_DIST_LANE_TRACE"


class LaneTrace:
    def __init__(self, directory: str, rows: list[int]):
        os.makedirs(directory, exist_ok=True)
        self.rows = [int(r) for r in rows]
        path = os.path.join(directory, f"process_{jax.process_index()}.jsonl")
        cut = os.path.exists(path) and os.path.getsize(path) and not open(path, "rb").read().endswith(b"\n")
        self._f = open(path, "a")
        if cut:  # a killed run's half-written line stays a line of its own
            self._f.write("\n")

    @classmethod
    def from_env(cls, rows: list[int]) -> "LaneTrace | None":
        d = os.environ.get(ENV)
        return cls(d, rows) if d else None

    def write(self, step: int, local: dict) -> None:
        self._f.write(json.dumps({"step": int(step), "rows": self.rows, "doc_id": local["doc_id"].tolist(),
                                  "seq_index": local["seq_index"].tolist()}) + "\n")
        self._f.flush()  # a SIGKILL must not lose the steps the run did take

    def close(self) -> None:
        self._f.close()


def read_trace(directory: str) -> dict[int, dict[int, tuple[int, int]]]:
    """step -> global row -> (doc_id, seq_index), the last record of each step winning."""
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a kill cut this line short: that step was not kept
                    continue
                step = out.setdefault(rec["step"], {})
                for r, d, s in zip(rec["rows"], rec["doc_id"], rec["seq_index"]):
                    step[r] = (d, s)
    return out
