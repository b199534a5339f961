"""JAX's persistent compilation cache for a run (`train.compile_cache`).

Compiling the train step of a 400M model takes over a minute on a GPU; a restart or a resume
compiles the same programs again. With the cache every compiled executable is written to a
folder keyed by the program, the devices and the flags, so the next process with the same job
loads it instead. `enable(cfg)` is called by every process at the top of `train()`, before
anything compiles (JAX reads the folder at its first compile).

    train.compile_cache: null  -> $BST_DIST_COMPILE_CACHE when set ("" off), else
                                  $BST_DIST_CACHE/jax, else ~/.cache/bst_dist/jax
    train.compile_cache: ""    -> off
    train.compile_cache: DIR   -> DIR (a local path or gs://bucket/prefix)
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("bst_dist.train")


def cache_dir(setting: str | None) -> str | None:
    """The folder `train.compile_cache` names (None: off)."""
    if setting is None and "BST_DIST_COMPILE_CACHE" in os.environ:  # the machine's default (a test suite: off)
        setting = os.environ["BST_DIST_COMPILE_CACHE"]
    if setting is None:
        root = os.environ.get("BST_DIST_CACHE") or os.path.join("~", ".cache", "bst_dist")
        return os.path.join(os.path.expanduser(root), "jax")
    if not setting:
        return None
    return setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `setting`'s folder (see the module doc); returns
    the folder, or None when the cache is off. A process that already compiled with another
    folder (several runs in one process: tests, studies) switches to this one."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = cache_dir(setting)
    if path != jax.config.jax_compilation_cache_dir:
        # JAX opens the cache once, at the first compile: forget the one it opened
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    if path is None:
        return None
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    # Every program, however quick to compile: the step of a small job compiles in under the
    # default 1 s and a resume is as slow as its slowest miss. An entry is written once.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    log.debug("persistent compilation cache: %s", path)
    return path
