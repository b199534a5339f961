"""The `pysrc` corpus: any folder of installed Python packages (a site-packages), one document per
top-level package, as the BST paper's GitHub set concatenated the files of a repository.

A top-level package is a folder directly under the source that holds .py files (anywhere below
it), or a top-level module `name.py`; metadata (`*.dist-info`, `*.egg-info`), `__pycache__` and
files below them are skipped. A package's document is its .py files in sorted relative-path order,
each preceded by a `# file: <path>` line (a module and a folder of the same name make one
document).

Splits, by package name only (nothing depends on listing order, machine or process count):
  test        a fixed list of held-out packages (`TEST_PACKAGES`, or `--test-packages`); a listed
              package that is not in the folder is replaced by the present package, not listed and
              not yet chosen, with the smallest sha1("pysrc-test:" + name), so the test split keeps
              its size on any folder
  validation  `val_fraction` of the remaining packages by name hash (corpora.split_by_hash)
  train       the rest
The manifest's `pysrc` section records the requested list, what was missing and what replaced
it, and every split's packages with their token counts.
"""

from __future__ import annotations

import hashlib

from data_pipelines import fs
from data_pipelines.errors import DataError

# Held-out packages for the GPU machine's site-packages (jax/flax/torch environment): real,
# mid-size (0.3-4 MB of source each, together ~3-4M GPT-2 tokens), pure Python, and dependencies
# that such an environment installs. sympy and torch are left to training: one of them alone
# would outweigh the rest of the test split.
TEST_PACKAGES = ("networkx", "jinja2", "pygments", "requests", "yaml", "fsspec", "mpmath", "markdown_it")

_SKIP_DIRS = ("__pycache__",)
_META_SUFFIXES = (".dist-info", ".egg-info", ".data")


def _skipped(part: str) -> bool:
    return part in _SKIP_DIRS or part.endswith(_META_SUFFIXES)


def package_files(src: str, skipped: fs.Skipped | None = None) -> dict[str, list[tuple[str, int]]]:
    """package name -> [(path relative to src, bytes)] of its .py files, sorted by path; what is
    left out is counted in `skipped`."""
    skipped = skipped if skipped is not None else fs.Skipped()
    by_pkg: dict[str, list[tuple[str, int]]] = {}
    for rel, size in fs.list_files(src, (".py",), skipped):
        parts = rel.split("/")
        if any(_skipped(p) for p in parts[:-1]):
            skipped.add("files in __pycache__ or package metadata folders", rel)
            continue
        name = parts[0][:-3] if len(parts) == 1 else parts[0]
        if not name or name.startswith(".") or "-" in name:
            skipped.add("files outside an importable package", rel)
            continue  # not importable: editable-install shims, stray scripts
        by_pkg.setdefault(name, []).append((rel, size))
    return {k: sorted(v) for k, v in sorted(by_pkg.items())}


def _test_order(name: str) -> tuple[str, str]:
    return hashlib.sha1(f"pysrc-test:{name}".encode("utf-8")).hexdigest(), name


def choose_test(names: list[str], requested: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """(test packages, requested but missing, replacements chosen by hash)."""
    present = set(names)
    test = [p for p in requested if p in present]
    missing = [p for p in requested if p not in present]
    pool = sorted((n for n in names if n not in set(requested)), key=_test_order)
    # keep at least 2 packages outside the test split (train, and validation when asked)
    room = max(0, len(names) - len(test) - 2)
    replacements = pool[:min(len(missing), room)]
    return sorted(test + replacements), missing, replacements


def parse_packages(value) -> tuple[str, ...]:
    """A --test-packages value: comma-separated names, or a list; names must be importable."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    for n in names:
        if not n.isidentifier():
            raise DataError(f"--test-packages: {n!r} is not a package name (expected names like networkx,jinja2)")
    return names


def list_pysrc(src: str, val_fraction: float, test_packages=None, skipped: fs.Skipped | None = None):
    """Every package of `src` as a corpora.Doc, with its split."""
    from data_pipelines.corpora import Doc, _require_dir, split_by_hash

    _require_dir("pysrc", src)
    requested = TEST_PACKAGES if test_packages is None else parse_packages(test_packages)
    by_pkg = package_files(src, skipped)
    if len(by_pkg) < 2:
        raise DataError(f"corpus 'pysrc': {src} holds {len(by_pkg)} Python package(s); need at least 2 "
                        "(a folder of packages, e.g. a site-packages)")
    test, _, _ = choose_test(list(by_pkg), requested)
    rest = [n for n in by_pkg if n not in set(test)]
    split = split_by_hash(rest, val_fraction)
    split.update({n: "test" for n in test})
    return [Doc(name, split[name], tuple(fs.join(src, r) for r, _ in files), max(1, sum(s for _, s in files)),
                tuple(r for r, _ in files)) for name, files in by_pkg.items()]


def manifest_section(docs, doc_tokens: dict[str, int], test_packages=None) -> dict:
    """The manifest's `pysrc` entry: the held-out list as asked and as resolved, and each split's
    packages -> tokens (packages that tokenized to nothing are listed with 0)."""
    requested = TEST_PACKAGES if test_packages is None else parse_packages(test_packages)
    _, missing, replacements = choose_test([d.name for d in docs], requested)
    splits: dict[str, dict[str, int]] = {}
    for d in docs:
        splits.setdefault(d.split, {})[d.name] = int(doc_tokens.get(d.name, 0))
    return {"test_packages_requested": list(requested), "test_packages_missing": missing,
            "test_packages_replacements": replacements,
            "packages": {s: dict(sorted(p.items())) for s, p in sorted(splits.items())}}

