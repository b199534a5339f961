"""Shared benchmark plumbing: device and version info, timing, state creation, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_info() -> dict:
    import flax
    import jax
    import jaxlib
    info = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "num_devices": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "python": platform.python_version()}
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001 -- optional: not every jaxlib build exposes it
        pass
    return info


def timed(fn, args, steps: int, warmup: int = 2) -> dict:
    """Median wall time of `fn(*args)` (blocked until ready) over `steps` calls after `warmup`."""
    import jax
    import numpy as np
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(ts)), "ms_min": 1e3 * float(np.min(ts)), "ms_max": 1e3 * float(np.max(ts))}


def peak_gib() -> float:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def write(out_dir: str, name: str, report: dict) -> str:
    """Write `report` with the device, versions and the exact command to OUT_DIR/NAME.json."""
    os.makedirs(out_dir, exist_ok=True)
    report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
              "device": device_info(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **report}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path
