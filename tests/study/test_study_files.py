"""jobs/study/pysrc_4k.yaml is the comparison it says: every architecture of the BST paper's table
at L=4096, W=512 and the GPT-2 vocabulary, one token budget, non-embedding parameters within 5%,
the no-carry twins and the second seeds differing from their run in that one key only."""

import os

import pytest

from bst_dist.runs.describe import layer_label
from bst_dist.study import runner, spec

from tests.helpers.paths import JOBS, REPO

STUDY = os.path.join(JOBS, "study", "pysrc_4k.yaml")


@pytest.fixture(scope="module")
def study():
    return spec.load(STUDY, out="/nonexistent/study_out")


def _kinds(cfg):
    return sorted({layer_label(cfg.model, i) for i in range(cfg.model.num_layers)})


def test_architectures_budget_and_shape(study):
    runs = {r.name: r for r in study.runs}
    want = {"slide_12l_s0": ["Block"], "trsf_xl_2048": ["Trsf-XL"], "brect_fixed_skip": ["BRecT:fixed:skip", "Block"],
            "bst_sh_s4_s0": ["BST:SH:S4", "Block"], "bst_sh_unstruct": ["BST:SH:unstruct", "Block"],
            "bst_mf_s4": ["BST:MF:S4", "Block"]}
    for name, kinds in want.items():
        assert _kinds(runs[name].cfg) == kinds, name
    for r in study.runs:
        m = r.cfg.model
        assert r.tokens == study.tokens and m.vocab_size == 50257 and m.dtype == "bfloat16"
        assert r.cfg.data.corpus == "pysrc" and r.cfg.train.run_dir.startswith("/nonexistent/study_out/runs/")
        if r.name == "trsf_xl_2048":
            assert (m.block_len, m.seq_len) == (2048, 2048)
        else:
            assert (m.block_len, m.seq_len) == (512, 4096)
    assert study.eval.split == "test" and study.eval.lengths == (512, 4096, 16384, 65536)


def test_equal_params_within_five_percent(study):
    check = runner.check_params(study, runner.param_counts(study))
    assert check["within_tolerance"] and check["spread"] <= 0.05 and study.param_tolerance == 0.05


@pytest.mark.parametrize("twin, base, key", [
    ("bst_sh_s4_nocarry", "bst_sh_s4_s0", ("train", "carry_cache")),
    ("brect_fixed_skip_nocarry", "brect_fixed_skip", ("train", "carry_cache")),
    ("bst_sh_s4_s1", "bst_sh_s4_s0", ("train", "seed")),
    ("slide_12l_s1", "slide_12l_s0", ("train", "seed")),
])
def test_twins_differ_in_one_key(study, twin, base, key):
    from bst_dist import config

    runs = {r.name: config.to_dict(r.cfg) for r in study.runs}
    a, b = runs[twin], runs[base]
    for d in (a, b):
        d.pop("name")
        d["train"].pop("run_dir")
    assert a[key[0]][key[1]] != b[key[0]][key[1]]
    a[key[0]].pop(key[1])
    b[key[0]].pop(key[1])
    assert a == b
