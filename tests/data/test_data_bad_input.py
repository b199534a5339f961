"""Bad input: each case is handled (and counted) or refused with a one-line DataError that says
what and where; nothing is dropped silently and nothing fails mid-epoch."""

import json
import os
import shutil

import numpy as np
import pytest

from bst_dist.commands import main as cli
from data_pipelines import corpora, ensure_prepared, iter_documents, make_loader
from data_pipelines.errors import DataError
from data_pipelines.shards import prepare, summary
from data_pipelines.tokenizer import get_tokenizer

from tests.data.corpora import data_cfg, synth_text

L, B = 16, 4


@pytest.fixture(scope="module")
def messy(tmp_path_factory, data_cache):
    """A text corpus with an empty file, invalid UTF-8, a 1-token document and one ~2000 x L long."""
    src = tmp_path_factory.mktemp("messy")
    (src / "a_empty.txt").write_bytes(b"")
    (src / "b_latin1.txt").write_bytes("café crème\n".encode("latin-1") + b"ok \xff\xfe\x80 end\n")
    (src / "c_short.txt").write_text("Hi")
    (src / "d_long.txt").write_text(synth_text(1, 30000))  # ~33k tokens: ~2000 sequences of 16
    for i in range(5):
        (src / f"e_doc{i}.txt").write_text(synth_text(10 + i, 50 * (i + 1)))
    out = str(tmp_path_factory.mktemp("messy_out") / "p")
    manifest = prepare("text", str(src), out, num_shards=2, workers=1, val_fraction=0.0, cache_dir=data_cache,
                       progress=False)
    return str(src), out, manifest


def test_bad_documents_are_counted_in_the_manifest_and_summary(messy):
    _, out, m = messy
    bad = m["bad_input"]
    assert bad["empty_documents"] == 1 and bad["empty_document_names"] == ["a_empty.txt"]
    assert bad["documents_with_invalid_utf8"] == 1 and bad["invalid_utf8_document_names"] == ["b_latin1.txt"]
    assert bad["invalid_utf8_sequences_replaced"] == 5  # é, è (latin-1), then \xff \xfe \x80 one each
    assert m["documents"] == 8 and m["shortest_document_tokens"] == 1 and m["longest_document_tokens"] > 2000 * L
    text = summary(m, out)
    assert "empty documents skipped: 1 (a_empty.txt)" in text and "invalid UTF-8" in text
    with open(os.path.join(out, "documents.tsv")) as f:
        assert "b_latin1.txt" in f.read()


def test_bad_documents_stream_through_one_epoch(messy, data_cache):
    _, out, _ = messy
    docs = dict(iter_documents(out, "train"))
    enc = get_tokenizer(data_cache)
    assert "\ufffd" in enc.decode(docs[1][1:].tolist())  # decoded with replacement, not dropped
    got = {d: [] for d in docs}
    with make_loader(data_cfg(out), seq_len=L, global_batch_size=B, num_epochs=1) as loader:
        for batch in loader:
            for lane in range(B):
                if batch["doc_id"][lane] >= 0:
                    n = int(batch["loss_mask"][lane].sum())
                    got[int(batch["doc_id"][lane])].append(batch["targets"][lane, :n])
    for d, toks in docs.items():
        np.testing.assert_array_equal(np.concatenate(got[d]), toks[1:])
    assert len(got[2]) == 1 and len(got[3]) > 2000  # the 1-token and the ~2000-sequence documents


def test_missing_or_empty_sources(tmp_path, data_cache):
    kw = dict(cache_dir=data_cache, progress=False, workers=1)
    with pytest.raises(DataError, match=f"source {tmp_path}/nope does not exist"):
        prepare("text", str(tmp_path / "nope"), str(tmp_path / "o1"), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no documents"):
        prepare("text", str(tmp_path / "empty"), str(tmp_path / "o2"), **kw)
    with pytest.raises(DataError, match="no source given"):
        prepare("pg19", None, str(tmp_path / "o3"), **kw)
    with pytest.raises(DataError, match="has no train/ folder"):
        prepare("pg19", str(tmp_path / "empty"), str(tmp_path / "o4"), **kw)
    with pytest.raises(DataError, match="unknown"):
        prepare("wiki", str(tmp_path), str(tmp_path / "o5"), **kw)


def test_bad_jsonl_lines_are_skipped_counted_and_named_by_file_and_line(tmp_path, data_cache):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n{"body": "x"}\n'
                   '[1, 2]\n{"text": 7}\n\n{"text": "last"}\n')
    out = str(tmp_path / "o")
    m = prepare("jsonl", str(src), out, num_shards=1, workers=1, val_fraction=0.0, cache_dir=data_cache,
                progress=False)
    assert m["documents"] == 3  # lines 1, 2 and 8; the blank line 7 is no document
    bad = m["bad_input"]["skipped"]["bad JSONL lines"]
    assert bad["count"] == 4
    assert [e.split(": ", 1)[0] for e in bad["examples"]] == [f"{src}:3", f"{src}:4", f"{src}:5", f"{src}:6"]
    assert "not valid JSON" in bad["examples"][0] and "no 'text' field" in bad["examples"][1]
    assert "field 'text' is int, not a string" in bad["examples"][3]
    assert f"bad JSONL lines: 4 ({src}:3: not valid JSON" in summary(m, out)
    texts = sorted(get_tokenizer(data_cache).decode(t[1:].tolist()) for _, t in iter_documents(out, "train"))
    assert texts == ["also fine", "fine", "last"]
    # without a collector (a caller of list_documents of its own) a bad line is still refused
    with pytest.raises(DataError, match=r"c.jsonl:3: not valid JSON"):
        corpora.list_documents("jsonl", str(src), cache=data_cache, val_fraction=0.0)


def test_only_bad_jsonl_lines_is_an_empty_corpus(tmp_path, data_cache):
    src = tmp_path / "c.jsonl"
    src.write_text('{"body": "x"}\nnot json\n')
    with pytest.raises(DataError) as e:
        prepare("jsonl", str(src), str(tmp_path / "o"), num_shards=1, workers=1, cache_dir=data_cache, progress=False)
    assert str(e.value) == f"corpus 'jsonl': {src} holds no documents (skipped: 2 bad JSONL lines)"


def test_corpus_walk_skips_and_counts_links_loops_and_special_files(tmp_path, data_cache):
    src = tmp_path / "walk"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(synth_text(1, 40))
    (src / "B.TXT").write_text(synth_text(2, 40))  # the extension is case-insensitive
    (src / "sub" / "c.Txt").write_text(synth_text(3, 40))
    (src / "notes.md").write_text("not a .txt")
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)  # walking it would never end
    (src / "again").symlink_to(src / "sub", target_is_directory=True)  # sub/ a second time
    (src / "broken.txt").symlink_to(tmp_path / "gone.txt")
    (src / "linked.txt").symlink_to(src / "a.txt")  # a link to a file is that file
    os.mkfifo(src / "pipe.txt")  # reading it would block for ever
    out = str(tmp_path / "o")
    m = prepare("text", str(src), out, num_shards=1, workers=1, val_fraction=0.0, cache_dir=data_cache,
                progress=False)
    names = sorted(line.split("\t")[-1] for line in open(os.path.join(out, "documents.tsv")).read().splitlines()[1:])
    assert names == ["B.TXT", "a.txt", "linked.txt", "sub/c.Txt"]
    skipped = {k: (v["count"], v["examples"]) for k, v in m["bad_input"]["skipped"].items()}
    assert skipped == {"broken symlinks": (1, ["broken.txt"]),
                       "files not ending in .txt": (1, ["notes.md"]),
                       "folders reached again through a symlink": (1, ["again"]),
                       "special files (not regular files)": (1, ["pipe.txt"]),
                       "symlink loops": (1, ["sub/loop"])}, skipped
    text = summary(m, out)
    assert "skipped while listing: 5" in text and "symlink loops: 1 (sub/loop)" in text


def test_a_corpus_of_empty_files_is_refused_at_prepare_time(tmp_path, data_cache):
    src = tmp_path / "blank"
    src.mkdir()
    (src / "a.txt").write_text("")
    (src / "b.txt").write_bytes(b"")
    (src / "c.json").write_text("{}")
    out = tmp_path / "o"
    with pytest.raises(DataError) as e:
        prepare("text", str(src), str(out), num_shards=1, workers=1, cache_dir=data_cache, progress=False)
    assert str(e.value) == (f"corpus 'text': {src}: no document has any text (2 empty; skipped: "
                            "1 files not ending in .txt)")
    assert not (out / "manifest.json").exists()  # not a prepared folder a loader would open


def test_out_dir_that_is_not_ours_is_refused(tmp_path, data_cache, messy):
    src, _, _ = messy
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty and is not a prepared-data folder"):
        prepare("text", src, str(tmp_path / "mine"), cache_dir=data_cache, progress=False)


def test_prepared_dir_problems(tmp_path, messy):
    _, out, _ = messy
    with pytest.raises(DataError, match="no such folder"):
        ensure_prepared(data_cfg(str(tmp_path / "nothing")))
    half = tmp_path / "half"
    shutil.copytree(out, half)
    os.remove(half / "manifest.json")  # as after a killed prepare-data
    with pytest.raises(DataError, match="no manifest.json"):
        make_loader(data_cfg(str(half)), seq_len=L, global_batch_size=B)
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shard = sorted((cut / "shards").glob("train-*.array_record"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=f"shard {shard.name} has 100 bytes"):
        make_loader(data_cfg(str(cut)), seq_len=L, global_batch_size=B)
    other = tmp_path / "other_tok"
    shutil.copytree(out, other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"] = {**m["tokenizer"], "name": "cl100k_base", "n_vocab": 100277}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"tokenized with 'cl100k_base'.*this build uses 'gpt2'"):
        make_loader(data_cfg(str(other)), seq_len=L, global_batch_size=B)


def test_loader_refusals(messy):
    _, out, _ = messy
    with pytest.raises(DataError, match="fewer than the 16 lanes"):
        make_loader(data_cfg(out), seq_len=L, global_batch_size=16)
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        make_loader(data_cfg(out), seq_len=L, global_batch_size=B, process_count=3)
    with pytest.raises(DataError, match="no 'test' split"):
        make_loader(data_cfg(out), seq_len=L, global_batch_size=B, split="test")
    # an evaluation pass may have fewer documents than lanes: idle lanes give zero rows
    with make_loader(data_cfg(out), seq_len=L, global_batch_size=16, num_epochs=1) as loader:
        first = next(loader)
        assert (first["doc_id"] >= 0).sum() == 8 and not first["loss_mask"][8:].any()


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    code = cli.main(["prepare-data", "--corpus", "text", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"bst-dist prepare-data: error: corpus 'text': source {tmp_path}/nope does not exist"]


def test_cli_prepares_and_reports(tmp_path, capsys, messy, data_cache):
    src, _, _ = messy
    code = cli.main(["prepare-data", "--corpus", "text", "--src", src, "--out", str(tmp_path / "o"),
                     "--num-shards", "2", "--workers", "1", "--cache-dir", data_cache, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "empty documents skipped: 1" in out and "byte sequences replaced" in out
