"""The library side of `bst-dist generate`: load, tokenize as training did, stream text."""

from __future__ import annotations

from typing import TextIO

import numpy as np

from bst_dist.generate.decode import PromptError, stream
from bst_dist.generate.params import ParamsError, load_model
from bst_dist.generate.sampling import SamplingError, check_sampling

EXPECTED = (ParamsError, PromptError, SamplingError)


class _Utf8Stream:
    """Writes decoded bytes as they become whole UTF-8 characters (a BPE token may split one)."""

    def __init__(self, out: TextIO):
        self.out, self.pending = out, b""

    def write(self, data: bytes) -> None:
        data = self.pending + data
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.out.write(text)
            self.out.flush()
            self.pending = data[cut:]
            return
        self.pending = data

    def close(self) -> None:
        if self.pending:
            self.out.write(self.pending.decode("utf-8", errors="replace"))
        self.out.write("\n")
        self.out.flush()


def generate_text(source: str, *, prompt: str | None, prompt_file: str | None, max_tokens: int,
                  temperature: float, top_k: int | None, top_p: float | None, seed: int, batch: int,
                  out: TextIO) -> list[str]:
    """Stream row 0's continuation to `out` (the others follow once done); returns every row's text.
    A row stops at <|endoftext|>; generation stops when every row has."""
    from data_pipelines.tokenizer import EOT, get_tokenizer

    check_sampling(temperature, top_k, top_p)
    if batch < 1:
        raise PromptError(f"--batch {batch}: must be >= 1")
    if prompt_file is not None:
        with open(prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if not prompt:
        raise PromptError("the prompt is empty; give --prompt TEXT or a non-empty --prompt-file")
    model, _ = load_model(source)
    enc = get_tokenizer()
    ids = [EOT, *enc.encode_ordinary(prompt)]  # every training document starts with <|endoftext|>
    rows: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    live = _Utf8Stream(out)
    for tok in stream(model, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, batch=batch):
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            if t == EOT:
                done[i] = True
                continue
            rows[i].append(t)
            if i == 0:
                live.write(enc.decode_bytes([t]))
        if done.all():
            break
    live.close()
    texts = [enc.decode(r) for r in rows]
    for i, text in enumerate(texts[1:], start=1):
        out.write(f"--- sample {i} ---\n{text}\n")
    return texts
