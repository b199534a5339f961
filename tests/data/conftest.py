"""Fixtures of the data-pipeline tests: a cache dir, a PG-19-layout source folder and its prepared
shards (session-scoped: prepared once per test process)."""

import pytest

from tests.data.corpora import write_pg19


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """Our cache dir for the tests (tokenizer's tiktoken cache lands here, never in /tmp)."""
    return str(tmp_path_factory.mktemp("bst_cache"))


@pytest.fixture(scope="session")
def pg19_src(tmp_path_factory) -> str:
    return write_pg19(str(tmp_path_factory.mktemp("pg19_src")))


@pytest.fixture(scope="session")
def pg19_prepared(tmp_path_factory, pg19_src, data_cache) -> str:
    from data_pipelines.shards import prepare

    out = str(tmp_path_factory.mktemp("pg19_prepared") / "pg19")
    prepare("pg19", pg19_src, out, num_shards=3, workers=1, cache_dir=data_cache, progress=False)
    return out
