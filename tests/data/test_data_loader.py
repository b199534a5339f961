"""The document-lane loader: docs/training.md's Batch contract, exactly-once delivery, independence of the
process count, exact resume (also onto another process count, and through Orbax), and prefetch
worker processes."""

import json
import multiprocessing

import grain
import grain.checkpoint
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import EOT, iter_documents, make_loader
from data_pipelines.errors import DataError

from tests.data.corpora import data_cfg

L, B = 16, 8
KEYS = ("inputs", "targets", "loss_mask", "doc_start", "doc_id", "seq_index")


def global_stream(path, P, *, steps=None, num_epochs=None, seed=0, split="train", states=None, **cfg):
    """Run P simulated processes side by side; each step, their rows concatenated (the global batch)."""
    loaders = [make_loader(data_cfg(path, **cfg), seq_len=L, global_batch_size=B, process_index=p,
                           process_count=P, split=split, seed=seed, num_epochs=num_epochs) for p in range(P)]
    try:
        if states is not None:
            for ld, st in zip(loaders, states):
                ld.set_state(st)
        out = []
        while steps is None or len(out) < steps:
            rows = []
            for ld in loaders:
                try:
                    rows.append(next(ld))
                except StopIteration:
                    rows.append(None)
            if all(r is None for r in rows):
                break
            assert all(r is not None for r in rows), "processes must stop on the same step"
            out.append({k: np.concatenate([r[k] for r in rows]) for k in KEYS})
        return out
    finally:
        for ld in loaders:
            ld.close()


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


@pytest.fixture(scope="module")
def epoch1(pg19_prepared):
    return global_stream(pg19_prepared, 1, num_epochs=1)


def lane_reads(stream, lane):
    """[(doc_id, seq_index, inputs, targets)] for the non-padding part of each row of one lane."""
    out = []
    for batch in stream:
        n = int(batch["loss_mask"][lane].sum())
        out.append((int(batch["doc_id"][lane]), int(batch["seq_index"][lane]), bool(batch["doc_start"][lane]),
                    batch["inputs"][lane, :n], batch["targets"][lane, :n], n))
    return out


def test_batch_fields_and_contract(epoch1):
    b = epoch1[0]
    assert {k: (v.dtype.name, v.shape) for k, v in b.items()} == {
        "inputs": ("int32", (B, L)), "targets": ("int32", (B, L)), "loss_mask": ("float32", (B, L)),
        "doc_start": ("bool", (B,)), "doc_id": ("int64", (B,)), "seq_index": ("int32", (B,))}
    assert b["doc_start"].all() and (b["seq_index"] == 0).all()
    assert (b["inputs"][:, 0] == EOT).all()  # every document starts with <|endoftext|>
    for batch in epoch1:
        m = batch["loss_mask"]
        # a row's real positions are a prefix; targets are the inputs shifted by one
        assert ((m[:, 1:] <= m[:, :-1])).all()
        np.testing.assert_array_equal(batch["inputs"][:, 1:] * m[:, 1:], batch["targets"][:, :-1] * m[:, 1:])


def test_one_epoch_delivers_every_token_once_in_order(pg19_prepared, epoch1):
    docs = dict(iter_documents(pg19_prepared, "train"))
    seen = {}
    for lane in range(B):
        reads = lane_reads(epoch1, lane)
        done = False
        for i, (doc_id, seq, start, inputs, targets, n) in enumerate(reads):
            if doc_id == -1:  # an exhausted lane yields all-zero rows from then on
                done = True
                assert n == 0 and not start and seq == -1
                assert not epoch1[i]["inputs"][lane].any() and not epoch1[i]["targets"][lane].any()
                continue
            assert not done, "a lane restarted after its epoch ended"
            toks = docs[doc_id]
            assert start == (seq == 0)
            if seq == 0:
                assert doc_id not in seen, f"document {doc_id} delivered twice"
                seen[doc_id] = (lane, [])
            assert seen[doc_id][0] == lane, "documents never move between lanes"
            parts = seen[doc_id][1]
            assert seq == len(parts), "sequences of a document come in order"
            np.testing.assert_array_equal(inputs, toks[seq * L: seq * L + n])
            parts.append(targets)
            last = (seq + 1) * L >= toks.size - 1
            assert n == (toks.size - 1 - seq * L if last else L), "only a document's last sequence is padded"
        assert done or i == len(reads) - 1
    assert sorted(seen) == sorted(docs)
    for doc_id, (_, parts) in seen.items():  # every target exactly once, in document order
        np.testing.assert_array_equal(np.concatenate(parts), docs[doc_id][1:])


@pytest.mark.parametrize("P", [2, 4])
def test_global_batch_independent_of_process_count(pg19_prepared, epoch1, P):
    assert same(global_stream(pg19_prepared, P, num_epochs=1), epoch1)


def test_lanes_move_to_next_epoch_without_waiting(pg19_prepared, epoch1):
    stream = global_stream(pg19_prepared, 1, steps=len(epoch1) + 40)
    # while a lane still reads its epoch-0 share, the infinite stream equals the one-epoch stream
    for lane in range(B):
        ends = [i for i, b in enumerate(epoch1) if b["doc_id"][lane] == -1]
        first_idle = ends[0] if ends else len(epoch1)
        for i in range(first_idle):
            assert all(np.array_equal(stream[i][k][lane], epoch1[i][k][lane]) for k in KEYS)
        if first_idle < len(epoch1):
            # and on the next step it starts its (reshuffled) epoch-1 share at once
            assert stream[first_idle]["doc_start"][lane] and stream[first_idle]["seq_index"][lane] == 0
    idle_at = [next((i for i, b in enumerate(epoch1) if b["doc_id"][lane] == -1), len(epoch1)) for lane in range(B)]
    assert min(idle_at) < max(idle_at)  # the lanes do not finish together: someone did not wait
    first = [int(b["doc_id"][0]) for b in epoch1 if b["doc_start"][0]]
    second = [int(b["doc_id"][0]) for b in stream[idle_at[0]:] if b["doc_start"][0]]
    assert second[:2] != first[:2]


def test_seed_changes_order(pg19_prepared, epoch1):
    other = global_stream(pg19_prepared, 1, num_epochs=1, seed=1)
    assert not np.array_equal(other[0]["doc_id"], epoch1[0]["doc_id"])


def test_restore_continues_exactly_on_any_process_count(pg19_prepared):
    total, M = 160, 24
    ref = global_stream(pg19_prepared, 1, steps=total)
    rng = np.random.default_rng(7)
    for k in [0, *rng.integers(1, total - M, 2)]:
        loaders = [make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B, process_index=p,
                               process_count=2) for p in range(2)]
        for _ in range(k):
            for ld in loaders:
                next(ld)
        states = [json.loads(json.dumps(ld.get_state())) for ld in loaders]  # JSON-able
        for ld in loaders:
            ld.close()
        assert states[0] == states[1] and states[0]["step"] == k  # each holds every lane's position
        for P in (1, 2, 4):
            got = global_stream(pg19_prepared, P, steps=M, states=[states[p % 2] for p in range(P)])
            assert same(got, ref[k:k + M]), f"restore at step {k} onto {P} processes"


def test_restore_near_the_end_of_an_epoch_limited_stream(pg19_prepared, epoch1):
    ld = make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B, num_epochs=1)
    for _ in range(len(epoch1) - 3):
        next(ld)
    state = ld.get_state()
    ld.close()
    assert same(global_stream(pg19_prepared, 2, num_epochs=1, states=[state, state]), epoch1[-3:])


def test_state_from_another_stream_is_refused(pg19_prepared):
    ld = make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B)
    state = ld.get_state()
    with make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=2 * B) as other:
        with pytest.raises(DataError, match="global_batch_size=8, this loader has 16"):
            other.set_state(state)
    with make_loader(data_cfg(pg19_prepared), seq_len=2 * L, global_batch_size=B) as other:
        with pytest.raises(DataError, match="seq_len"):
            other.set_state(state)
    with pytest.raises(DataError, match="dataset"):
        ld.set_state({**state, "dataset": "0" * 64})
    with pytest.raises(DataError, match="lanes"):
        ld.set_state({**state, "lanes": state["lanes"][:3]})
    ld.close()


def test_orbax_checkpoint_manager_round_trip(pg19_prepared, tmp_path):
    """Grain's own CheckpointSave/CheckpointRestore through a real CheckpointManager on disk."""
    cfg = data_cfg(pg19_prepared)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True))
    ld = make_loader(cfg, seq_len=L, global_batch_size=B)
    for _ in range(37):
        next(ld)
    mngr.save(37, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(ld)))
    mngr.wait_until_finished()
    expect = [next(ld) for _ in range(9)]
    ld.close()
    fresh = make_loader(cfg, seq_len=L, global_batch_size=B)
    mngr.restore(37, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert same([next(fresh) for _ in range(9)], expect)
    fresh.close()
    mngr.close()


def test_lane_restore_reads_a_checkpoint_of_another_process_count(pg19_prepared, tmp_path, monkeypatch):
    """Files written by 2 processes (Grain's process_<i>-of-2.json) restore 1 or 4 processes."""
    from grain._src.core import sharding

    from data_pipelines import checkpoint

    ref = global_stream(pg19_prepared, 1, steps=30)
    for p in range(2):
        ld = make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B, process_index=p, process_count=2)
        for _ in range(20):
            next(ld)
        monkeypatch.setattr(sharding, "get_process_index_and_count", lambda p=p: (p, 2))
        checkpoint.LaneCheckpointHandler().save(tmp_path, args=checkpoint.LaneSave(ld))
        ld.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
    for P in (1, 4):
        loaders = [make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B, process_index=p,
                               process_count=P) for p in range(P)]
        for p, ld in enumerate(loaders):
            monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda p=p: (p, P))
            checkpoint.LaneCheckpointHandler().restore(tmp_path, args=checkpoint.LaneRestore(ld))
        rows = [[next(ld) for ld in loaders] for _ in range(10)]
        got = [{k: np.concatenate([r[k] for r in step]) for k in KEYS} for step in rows]
        assert same(got, ref[20:30])
        for ld in loaders:
            ld.close()


def test_prefetch_worker_processes(pg19_prepared):
    """Two worker processes (worker i makes steps i, i+2, ...) give the in-process stream, also
    across a set_state, and close() ends them."""
    ref = global_stream(pg19_prepared, 1, steps=30)
    others = {p.pid for p in multiprocessing.active_children()}
    ld = make_loader(data_cfg(pg19_prepared, prefetch_workers=2), seq_len=L, global_batch_size=B)
    got = []
    for step in range(30):
        if step == 11:  # set_state restarts the workers at the saved position
            ld.set_state(ld.get_state())
        got.append(next(ld))
        assert type(got[-1]["inputs"]) is np.ndarray  # plain arrays, not views of shared memory
    workers = [p for p in multiprocessing.active_children() if p.pid not in others and p.name.startswith("grain")]
    assert len(workers) == 2
    ld.close()
    assert not any(p.is_alive() for p in workers)
    assert same(got, ref)


def test_validation_split_and_evaluation_pass(pg19_prepared):
    stream = global_stream(pg19_prepared, 1, split="validation", num_epochs=1)
    delivered = sorted({int(d) for b in stream for d in b["doc_id"] if d >= 0})
    assert delivered == sorted(d for d, _ in iter_documents(pg19_prepared, "validation"))
    assert sum(int(b["loss_mask"].sum()) for b in stream) == \
        sum(t.size - 1 for _, t in iter_documents(pg19_prepared, "validation"))


def test_deal_epoch_balances_lanes_and_reshuffles():
    from data_pipelines.lanes import deal_epoch

    nseq = np.random.default_rng(0).integers(1, 50, 500)
    order0, starts0 = deal_epoch(nseq, 16, seed=3, epoch=0, salt=1)
    assert sorted(order0.tolist()) == list(range(500))  # every document dealt exactly once
    loads = [int(nseq[order0[starts0[b]:starts0[b + 1]]].sum()) for b in range(16)]
    assert max(loads) - min(loads) <= nseq.max()  # greedy: lanes differ by at most one document
    again = deal_epoch(nseq, 16, seed=3, epoch=0, salt=1)
    assert np.array_equal(again[0], order0) and np.array_equal(again[1], starts0)  # pure
    assert not np.array_equal(deal_epoch(nseq, 16, seed=3, epoch=1, salt=1)[0], order0)
    assert not np.array_equal(deal_epoch(nseq, 16, seed=3, epoch=0, salt=2)[0], order0)
