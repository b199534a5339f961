"""Data loader throughput: tokens per second per CPU core from prepared ArrayRecord shards, through
the real lane logic (data_pipelines.make_loader), with no model attached.

    python bench/data_loader.py                      # stdlib corpus (prepared on first use),
                                                     # and 3000 short synthetic documents
    python bench/data_loader.py --path DIR --out bench/results/data_loader.json

"tokens" counts every position of every row (B_local x L per step); "target tokens" counts only
positions with loss_mask 1 (padding excluded). CPU time is this process's plus its prefetch
workers' over the timed window (start-up excluded), so "per core" is tokens over CPU seconds,
whatever the number of processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from importlib import metadata

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bst_dist.config import DataConfig  # noqa: E402
from data_pipelines import ensure_prepared, make_loader  # noqa: E402
from data_pipelines.tokenizer import cache_root  # noqa: E402

# (name, corpus, L, global batch B, process count P (we run process 0), prefetch workers, steps)
CASES = [
    ("paper L=4096, B=32, 1 process, in-process", "long", 4096, 32, 1, 0, 150),
    ("paper L=4096, B=64, process 0 of 8 (8 lanes)", "long", 4096, 64, 8, 0, 600),
    ("local_tiny L=256, B=8, in-process", "long", 256, 8, 1, 0, 3000),
    ("paper L=4096, B=32, 2 prefetch workers", "long", 4096, 32, 1, 2, 150),
    ("short documents (~330 tokens), L=256, B=32", "short", 256, 32, 1, 0, 1500),
]


def short_documents_corpus(cache: str) -> str:
    """Worst case for reads: 3000 synthetic documents of ~250 words, about one record read per
    lane per step at L=256. Prepared once under the cache."""
    from data_pipelines.shards import prepare

    out = os.path.join(cache, "bench", "short_docs")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    src = os.path.join(cache, "bench", "short_docs_src")
    os.makedirs(src, exist_ok=True)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    rng = np.random.default_rng(0)
    for i in range(3000):
        with open(os.path.join(src, f"{i:05d}.txt"), "w") as f:
            f.write(" ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(50, 450)))))
    prepare("text", src, out, progress=False)
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the prefetch workers), from /proc, so
    that a worker's start-up (spawn, imports) before the timed window is not counted."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_case(path: str, L: int, B: int, P: int, workers: int, steps: int) -> dict:
    cfg = DataConfig(path=path, prefetch_workers=workers, prefetch_buffer=4)
    loader = make_loader(cfg, seq_len=L, global_batch_size=B, process_index=0, process_count=P)
    next(loader)  # start-up (worker spawn, first documents) is not throughput
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    positions = targets = 0
    for _ in range(steps):
        batch = next(loader)
        positions += batch["inputs"].size
        targets += int(batch["loss_mask"].sum())
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    loader.close()
    return {"L": L, "B": B, "process_count": P, "lanes_in_process": B // P, "prefetch_workers": workers,
            "steps": steps, "tokens": positions, "target_tokens": targets, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "tokens_per_s_wall": round(positions / wall),
            "tokens_per_cpu_s": round(positions / cpu), "target_tokens_per_cpu_s": round(targets / cpu)}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {p: metadata.version(p) for p in ("numpy", "grain", "array-record", "tiktoken", "jax")}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=None, help="prepared directory (default: the stdlib corpus, prepared once)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "data_loader.json"))
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps")
    args = ap.parse_args()
    path = args.path or ensure_prepared(DataConfig())
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    paths = {"long": path, "short": short_documents_corpus(cache_root())}
    results = []
    for name, corpus, L, B, P, workers, steps in CASES:
        r = {"case": name, **run_case(paths[corpus], L, B, P, workers, max(10, steps // 10) if args.quick else steps)}
        results.append(r)
        print(f"{name:50s} {r['tokens_per_cpu_s'] / 1e6:8.1f} M tokens/CPU-s   "
              f"{r['tokens_per_s_wall'] / 1e6:8.1f} M tokens/s wall   ({r['target_tokens_per_cpu_s'] / 1e6:.1f} M targets/CPU-s)")
    report = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
              "corpus": {"long": {"name": manifest["corpus"], "documents": manifest["documents"],
                                  "tokens": manifest["tokens"]},
                         "short": "3000 synthetic documents of 50-450 words (text corpus)"},
              "machine": machine(), "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
