"""The carried cross-sequence cache matters: on a synthetic long-document task where a fact stated
in one sequence must be recalled more than a whole sequence later, BST trained with the cache
carried across sequences (train.carry_cache=true) recalls it; the same weights read with a fresh
cache every sequence cannot (default suite), and neither can the model trained and evaluated
with a fresh cache every sequence (train.carry_cache=false; slow).

The task (recall.py: recall_document; every word is one GPT-2 token, so positions are exact).
A document is S = 16 sequences of L = 16 targets, <|endoftext|> first:
  * tokens 1..4, right after <|endoftext|>, state the key: one of K = 8 colour words, 4 times;
  * sequences 2, 4, ..., 14 each begin with the marker " Answer" as their first input, and the
    target there is the key (then three more copies of it);
  * every other token is filler drawn uniformly from 8 other words, independent of the key.
Each recall target lies more than a whole sequence (>= 2L - 3 = 29 tokens) after the key's last
occurrence. The model is one BST layer (SH, S4D, N = 16), no BRecT layer: its attention reaches W
tokens back (its XL cache holds the previous block, filler), so at the first position of a sequence
the only thing that can bring the key is the S4D state carried from the previous sequence (the
zero-input response it adds to the context states). Without the carry the key is unknowable there,
so no such model can do better than ln K = 2.08 nats on those targets.

The corpus goes through the real `text` corpus preparation and Grain loader; both arms train with
bst_dist.train.loop.train, same seeds, 200 steps. The measure is the mean loss on the recall
targets of the held-out (validation) documents, read as each arm was trained (cache carried or
not). Measured when this test was written (train.seed 0..4; this test uses 0): carried 0.61 0.61
0.89 0.76 0.85 nats, trained fresh 2.82 3.53 3.01 3.18 4.01; another corpus (seed 99): 0.88 vs
3.56. The seed-0 carried model's own weights read with a fresh cache every sequence: 4.79 nats
on the recall targets against 0.61 carried (CPU, 2026-12-02). The
control that carries the cache but not the S4D state (model.bst.carry=false, XL cache still
carried) stays at 2.77: the XL cache indeed cannot carry the key, the S4D carry does.

Why these sizes: with the key stated once (one token) and L = 32, the S4D carry had not learned the
recall after 1000 steps even with a constant filler word (L = 64: nothing in 300 steps). A token
enters the S4D state with weight ~dt (dt initialised in [1e-3, 1e-1]) next to everything else
read since, so in the trained model the key-dependent part of the carried context at the recall
position was ~2% of its size (std across documents 0.02-0.03 against an rms of 1.1), and C, D and
dt had hardly moved. Stating the key over W tokens, restating it after each recall (the distance is
then ~2L, not the document length), L = 16 and N = 16 make the recall learnable within the test
budget; the claim (a fact out of the XL cache's reach, recalled only through the carry) is unchanged.
"""

import math

import numpy as np
import pytest

from data_pipelines import iter_documents

from tests.helpers.runs import make_cfg, model_params, read_checkpoint, train_in_process
from tests.helpers.tiny import job_dict
from tests.train.recall import RECALL_KEYS, prepare_text_corpus, recall_positions, token_nats, write_recall_corpus

L, W, S = 16, 4, 16
EVERY, STATED, REPEAT = 2, W, 4
STEPS, SEED = 200, 0
LN_K = math.log(len(RECALL_KEYS))
# Explicit margins (nats on the recall targets): the carried run must beat the best any
# cache-less model can do (ln K) by ABOVE_CHANCE, and the fresh-cache run by OVER_FRESH.
ABOVE_CHANCE, OVER_FRESH = 0.75, 1.0


def recall_job(data_path: str, carry: bool) -> dict:
    return job_dict(
        model={"num_layers": 1, "block_len": W, "seq_len": L, "bst_layers": [0], "brect_layers": [],
               "bst": {"variant": "SH", "kernel": "s4d", "state_size": 16}},
        data={"corpus": "text", "path": data_path},
        train={"steps": STEPS, "global_batch_size": 16, "seed": SEED, "carry_cache": carry, "log_every": 50,
               "optimizer": {"name": "adamw", "lr": 1e-2, "warmup_steps": 20}},
        checkpoint={"every": 10**6, "keep_last": 1})  # only the final step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    src = write_recall_corpus(root / "src", num_docs=400, seq_len=L, num_seqs=S, seed=1234, every=EVERY,
                              stated=STATED, repeat=REPEAT)
    return prepare_text_corpus(src, root / "prepared", val_fraction=0.1)


def train(corpus: str, run_dir: str, carry: bool):
    """(cfg, graphdef, params, summary) of one arm trained for STEPS steps."""
    job = recall_job(corpus, carry)
    summary = train_in_process(job, run_dir)
    cfg = make_cfg(job, run_dir)
    graphdef, params = model_params(cfg, read_checkpoint(run_dir, STEPS)["state"]["params"])
    return cfg, graphdef, params, summary


def measure(corpus: str, trained, carry: bool) -> dict:
    """Recall-target and all-target loss on the validation documents, read with the cache carried
    or fresh every sequence."""
    cfg, graphdef, params, summary = trained
    docs = np.stack([tokens for _, tokens in iter_documents(corpus, "validation")])
    assert docs.shape == (len(docs), S * L + 1) and len(docs) >= 30
    nats = token_nats(cfg, graphdef, params, docs, carry=carry)
    recall = [p - 1 for p in recall_positions(L, S, EVERY)]  # target index of token p
    assert (docs[:, [r + 1 for r in recall]] == docs[:, [1]]).all()  # the targets are the stated key
    return {"recall": float(nats[:, recall].mean()), "all": float(nats.mean()),
            "train_last": float(np.mean(summary["losses"][-20:]))}


@pytest.fixture(scope="module")
def carried(corpus, tmp_path_factory):
    """The arm trained with the carry, and its read with the carry."""
    trained = train(corpus, str(tmp_path_factory.mktemp("carry") / "run"), carry=True)
    return trained, measure(corpus, trained, carry=True)


def report_line(on: dict, off: dict, what: str) -> str:
    return (f"recall-target loss: carried {on['recall']:.3f}, {what} {off['recall']:.3f} nats (ln K = {LN_K:.3f}); "
            f"all targets: carried {on['all']:.3f}, {what} {off['all']:.3f}")


def test_carried_cache_recalls_what_a_fresh_cache_cannot(corpus, carried):
    """The same weights, read twice: only the carry differs, so the gap is the carry's."""
    trained, on = carried
    off = measure(corpus, trained, carry=False)
    report = report_line(on, off, "same weights, fresh cache")
    print(report)
    assert on["recall"] <= LN_K - ABOVE_CHANCE, report
    assert on["recall"] <= off["recall"] - OVER_FRESH, report
    assert off["recall"] >= LN_K - 0.25, report  # the premise: without the carry the key is out of reach


@pytest.mark.slow  # a second 200-step training
def test_a_model_trained_without_the_carry_cannot_recall(corpus, carried, tmp_path):
    """The other control: trained and read with a fresh cache every sequence, the model never
    meets the key where it is asked for."""
    _, on = carried
    off = measure(corpus, train(corpus, str(tmp_path / "fresh"), carry=False), carry=False)
    report = report_line(on, off, "trained fresh") + f"; last-20 train loss: carried {on['train_last']:.3f}, " \
        f"fresh {off['train_last']:.3f}"
    print(report)
    assert on["recall"] <= off["recall"] - OVER_FRESH, report
    assert off["recall"] >= LN_K - 0.25, report
