"""The pysrc corpus on real installed packages (a few small ones copied from this venv): one
document per top-level package in sorted file order, the held-out test list with its hash
fallback, and the manifest's package lists and per-split token counts."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from data_pipelines import corpora, iter_documents
from data_pipelines.errors import DataError
from data_pipelines.pysrc import choose_test, list_pysrc, package_files
from data_pipelines.shards import prepare
from data_pipelines.tokenizer import EOT, get_tokenizer

from tests.helpers.paths import REPO

SITE = os.path.dirname(os.path.dirname(pytest.__file__))  # this venv's site-packages
PACKAGES = ("iniconfig", "cycler", "mdurl", "annotated_types", "aiosignal", "frozenlist")
MODULES = ("six.py",)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """A small site-packages: real packages and a top-level module, plus what must be skipped."""
    root = str(tmp_path_factory.mktemp("site"))
    for p in PACKAGES:
        shutil.copytree(os.path.join(SITE, p), os.path.join(root, p), ignore=shutil.ignore_patterns("__pycache__"))
    for m in MODULES:
        shutil.copy(os.path.join(SITE, m), root)
    os.makedirs(os.path.join(root, "iniconfig-2.3.1.dist-info"))
    with open(os.path.join(root, "iniconfig-2.3.1.dist-info", "fake.py"), "w") as f:
        f.write("print('metadata, not code')\n")
    os.makedirs(os.path.join(root, "cycler", "__pycache__"), exist_ok=True)
    with open(os.path.join(root, "cycler", "__pycache__", "junk.py"), "w") as f:
        f.write("junk = 1\n")
    return root


def test_one_document_per_package_in_sorted_file_order(site):
    files = package_files(site)
    assert sorted(files) == sorted([*PACKAGES, "six"])
    docs = {d.name: d for d in list_pysrc(site, 0.2, test_packages=("mdurl",))}
    for name, d in docs.items():
        rel = [os.path.relpath(f, site) for f in d.files]
        assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
        assert all("__pycache__" not in r and "dist-info" not in r for r in rel)
        want = sorted(os.path.relpath(os.path.join(dp, f), site) for dp, _, fs_ in os.walk(os.path.join(site, name))
                      for f in fs_ if f.endswith(".py") and "__pycache__" not in dp) if name != "six" else ["six.py"]
        assert rel == want
    text, bad = corpora.read_document(docs["mdurl"])
    assert bad == 0 and text.startswith("# file: mdurl/__init__.py\n")
    assert text.index("# file: mdurl/_decode.py") < text.index("# file: mdurl/_url.py")


def test_split_held_out_list_and_hash_fallback(site):
    names = sorted(package_files(site))
    # two listed packages present, one listed package absent: replaced by the hash rule
    test, missing, repl = choose_test(names, ("mdurl", "cycler", "networkx"))
    assert missing == ["networkx"] and len(repl) == 1 and repl[0] not in ("mdurl", "cycler")
    assert test == sorted(["mdurl", "cycler", *repl])
    # the replacement does not depend on listing order, and not on which other packages were listed
    assert choose_test(list(reversed(names)), ("mdurl", "cycler", "networkx")) == (test, missing, repl)
    assert choose_test(names, ("mdurl", "cycler", "sympy"))[2] == repl
    docs = list_pysrc(site, 0.2, test_packages="mdurl,cycler,networkx")
    split = {d.name: d.split for d in docs}
    assert sorted(n for n, s in split.items() if s == "test") == test
    assert sum(s == "validation" for s in split.values()) == 1  # round(0.2 * 4 remaining)
    assert sum(s == "train" for s in split.values()) == len(names) - len(test) - 1
    with pytest.raises(DataError, match="--test-packages: 'not a name'"):
        list_pysrc(site, 0.2, test_packages="mdurl,not a name")


def test_prepare_manifest_records_packages_and_tokens(site, data_cache, tmp_path):
    out = str(tmp_path / "pysrc")
    m = prepare("pysrc", site, out, num_shards=2, workers=1, val_fraction=0.2, cache_dir=data_cache,
                progress=False, test_packages=("mdurl", "cycler", "networkx"))
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == m
    sec = m["pysrc"]
    assert sec["test_packages_requested"] == ["mdurl", "cycler", "networkx"]
    assert sec["test_packages_missing"] == ["networkx"]
    assert set(sec["packages"]) == {"train", "validation", "test"} == set(m["splits"])
    for split, pkgs in sec["packages"].items():
        assert sum(pkgs.values()) == m["splits"][split]["tokens"]
        assert len(pkgs) == m["splits"][split]["documents"]
    assert {"mdurl", "cycler"} <= set(sec["packages"]["test"])
    # a document's tokens are its text's (EOT first), so the counts are real
    enc = get_tokenizer(data_cache)
    docs = {d.name: d for d in list_pysrc(site, 0.2, test_packages=("mdurl", "cycler", "networkx"))}
    test_rows = list(iter_documents(out, "test"))
    names = sorted(sec["packages"]["test"])
    for (_, tokens), name in zip(test_rows, names):
        want = enc.encode_ordinary(corpora.read_document(docs[name])[0])
        assert tokens[0] == EOT and tokens[1:].tolist() == want
        assert sec["packages"]["test"][name] == len(want)


def test_cli_bad_source_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "bst_dist", "prepare-data", "--corpus", "pysrc", "--src",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "need at least 2" in proc.stderr
