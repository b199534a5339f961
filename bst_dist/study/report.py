"""A study's report from its results/<run>.json files (whatever runs have finished): report.md
(one table of the runs, the parameter check, the length and position tables) and PNG plots
(learning curves, perplexity against evaluation length, perplexity per position bucket)."""

from __future__ import annotations

import json
import os

from bst_dist.study.spec import Study


def read_results(study: Study) -> list[dict]:
    out = []
    for run in study.runs:
        path = os.path.join(study.out, "results", f"{run.name}.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _gain(fresh, carried) -> str:
    """How much lower carried perplexity is than fresh, in percent of fresh."""
    return "-" if not fresh or carried is None else f"{1 - carried / fresh:+.1%}"


def tables(study: Study, results: list[dict]) -> str:
    lines = [f"# Study {study.name}", "", *([study.description, ""] if study.description else []),
             f"Token budget per run: {study.tokens:,}. Evaluation split: {study.eval.split}.", "",
             "| run | model | non-emb params | tokens | steps | train (s) | eval (s) | tok/s | final train loss | "
             "ppl fresh @L | ppl carried @L | carried gain | device | digest |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        e, t = r["eval"], r["train"]
        lines.append(f"| {r['run']} | {r['label']} | {r['params']['non_embedding']:,} | {r['tokens']:,} | "
                     f"{r['steps']} | {t['wall_s']:.0f} | {_f(r.get('eval_wall_s'), '{:.0f}')} | {_f(t['tokens_per_sec_after_first'], '{:,.0f}')} | "
                     f"{_f(t['final_loss_last10pct'])} | {_f(e['fresh']['ppl'], '{:.2f}')} | "
                     f"{_f(e['carried']['ppl'], '{:.2f}')} | {_gain(e['fresh']['ppl'], e['carried']['ppl'])} | "
                     f"{r['device']['kind']} x{r['device']['count']} | `{r['config_digest']}` |")
    if results:
        ne = [r["params"]["non_embedding"] for r in results]
        lines += ["", f"Non-embedding parameters of these runs: {min(ne):,} to {max(ne):,} "
                      f"(spread {max(ne) / min(ne) - 1:.1%}; tolerance "
                      f"{'none' if study.param_tolerance is None else f'{study.param_tolerance:.0%}'})."]
        lengths = sorted({a["T"] for r in results for a in r["eval"]["at_length"]})
        scored = sorted({a["tokens"] for r in results for a in r["eval"]["at_length"]})
        lines += [] if not lengths else ["", "## Perplexity at evaluation length T (fresh cache, one pass)", "",
                  f"The same text at every T ({', '.join(f'{n:,}' for n in scored)} tokens), cut into T-long rows "
                  "each scored from a fresh cache: a token's context is at most T.", "",
                  "| run | " + " | ".join(f"T={T}" for T in lengths) + " |",
                  "| --- |" + " ---: |" * len(lengths)]
        for r in results if lengths else []:
            by_t = {a["T"]: a["ppl"] for a in r["eval"]["at_length"]}
            lines.append(f"| {r['run']} | " + " | ".join(_f(by_t.get(T), "{:.2f}") for T in lengths) + " |")
        names = [b["bucket"] for b in results[0]["eval"]["fresh"]["seq_buckets"]]
        for mode in ("fresh", "carried"):
            lines += ["", f"## Perplexity per position in the L-long sequence ({mode} cache)", "",
                      "| run | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
            for r in results:
                b = {x["bucket"]: x["ppl"] for x in r["eval"][mode]["seq_buckets"]}
                lines.append(f"| {r['run']} | " + " | ".join(_f(b.get(n), "{:.2f}") for n in names) + " |")
    return "\n".join(lines) + "\n"


def _plot(path, title, xlabel, ylabel, curves, logx=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, xs, ys, style in curves:
        ax.plot(xs, ys, label=label, **style)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(study: Study, results: list[dict]) -> list[str]:
    from bst_dist.train.metrics import read_jsonl

    d = os.path.join(study.out, "plots")
    os.makedirs(d, exist_ok=True)
    curves = []
    for r in results:
        rows = [x for x in read_jsonl(os.path.join(study.out, "runs", r["run"], "metrics.jsonl")) if "loss" in x]
        if rows:
            k = max(1, len(rows) // 50)  # mean over windows of k steps: readable, no lag
            xs = [rows[i + k - 1]["tokens_seen"] for i in range(0, len(rows) - k + 1, k)]
            ys = [sum(x["loss"] for x in rows[i:i + k]) / k for i in range(0, len(rows) - k + 1, k)]
            curves.append((r["run"], xs, ys, {}))
    out = [_plot(os.path.join(d, "learning_curves.png"), f"{study.name}: training loss", "tokens",
                 "loss (nats/token)", curves)]
    curves = [(r["run"], [a["T"] for a in r["eval"]["at_length"]], [a["ppl"] for a in r["eval"]["at_length"]],
               {"marker": "o"}) for r in results]
    out.append(_plot(os.path.join(d, "length_curves.png"), f"{study.name}: perplexity at length T", "T (tokens)",
                     "perplexity", curves, logx=True))
    curves = []
    for r in results:
        for mode, style in (("fresh", {"linestyle": "--"}), ("carried", {})):
            b = r["eval"][mode]["seq_buckets"]
            curves.append((f"{r['run']} ({mode})", [int(x["bucket"].split("-")[0]) for x in b],
                           [x["ppl"] for x in b], {"marker": ".", **style}))
    out.append(_plot(os.path.join(d, "position_buckets.png"), f"{study.name}: perplexity by position in the sequence",
                     "bucket start (token position in the L-long sequence)", "perplexity", curves))
    return out


def write_report(study: Study) -> str:
    results = read_results(study)
    path = os.path.join(study.out, "report.md")
    os.makedirs(study.out, exist_ok=True)
    text = tables(study, results)
    if results:
        names = [os.path.basename(p) for p in plots(study, results)]
        text += "\n" + "\n".join(f"![{n}](plots/{n})" for n in names) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path
