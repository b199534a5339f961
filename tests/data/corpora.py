"""Tiny synthetic corpora for the data-pipeline tests (the fixtures that prepare them: conftest.py).

Everything is synthetic and small: a PG-19-layout folder of a few dozen "books" whose lengths span
shorter than one sequence to hundreds of sequences at L=16, so every lane crosses documents and
epochs within a few hundred steps.
"""

from __future__ import annotations

import os

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there one all we their been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off come since against go "
         "came right used take three").split()


def synth_text(seed: int, n_words: int) -> str:
    """Deterministic English-like text of about n_words words (lines of 12 words)."""
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


# words per document: very short ones (under one sequence), medium, and long ones
PG19_TRAIN_WORDS = [1, 3, 8, 15, 40, 90, 150, 300, 20, 5, 600, 70, 33, 2, 250, 120, 11, 45, 1000, 64, 9, 180, 27, 400]
PG19_VALID_WORDS = [4, 60, 200, 13, 90]
PG19_TEST_WORDS = [30, 7, 110]


def write_pg19(root: str) -> str:
    """A PG-19-layout folder: train/, validation/, test/ of <id>.txt, and metadata.csv."""
    rows = ["_id,short_book_title,publication_date,url"]
    book = 10000
    for split, sizes in (("train", PG19_TRAIN_WORDS), ("validation", PG19_VALID_WORDS), ("test", PG19_TEST_WORDS)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for n in sizes:
            book += 7
            with open(os.path.join(root, split, f"{book}.txt"), "w", encoding="utf-8") as f:
                f.write(synth_text(book, n))
            rows.append(f"{book},Book {book},1900,https://example.org/{book}")
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return root


def data_cfg(path: str, **kw):
    from bst_dist.config import DataConfig

    return DataConfig(path=path, **kw)
