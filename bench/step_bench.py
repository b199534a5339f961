"""Train-step benchmark on one accelerator (issue 3): the real `bst_dist.train.step.make_train_step`
on a one-device mesh, the paper configurations at L=4096, W=512, bf16 compute, synthetic tokens.

    python bench/step_bench.py                          # everything, one subprocess per case
    python bench/step_bench.py --cases Slide:12L --impls xla,cudnn --steps 10
    python bench/step_bench.py --tiny --anchors none    # CPU smoke test of the harness (tiny model)

Per case: compile time, median step time over --steps timed steps after --warmup (each step
ends with block_until_ready on the new state and metrics), tokens/s, model TFLOP/s from
`bst_dist.models.flops.train_step_flops`, MFU against the bf16 matmul rate measured in the same run by
`.anchors/anchor_gpu.py jax`, peak device memory (`peak_bytes_in_use`, each case is its own
process) and XLA's memory analysis of the step. Peers in the same run: `.anchors/anchor_jax_lm.py
window` (plain JAX sliding-window decoder, cuDNN flash). `--check` first checks the cuDNN
attention path against float32 on the device and times attention and the loss head alone.

Variants: impl xla | cudnn (model.attention_impl); loss plain | chunked (the output head through
`bst_dist.train.chunked_loss.chunked_cross_entropy`, patched into the real train step).
Writes <out>/step_bench_<device>.json (out: $OUT, else bench/out) and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = dict(vocab_size=50257, d_model=1024, num_layers=12, num_heads=8, head_dim=128, mlp_dim=4096,
            block_len=512, seq_len=4096, dtype="bfloat16")
TINY = dict(vocab_size=1000, d_model=64, num_layers=4, num_heads=2, head_dim=32, mlp_dim=128,
            block_len=16, seq_len=64, dtype="bfloat16")

# name -> (model overrides on the 12-layer family, batch multiplier: Trsf-XL:2048 keeps tokens/step)
CASES = {
    "Slide:12L": ({}, 1),
    "Trsf-XL:2048": ({"block_len": 2048, "seq_len": 2048}, 2),
    "BRecT:fixed:skip": ({"brect_layers": [9], "brect": {"gate": "fixed", "skip": True}}, 1),
    "BST:SH:S4": ({"bst_layers": [0, 7, 9], "bst": {"variant": "SH", "kernel": "s4d"}}, 1),
    "BST:MH:S4": ({"bst_layers": [0, 7, 9], "bst": {"variant": "MH", "kernel": "s4d"}}, 1),
    "BST:MF:S4": ({"bst_layers": [0, 7, 9], "bst": {"variant": "MF", "kernel": "s4d"}}, 1),
    "BST:SH:unstruct": ({"bst_layers": [0, 7, 9], "bst": {"variant": "SH", "kernel": "unstruct"}}, 1),
    "BST:MF:unstruct": ({"bst_layers": [0, 7, 9], "bst": {"variant": "MF", "kernel": "unstruct"}}, 1),
}


def model_dict(name: str, impl: str, tiny: bool) -> dict:
    over, _ = CASES[name]
    m = dict(TINY if tiny else BASE)
    over = json.loads(json.dumps(over))
    if tiny:  # map the 12-layer placements onto 4 layers; Trsf-XL: W = L
        for k in ("bst_layers", "brect_layers"):
            if k in over:
                over[k] = sorted({i * 4 // 12 for i in over[k]})
        if "block_len" in over:
            over["block_len"] = over["seq_len"] = 32
    m.update(over)
    m["attention_impl"] = impl
    return m


# --------------------------------------------------------------------------------------------
# One case (child process)


def _device_info() -> dict:
    import jax
    import jaxlib
    info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count()}
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001
        info["cuda_versions_error"] = repr(e)[:200]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
        info["nvidia_smi"] = out.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def _profile_summary(run_steps, steps: int = 2, top: int = 60) -> dict:
    """Trace `steps` steps; device time per kernel (stream lines of the GPU plane), top kernels
    and coarse categories."""
    import jax
    from jax._src.profiler import ProfileData
    d = tempfile.mkdtemp(prefix="bst_prof_")
    jax.profiler.start_trace(d)
    run_steps(steps)
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return {"error": "no xplane.pb"}
    pd = ProfileData.from_file(paths[0])
    per_kernel: dict[str, float] = {}
    per_op: dict[str, float] = {}
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                dur = ev.duration_ns / 1e6
                per_kernel[ev.name] = per_kernel.get(ev.name, 0.0) + dur
                stats = dict(ev.stats)
                op = str(stats.get("hlo_op", ev.name))
                per_op[op] = per_op.get(op, 0.0) + dur
    total = sum(per_kernel.values())

    def cat(name: str) -> str:
        n = name.lower()
        if "fmha" in n or "cudnn" in n or "flash" in n or "sdpa" in n:
            return "attention (cuDNN)"
        if "fft" in n or "regular_fft" in n or "vector_fft" in n:
            return "FFT"
        if any(s in n for s in ("gemm", "xmma", "nvjet", "cutlass", "sm90", "matmul", "dot")):
            return "matmul"
        if "nccl" in n:
            return "collective"
        if "memcpy" in n or "memset" in n:
            return "copy"
        return "fusion / elementwise / reduce"

    cats: dict[str, float] = {}
    for k, v in per_kernel.items():
        cats[cat(k)] = cats.get(cat(k), 0.0) + v
    tops = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    top_ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"steps": steps, "device_ms_per_step": total / steps,
            "categories_ms_per_step": {k: round(v / steps, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [(k[:120], round(v / steps, 3)) for k, v in tops],
            "top_hlo_ops_ms_per_step": [(k[:120], round(v / steps, 3)) for k, v in top_ops]}


def run_case(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bst_dist import config as config_mod
    from bst_dist import parallel
    from bst_dist.models.flops import train_step_flops
    from bst_dist.models import attention as attn
    from bst_dist.train import state as state_mod
    from bst_dist.train import step as step_mod

    tiny = spec.get("tiny", False)
    impl = spec["impl"]
    if impl == "xla-tb":  # the XLA attention path with the scatter-free T5 bias of the cudnn path
        attn.window_bias = attn.window_bias_toeplitz
        impl = "xla"
    if impl == "cudnn-x":  # cudnn, and the BST SH/MH causal cross-attention through the fused kernel too
        _patch_cross_attention(attn, "xla" if tiny else "cudnn")
        impl = "cudnn"
    if tiny and impl == "cudnn":  # no cuDNN on CPU: the same code through the XLA kernel
        flash = attn.block_self_attention_flash
        attn.block_self_attention_flash = lambda *a, implementation="cudnn": flash(*a, implementation="xla")
    if spec.get("loss", "plain") == "chunked":
        _patch_chunked_loss(spec.get("ce_chunk", 2048))

    m = model_dict(spec["case"], impl, tiny)
    B = spec["batch"] * CASES[spec["case"]][1]
    cfg = config_mod.from_dict({"model": m, "train": {"global_batch_size": B, "remat": spec.get("remat", "none"),
                                                      "steps": 1000}})
    res = {"case": spec["case"], "impl": spec["impl"], "loss": spec.get("loss", "plain"),
           "remat": cfg.train.remat, "batch": B, "seq_len": cfg.model.seq_len, "block_len": cfg.model.block_len}
    t_setup = time.perf_counter()
    mesh = parallel.make_mesh(cfg.mesh)
    setup, state, cache = _create_state(cfg, mesh, state_mod)
    res["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
    res["params_nonembed"] = res["params"] - cfg.model.padded_vocab * cfg.model.d_model
    step = step_mod.make_train_step(setup)
    L, V = cfg.model.seq_len, cfg.model.vocab_size
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"inputs": jax.random.randint(k1, (B, L), 0, V, jnp.int32),
             "targets": jax.random.randint(k2, (B, L), 0, V, jnp.int32),
             "loss_mask": jnp.ones((B, L), jnp.float32),
             "doc_start": jnp.arange(B) == 0}  # lane 0 starts a document: both block-0 paths run
    batch = jax.device_put(batch, step_mod.batch_shardings(setup))

    t0 = time.perf_counter()
    res["setup_s"] = t0 - t_setup
    compiled = step.lower(state, cache, batch).compile()
    res["compile_s"] = time.perf_counter() - t0
    try:
        ma = compiled.memory_analysis()
        res["xla_temp_GiB"] = ma.temp_size_in_bytes / 2**30
        res["xla_args_GiB"] = ma.argument_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001
        pass

    def run_steps(n):
        nonlocal state, cache
        for _ in range(n):
            state, cache, metrics = compiled(state, cache, batch)
        jax.block_until_ready((state, cache, metrics))
        return metrics

    metrics = run_steps(spec.get("warmup", 2))
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        metrics = run_steps(1)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    run_steps(spec["steps"])
    res["mean_step_s_async"] = (time.perf_counter() - t) / spec["steps"]  # one block at the end
    res["step_s"] = float(np.median(times))
    res["step_s_min"] = float(np.min(times))
    res["step_s_max"] = float(np.max(times))
    res["train_loss"] = float(metrics["loss"])
    res["skipped"] = int(metrics["skipped"])
    res["tokens_per_s"] = B * L / res["step_s"]
    res["model_flops_per_step"] = train_step_flops(cfg.model, B)
    res["model_tflops"] = res["model_flops_per_step"] / res["step_s"] / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_GiB"] = stats.get("peak_bytes_in_use", 0) / 2**30
    res["run_s"] = time.perf_counter() - t0 - res["compile_s"]
    if spec.get("profile"):
        t = time.perf_counter()
        try:
            res["profile"] = _profile_summary(run_steps)
        except Exception as e:  # noqa: BLE001
            res["profile"] = {"error": repr(e)[:300]}
        res["profile_s"] = time.perf_counter() - t
    return res


def _create_state(cfg, mesh, state_mod):
    """`bst_dist.train.state.create`, with the parameters initialised on the host CPU and then
    placed: the same values, but no GPU compile of the init (`jit_init` took 2.5 min to compile
    for BST:SH:S4 on the H100, longer than the train step)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist.models import cache_shape

    setup, _, factory = state_mod.plan(cfg, mesh)
    tx = setup.tx

    def init():
        params = nnx.split(factory())[1]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    with jax.default_device(jax.devices("cpu")[0]):
        host = jax.jit(init)()
    state = jax.device_put(host, setup.state_shardings)
    shapes = cache_shape(cfg.model, cfg.train.global_batch_size)
    cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    out_shardings=setup.cache_shardings)()
    return setup, state, cache


def _patch_cross_attention(attn, implementation: str) -> None:
    """Route `attend` calls with a (W, W) in-block mask (the SH/MH cross-attention: inclusive,
    since the cudnn config requires it) to `block_cross_attention_flash`; the rest unchanged."""
    orig = attn.attend

    def attend(q, k, v, alpha, bias=None, mask=None, dropout=None):
        if (bias is None and dropout is None and mask is not None and mask.ndim == 2 and q.ndim == 5
                and mask.shape == (q.shape[-3], k.shape[-3]) and q.shape[-3] == k.shape[-3]):
            return attn.block_cross_attention_flash(q, k, v, alpha, implementation=implementation)
        return orig(q, k, v, alpha, bias=bias, mask=mask, dropout=dropout)

    attn.attend = attend


def _patch_chunked_loss(chunk: int) -> None:
    """Swap the output head of the real train step for the chunked cross-entropy: LM.logits
    returns the features and the table; step.cross_entropy consumes them."""
    from typing import NamedTuple

    import jax

    from bst_dist.models import lm as lm_mod
    from bst_dist.train import step as step_mod
    from bst_dist.train.chunked_loss import chunked_cross_entropy

    class Deferred(NamedTuple):
        x: jax.Array
        embed: jax.Array
        vocab_size: int

    lm_mod.LM.logits = lambda self, x: Deferred(x, self.embed[...], self.cfg.vocab_size)
    step_mod.cross_entropy = lambda d, t, m: chunked_cross_entropy(d.x, d.embed, t, m, vocab_size=d.vocab_size,
                                                                   chunk=chunk)


# --------------------------------------------------------------------------------------------
# Device checks and micro-benchmarks (child process)


def _time(f, *args, reps=20):
    import jax
    import numpy as np
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def run_check(tiny: bool, parts: str = "attention,head,scatter") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bst_dist.models import attention as attn
    from bst_dist.train.chunked_loss import chunked_cross_entropy
    from bst_dist.train.step import cross_entropy

    res = {"device": _device_info()}
    impl = "xla" if tiny else "cudnn"
    rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))

    shapes = [("L4096_W512", 4, 4096, 512), ("XL2048", 8, 2048, 2048)] if not tiny else [("tiny", 2, 64, 16)]
    if "scatter" in parts:
        res["scatter"] = _scatter_bench(tiny)
        print(json.dumps({"scatter": res["scatter"]}), flush=True)
    if "attention" not in parts:
        shapes = []
    H, hd = (8, 128) if not tiny else (2, 32)
    for label, B, T, W in shapes:
        key = jax.random.split(jax.random.PRNGKey(0), 8)
        q, k, v = (attn.l2_normalize(jax.random.normal(key[i], (B, T, H, hd), jnp.float32)) for i in range(3))
        kp, vp = (jax.random.normal(key[3 + i], (B, W, H, hd), jnp.float32) for i in range(2))
        valid = jnp.arange(B) != 0
        alpha = jax.random.uniform(key[5], (H,), jnp.float32, 0.5, 3.0) * 4.0
        table = jax.random.normal(key[6], (H, 32), jnp.float32)
        ct = jax.random.normal(key[7], (B, T, H, hd), jnp.float32)

        def loss(fn, dt):
            def f(q, k, v, kp, vp, alpha, table):
                c = lambda x: x.astype(dt)
                out = fn(c(q), c(k), c(v), c(kp), c(vp), valid, alpha, attn.window_bias(table, W, 128), W)
                return jnp.sum(out.astype(jnp.float32) * ct), out
            return jax.jit(jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True))

        xla_fn = lambda *a: attn.block_self_attention(*a, strict=False)
        fl_fn = lambda *a: attn.block_self_attention_flash(*a, implementation=impl)
        args = (q, k, v, kp, vp, alpha, table)
        (_, o_ref), g_ref = loss(xla_fn, jnp.float32)(*args)
        r = {}
        for name, fn in (("xla_bf16", xla_fn), ("flash_bf16", fl_fn)):
            try:
                f = loss(fn, jnp.bfloat16)
                (_, o), g = f(*args)
                r[name] = {"out_relerr": rel(o, o_ref),
                           "grad_relerr": {n: rel(a, b) for n, a, b in
                                           zip(["q", "k", "v", "k_prev", "v_prev", "alpha", "table"], g, g_ref)},
                           "fwd_bwd_ms": _time(f, *args) * 1e3}
                fwd = jax.jit(lambda *a, fn=fn: fn(*(x.astype(jnp.bfloat16) for x in a[:5]), valid, a[5],
                                                   attn.window_bias(a[6], W, 128), W))
                r[name]["fwd_ms"] = _time(fwd, *args) * 1e3
            except Exception as e:  # noqa: BLE001
                r[name] = {"error": repr(e)[:500]}
        res[f"attention_{label}"] = r
        print(json.dumps({label: r}), flush=True)

    if "head" not in parts:
        return res
    # output head: plain (materialised logits) vs chunked cross-entropy, fwd+bwd
    n, d, V, vocab = (16384, 1024, 50304, 50257) if not tiny else (256, 64, 1024, 1000)
    key = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(key[0], (4, n // 4, d), jnp.bfloat16)
    E = jax.random.normal(key[1], (V, d), jnp.float32)
    tg = jax.random.randint(key[2], (4, n // 4), 0, vocab)
    mk = jnp.ones((4, n // 4), jnp.float32)

    def plain(x, E):
        logits = jnp.einsum("btd,vd->btv", x, E.astype(x.dtype), preferred_element_type=jnp.float32) / np.sqrt(d)
        logits = jnp.where(jnp.arange(V) < vocab, logits, -1e9)
        return cross_entropy(logits, tg, mk)

    head = {}
    g_plain = None
    for name, fn in [("plain", plain)] + [(f"chunked_{c}", (lambda c: lambda x, E: chunked_cross_entropy(
            x, E, tg, mk, vocab_size=vocab, chunk=c))(c)) for c in ((1024, 2048, 4096) if not tiny else (64,))]:
        try:
            f = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
            comp = f.lower(x, E).compile()
            ma = comp.memory_analysis()
            val, g = f(x, E)
            if g_plain is None:
                g_plain = (val, g)
            head[name] = {"fwd_bwd_ms": _time(f, x, E) * 1e3, "xla_temp_GiB": ma.temp_size_in_bytes / 2**30,
                          "value_relerr": abs(float(val) - float(g_plain[0])) / abs(float(g_plain[0])),
                          "dx_relerr": rel(g[0], g_plain[1][0].astype(jnp.float32)),
                          "dE_relerr": rel(g[1], g_plain[1][1].astype(jnp.float32))}
        except Exception as e:  # noqa: BLE001
            head[name] = {"error": repr(e)[:500]}
    res["loss_head_B4_L4096"] = head
    print(json.dumps({"loss_head": head}), flush=True)
    return res


def _scatter_bench(tiny: bool) -> dict:
    """Gradients through gathers: the T5 table -> (H, W, 2W) window bias (per layer) and the token
    embedding lookup, as the model computes them, against gather-free formulations."""
    import jax
    import jax.numpy as jnp

    from bst_dist.models import attention as attn

    H, W, V, d, n = (8, 512, 50304, 1024, 16384) if not tiny else (2, 16, 1000, 64, 256)
    key = jax.random.split(jax.random.PRNGKey(3), 4)
    table = jax.random.normal(key[0], (H, 32), jnp.float32)
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        ct = jax.random.normal(key[1], (H, W, 2 * W), dt)
        buckets = attn.t5_bucket(attn.window_distances(W), 32, 128)
        onehot = (buckets[None] == jnp.arange(32)[:, None, None]).astype(dt)  # (32, W, 2W)
        gather = jax.jit(jax.grad(lambda t: jnp.sum(attn.window_bias(t, W, 128).astype(dt) * ct)))
        dot = jax.jit(jax.grad(lambda t: jnp.sum(jnp.einsum("hb,bqk->hqk", t.astype(dt), onehot,
                                                            preferred_element_type=jnp.float32) * ct)))
        g0, g1 = gather(table), dot(table)
        toep = jax.jit(jax.grad(lambda t: jnp.sum(attn.window_bias_toeplitz(t, W, 128).astype(dt) * ct)))
        g2 = toep(table)
        out[f"t5_bias_grad_{jnp.dtype(dt).name}"] = {
            "gather_ms": _time(gather, table) * 1e3, "onehot_dot_ms": _time(dot, table) * 1e3,
            "toeplitz_ms": _time(toep, table) * 1e3,
            "relerr_onehot": float(jnp.linalg.norm(g1 - g0) / jnp.linalg.norm(g0)),
            "relerr_toeplitz": float(jnp.linalg.norm(g2 - g0) / jnp.linalg.norm(g0))}
    E = jax.random.normal(key[2], (V, d), jnp.float32)
    tok = jax.random.randint(key[3], (n,), 0, V)
    ctx = jax.random.normal(key[1], (n, d), jnp.bfloat16)
    take = jax.jit(jax.grad(lambda E: jnp.sum(jnp.take(E, tok, axis=0).astype(jnp.bfloat16) * ctx)))
    out["embedding_grad"] = {"take_ms": _time(take, E) * 1e3}
    return out


# --------------------------------------------------------------------------------------------
# Driver


def _child(args_list: list[str], timeout: float, env=None) -> tuple[dict | None, str]:
    try:
        p = subprocess.run([sys.executable, *args_list], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env=env)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        return None, f"timeout after {timeout:.0f}s; " + ((e.stderr or b"").decode()[-800:] if isinstance(e.stderr, bytes) else str(e.stderr)[-800:])
    for line in out.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:]), err[-2000:]
    return None, f"rc={rc}; stdout tail: {out[-500:]}; stderr tail: {err[-2500:]}"


def _anchor(args_list: list[str], timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # keep their files out of $OUT
    try:
        p = subprocess.run([sys.executable, *args_list], capture_output=True, text=True, timeout=timeout,
                           cwd=os.path.join(ROOT, ".anchors"), env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    out = p.stdout
    try:
        return json.loads(out[out.index("{"):])
    except Exception:  # noqa: BLE001
        return {"error": f"rc={p.returncode}; {out[-300:]} {p.stderr[-1500:]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default="xla,cudnn")
    ap.add_argument("--extra", default="Slide:12L/cudnn/chunked,BST:SH:S4/cudnn/chunked",
                    help="extra case/impl/loss triples (comma-separated), run after the matrix")
    ap.add_argument("--profile", default="Slide:12L/xla,Slide:12L/cudnn,BST:SH:S4/cudnn,BST:MF:unstruct/cudnn")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds: start no case after this")
    ap.add_argument("--case-timeout", type=float, default=300.0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--anchors", default="gpu,window", help="peers to run first: gpu (matmul peak), window (plain-JAX LM)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check", default="attention,head,scatter", help="device checks: attention,head,scatter")
    ap.add_argument("--check-parts", default="attention,head,scatter", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one:
        spec = json.loads(a.one)
        res = run_case(spec)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if a.check_only:
        print("RESULT " + json.dumps(run_check(a.tiny, a.check_parts)), flush=True)
        return

    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    report: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": []}

    def elapsed():
        return time.perf_counter() - t_start

    def save():
        dev = report.get("check", {}).get("device", {}).get("device_kind", "cpu" if a.tiny else "gpu")
        slug = dev.lower().replace("nvidia ", "").split()[0] if dev else "device"
        report["elapsed_s"] = elapsed()
        with open(os.path.join(a.out, f"step_bench_{slug}.json"), "w") as f:
            json.dump(report, f, indent=1)

    if not a.no_check:
        r, err = _child([__file__, "--check-only", "--check-parts", a.check] + (["--tiny"] if a.tiny else []),
                        timeout=240)
        report["check"] = r if r is not None else {"error": err}
        print(f"[{elapsed():.0f}s] check done", flush=True)
        save()
    anchors = set(a.anchors.split(","))
    if "gpu" in anchors:
        report["anchor_gpu"] = _anchor(["anchor_gpu.py", "jax"], timeout=180)
        print(f"[{elapsed():.0f}s] anchor_gpu: {json.dumps(report['anchor_gpu'])}", flush=True)
        save()
    if "window" in anchors:
        report["anchor_jax_lm_window"] = _anchor(["anchor_jax_lm.py", "window"], timeout=240)
        print(f"[{elapsed():.0f}s] anchor_jax_lm window: {json.dumps(report['anchor_jax_lm_window'])}", flush=True)
        save()
    flash_ok = "error" not in ((report.get("check") or {}).get("attention_L4096_W512", {}).get("flash_bf16") or {})

    jobs = [(c, i, "plain") for c in a.cases.split(",") if c for i in a.impls.split(",") if i]
    jobs += [tuple(x.split("/")) for x in a.extra.split(",") if x]
    profile = set(a.profile.split(","))
    longest = 0.0
    for case, impl, loss in jobs:
        if elapsed() + max(longest, 30.0) > a.deadline:
            report.setdefault("not_run", []).append(f"{case}/{impl}/{loss}")
            continue
        if impl == "cudnn" and not flash_ok:
            report.setdefault("not_run", []).append(f"{case}/{impl}/{loss} (the cuDNN check failed)")
            continue
        t0 = elapsed()
        spec = {"case": case, "impl": impl, "loss": loss, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
                "tiny": a.tiny, "profile": f"{case}/{impl}" in profile and loss == "plain"}
        r, err = _child([__file__, "--one", json.dumps(spec)], timeout=a.case_timeout)
        if r is None and ("RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower()):
            spec["remat"] = "full"
            print(f"[{elapsed():.0f}s] {case}/{impl}/{loss}: out of memory, retrying with remat=full", flush=True)
            r, err = _child([__file__, "--one", json.dumps(spec)], timeout=a.case_timeout)
        if r is None:
            r = {"case": case, "impl": impl, "loss": loss, "error": err[-3000:]}
        r["wall_s"] = elapsed() - t0
        longest = max(longest, r["wall_s"])
        report["cases"].append(r)
        brief = {k: r.get(k) for k in ("tokens_per_s", "step_s", "compile_s", "peak_GiB", "train_loss", "error")}
        print(f"[{elapsed():.0f}s] {case}/{impl}/{loss}: {json.dumps(brief)[:600]}", flush=True)
        save()

    _finish(report)
    save()
    _print_table(report)


def _finish(report: dict) -> None:
    peak = (report.get("anchor_gpu") or {}).get("jax_bf16_matmul_tflops")
    peer = report.get("anchor_jax_lm_window") or {}
    for r in report["cases"]:
        if "tokens_per_s" not in r:
            continue
        if peak:
            r["mfu"] = r["model_tflops"] / peak
        if peer.get("tokens_per_s"):
            r["tokens_ratio_vs_window_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["tflops_ratio_vs_window_peer"] = r["model_tflops"] / peer["model_tflops"]


def _print_table(report: dict) -> None:
    peak = (report.get("anchor_gpu") or {}).get("jax_bf16_matmul_tflops")
    peer = report.get("anchor_jax_lm_window") or {}
    print(f"\nbf16 matmul peak {peak} TFLOP/s; window peer {peer.get('tokens_per_s')} tokens/s, "
          f"{peer.get('model_tflops')} TFLOP/s")
    print("| config | attn | loss | params (M) | batch | step ms | tokens/s | TFLOP/s | MFU | peak GiB | vs peer tok/s | compile s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in report["cases"]:
        if "tokens_per_s" not in r:
            print(f"| {r['case']} | {r['impl']} | {r.get('loss')} | error: {r.get('error', '')[-200:]!r} |")
            continue
        print(f"| {r['case']} | {r['impl']} | {r['loss']} | {r['params'] / 1e6:.1f} | {r['batch']}x{r['seq_len']} | "
              f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.0f} | "
              f"{r.get('mfu', float('nan')):.1%} | {r['peak_GiB']:.1f} | "
              f"{r.get('tokens_ratio_vs_window_peer', float('nan')):.2f} | {r['compile_s']:.0f} |")
    for r in report["cases"]:
        if r.get("profile"):
            print(f"profile {r['case']}/{r['impl']}: {json.dumps(r['profile'].get('categories_ms_per_step'))}")
    if report.get("not_run"):
        print("not run (deadline):", ",".join(report["not_run"]))


if __name__ == "__main__":
    main()
