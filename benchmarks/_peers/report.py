"""Summary, targets, markdown table and PNG chart of a peers run (renderings of the results JSON)."""

from __future__ import annotations

from pathlib import Path

from .roofline import roofline

TARGET_EXPORT_S = 120.0
TARGET_EXPORT_RSS_X = 2.0


def _m(rec: dict, key: str, stat: str = "median"):
    return ((rec.get("metrics") or {}).get(key) or {}).get(stat)


def _row(rec: dict, bw: float) -> dict:
    p = rec["peer"]
    w = p.get("weights") or {}
    dec = _m(rec, "decode_tok_s")
    rl = roofline(bw, w["bytes_per_token"], dec) if w.get("bytes_per_token") else {}
    return {
        "variant": p["variant"], "toolchain": p["toolchain"], "quant": p["quant"], "format": p["format"],
        "threads": p["threads"], "artifact_mb": _m(rec, "artifact_mb"),
        "load_ms": _m(rec, "load_ms"), "ttft_ms": _m(rec, "ttft_ms"), "ttft_ms_min": _m(rec, "ttft_ms", "min"),
        "ttft_ms_max": _m(rec, "ttft_ms", "max"), "prefill_tok_s": _m(rec, "prefill_tok_s"),
        "decode_tok_s": dec, "decode_tok_s_min": _m(rec, "decode_tok_s", "min"),
        "decode_tok_s_max": _m(rec, "decode_tok_s", "max"), "peak_rss_mb": _m(rec, "peak_rss_mb"),
        "weight_mb_per_token": rl.get("weight_mb_per_token"), "roofline_tok_s": rl.get("roofline_tok_s"),
        "roofline_fraction": rl.get("achieved_fraction"), "n_runs": len((rec["metrics"]["decode_tok_s"] or {}).get("samples") or []),
    }


def summarize(records: list[dict], bandwidth_gb_s: float, *, export_cost: dict | None, fp32_weight_bytes: int) -> dict:
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        by.setdefault(r["peer"]["variant"], {})[r["peer"]["threads"]] = _row(r, bandwidth_gb_s)
    best, at2 = {}, {}
    for v, per in by.items():
        ok = {t: row for t, row in per.items() if row["decode_tok_s"]}
        if not ok:
            continue
        bt = max(ok, key=lambda t: ok[t]["decode_tok_s"])
        best[v] = {**ok[bt], "best_threads": bt, "threads_tried": sorted(per),
                   "decode_by_threads": {str(t): ok[t]["decode_tok_s"] for t in sorted(ok)}}
        if 2 in ok:
            at2[v] = ok[2]
    for table in (best, at2):
        e = table.get("eager-fp32")
        for row in table.values():
            row["x_eager"] = (row["decode_tok_s"] / e["decode_tok_s"]) if e and e["decode_tok_s"] else None
    exports = {r["peer"]["variant"]: r["peer"].get("export") for r in records}
    return {"bandwidth_gb_s": bandwidth_gb_s, "best_threads": best, "threads_2": at2,
            "by_threads": {v: {str(t): row for t, row in sorted(per.items())} for v, per in by.items()},
            "targets": targets(best, at2, export_cost, fp32_weight_bytes),
            "executorch_targets": executorch_targets(by, exports, fp32_weight_bytes)}


LLAMA_Q4 = ("llamacpp-Q4_0", "llamacpp-Q4_0+repack")
ET_PEERS = ("et-llm-8da4w", "optimum-et-8da4w")


def executorch_targets(by: dict, exports: dict, fp32_weight_bytes: int) -> list[dict]:
    """Issue 19: at every thread count measured, our best .pte against ExecuTorch's own export,
    optimum-executorch and llama.cpp Q4_0 (plain and repacked); thread scaling; export time."""
    out = []
    ours = {v: per for v, per in by.items() if per and next(iter(per.values()))["toolchain"] == "cdcda"
            and next(iter(per.values()))["format"] == "executorch"}
    threads = sorted({t for per in by.values() for t in per})
    for t in threads:
        cands = [per[t] for per in ours.values() if t in per and per[t]["decode_tok_s"]]
        et = max(cands, key=lambda r: r["decode_tok_s"]) if cands else None
        sfx = f" ({t} thread{'s' if t > 1 else ''})"
        name = et and f"{et['variant']} {_f(et['decode_tok_s'])} tok/s"
        for pv, need, rel in [(p, 1.0, ">") for p in ET_PEERS] + [(q, 1.25, ">= 1.25x") for q in LLAMA_Q4]:
            p = by.get(pv, {}).get(t)
            r = (et["decode_tok_s"] / p["decode_tok_s"]) if et and p and p["decode_tok_s"] else None
            out.append(_target(f"best .pte decode {rel} {pv}{sfx}", r, need,
                               detail=f"{name} vs {_f(p['decode_tok_s'])} tok/s" if p else "peer not measured"))
        qs = [by[q][t] for q in LLAMA_Q4 if t in by.get(q, {}) and by[q][t]["ttft_ms"]]
        q = min(qs, key=lambda r: r["ttft_ms"]) if qs else None
        out.append(_target(f"best .pte TTFT <= 0.8x llama.cpp Q4_0's best{sfx}",
                           (et["ttft_ms"] / q["ttft_ms"]) if et and q and et["ttft_ms"] else None, 0.8, higher=False,
                           detail=f"{et and et['variant']} {et and _f(et['ttft_ms'])} ms vs {q and q['variant']} "
                                  f"{q and _f(q['ttft_ms'])} ms"))
    for v, per in ours.items():
        if 1 in per and 2 in per and per[1]["decode_tok_s"] and per[2]["decode_tok_s"]:
            out.append(_target(f"{v}: 2 threads >= 1.3x 1 thread", per[2]["decode_tok_s"] / per[1]["decode_tok_s"], 1.3,
                               detail=f"{_f(per[2]['decode_tok_s'])} vs {_f(per[1]['decode_tok_s'])} tok/s"))
    ref = (exports.get("et-llm-8da4w") or {}).get("seconds")
    limit_rss = TARGET_EXPORT_RSS_X * fp32_weight_bytes / (1 << 20)
    for v in ours:
        x = exports.get(v) or {}
        secs = x.get("seconds")
        note = " (cached: the export's own timing from its manifest)" if x.get("cached") else ""
        out.append(_target(f"{v}: export <= 0.5x ExecuTorch export_llm's time", (secs / ref) if secs and ref else None,
                           0.5, higher=False, detail=f"{_f(secs)} s vs {_f(ref)} s{note}"))
        out.append(_target(f"{v}: export <= {TARGET_EXPORT_S:.0f} s", secs, TARGET_EXPORT_S, higher=False,
                           detail=f"{_f(secs)} s{note}"))
        if x.get("peak_rss_mb"):
            out.append(_target(f"{v}: export peak RSS <= 2x fp32 weights ({limit_rss:.0f} MiB)", x["peak_rss_mb"],
                               limit_rss, higher=False, detail=f"{_f(x['peak_rss_mb'])} MiB"))
    return out


def _target(name: str, measured, required, *, higher: bool = True, detail: str = "") -> dict:
    if measured is None or required is None:
        return {"target": name, "measured": measured, "required": required, "met": None,
                "missed_by": None, "detail": detail or "not measured"}
    met = measured >= required if higher else measured <= required
    if higher:
        miss = None if met else (required - measured) / required
    else:
        miss = None if met else (measured - required) / required
    return {"target": name, "measured": measured, "required": required, "met": met, "missed_by": miss,
            "detail": detail}


def _best_of(table: dict, pred) -> dict | None:
    rows = [r for r in table.values() if pred(r) and r.get("decode_tok_s")]
    return max(rows, key=lambda r: r["decode_tok_s"]) if rows else None


def targets(best: dict, at2: dict, export_cost: dict | None, fp32_weight_bytes: int) -> list[dict]:
    out = []
    for label, table in (("best threads", best), ("2 threads", at2)):
        et = _best_of(table, lambda r: r["toolchain"] == "cdcda" and r["format"] == "executorch")
        ox = _best_of(table, lambda r: r["toolchain"] == "cdcda" and r["format"] == "onnx")
        ours_any = _best_of(table, lambda r: r["toolchain"] == "cdcda")
        peer = _best_of(table, lambda r: r["toolchain"] not in ("cdcda", "eager PyTorch"))
        q4 = table.get("llamacpp-Q4_0")
        eager = table.get("eager-fp32")
        og4 = table.get("ortgenai-int4")

        def ratio(a, b, key="decode_tok_s"):
            return (a[key] / b[key]) if (a and b and a.get(key) and b.get(key)) else None

        sfx = f" ({label})"
        out.append(_target(f"best ExecuTorch recipe decode >= 1.25x llama.cpp Q4_0{sfx}", ratio(et, q4), 1.25,
                           detail=f"{et and et['variant']} {et and _f(et['decode_tok_s'])} tok/s vs "
                                  f"{q4 and _f(q4['decode_tok_s'])} tok/s"))
        out.append(_target(f"best ExecuTorch recipe decode >= 5x eager fp32{sfx}", ratio(et, eager), 5.0,
                           detail=f"{et and et['variant']} vs eager {eager and _f(eager['decode_tok_s'])} tok/s"))
        out.append(_target(f"best ExecuTorch recipe TTFT <= 0.8x llama.cpp Q4_0{sfx}",
                           ratio(et, q4, "ttft_ms"), 0.8, higher=False,
                           detail=f"{et and _f(et['ttft_ms'])} ms vs {q4 and _f(q4['ttft_ms'])} ms"))
        out.append(_target(f"best ONNX recipe decode >= 1.0x ORT GenAI int4{sfx}", ratio(ox, og4), 1.0,
                           detail=f"{ox and ox['variant']} {ox and _f(ox['decode_tok_s'])} tok/s vs "
                                  f"{og4 and _f(og4['decode_tok_s'])} tok/s"))
        out.append(_target(f"best artifact (any format) decode >= 1.25x best peer{sfx}", ratio(ours_any, peer), 1.25,
                           detail=f"{ours_any and ours_any['variant']} vs {peer and peer['variant']} "
                                  f"{peer and _f(peer['decode_tok_s'])} tok/s"))
        if label == "best threads":
            q4ours = _best_of(best, lambda r: r["toolchain"] == "cdcda" and "4" in str(r["quant"]).split(",")[0])
            out.append(_target("best 4-bit artifact reaches >= 50% of its decode roofline",
                               q4ours and q4ours.get("roofline_fraction"), 0.5,
                               detail=f"{q4ours and q4ours['variant']}: {q4ours and _f(q4ours['decode_tok_s'])} of "
                                      f"{q4ours and _f(q4ours.get('roofline_tok_s'))} tok/s roofline "
                                      f"({q4ours and _f(q4ours.get('weight_mb_per_token'))} MB/token)"))
    limit_rss = TARGET_EXPORT_RSS_X * fp32_weight_bytes / (1 << 20)
    rows = (export_cost or {}).get("recipes") or []
    if not rows:
        out.append(_target("each recipe exports in <= 120 s with peak RSS <= 2x fp32 weights", None, None,
                           detail="run benchmarks/export_cost.py"))
    for r in rows:
        if not r.get("ok"):
            out.append({"target": f"export {r['recipe']} <= 120 s, RSS <= 2x fp32 weights", "met": False,
                        "measured": None, "required": None, "missed_by": None, "detail": f"export failed: {r.get('error')}"})
            continue
        out.append(_target(f"export {r['recipe']} <= 120 s", r["seconds"], TARGET_EXPORT_S, higher=False,
                           detail=f"{_f(r['seconds'])} s"))
        out.append(_target(f"export {r['recipe']} peak RSS <= 2x fp32 weights ({limit_rss:.0f} MiB)", r["peak_rss_mb"],
                           limit_rss, higher=False, detail=f"{_f(r['peak_rss_mb'])} MiB"))
    return out


# ------------------------------------------------------------------------------------------ rendering


def _f(x, nd: int | None = None) -> str:
    if x is None:
        return "-"
    if nd is not None:
        return f"{x:.{nd}f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _order(rows: list[dict]) -> list[dict]:
    rank = {"eager PyTorch": 0, "llama.cpp": 1, "ORT GenAI builder": 2, "optimum-executorch": 3,
            "ExecuTorch export_llm": 3.5, "cdcda": 4}
    return sorted(rows, key=lambda r: (rank.get(r["toolchain"], 9), r["variant"]))


def table(rows: list[dict], *, show_best: bool) -> list[str]:
    head = ["variant", "toolchain", "quantization", "MB", "threads", "load ms", "TTFT ms", "prefill tok/s",
            "decode tok/s (min-max)", "x eager", "peak RSS MiB", "MB read/token", "roofline tok/s", "of roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in _order(rows):
        thr = str(r["threads"])
        if show_best and len(r.get("threads_tried", [])) > 1:
            others = ", ".join(f"{t}T {_f(v)}" for t, v in r["decode_by_threads"].items() if int(t) != r["threads"])
            thr = f"**{r['threads']}** ({others})" if others else thr
        lines.append("| " + " | ".join([
            r["variant"], r["toolchain"], str(r["quant"]), _f(r["artifact_mb"]), thr, _f(r["load_ms"]),
            _f(r["ttft_ms"]), _f(r["prefill_tok_s"]),
            f"{_f(r['decode_tok_s'])} ({_f(r['decode_tok_s_min'])}-{_f(r['decode_tok_s_max'])})",
            _f(r.get("x_eager")), _f(r["peak_rss_mb"]), _f(r["weight_mb_per_token"]), _f(r["roofline_tok_s"]),
            f"{r['roofline_fraction'] * 100:.0f}%" if r.get("roofline_fraction") else "-"]) + " |")
    return lines


TARGET_HEAD = ["| target | measured | required | met | missed by | detail |", "|---|---:|---:|:---:|---:|---|"]


def _target_rows(ts: list[dict]) -> list[str]:
    rows = []
    for t in ts:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        miss = "-" if t["missed_by"] is None else f"{t['missed_by'] * 100:.0f}%"
        rows.append(f"| {t['target']} | {_f(t['measured'])} | {_f(t['required'])} | {met} | {miss} | {t['detail']} |")
    return rows


def markdown(out: dict) -> str:
    m, s, c = out["machine"], out["summary"], out["config"]
    bw = m["bandwidth"]
    L = [f"# Peer benchmark: {out['arch']} ({out['created_at']})", ""]
    L.append(f"Weights: {out.get('weights') or 'random, the ' + out['arch'] + ' shape'}.")
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m.get('isa') or [])}), "
             f"{_f(m.get('mem_gib'))} GiB, {m['os']} {m['arch']}. Memory bandwidth (1 GiB numpy copy, read+write): "
             + ", ".join(f"{k} {_f(v['gb_s_best'])} GB/s best / {_f(v['gb_s_median'])} median" for k, v in bw.items())
             + f"; roofline uses {_f(s['bandwidth_gb_s'])} GB/s.")
    L.append(f"Load average (1/5/15 min) before measuring: {', '.join(_f(x) for x in m['loadavg_before'])}; after: "
             f"{', '.join(_f(x) for x in m['loadavg_after'])} (2 cores: above 2 means other processes competed). "
             f"Run took {_f(m['wall_s'] / 60)} min.")
    L.append(f"Protocol: prompt {c['prompt_len']} tokens, {c['gen_len']} new tokens (greedy, no EOS stop), batch 1, "
             f"{c['runs']} measured runs after {c['warmup']} warm-up, {c['protocol']}. Threads tried: "
             f"{c['threads_tried']}.")
    L += ["", "## At each runtime's best thread count (bold; decode at the other count in brackets)", ""]
    L += table(list(s["best_threads"].values()), show_best=True)
    if s["threads_2"]:
        L += ["", "## All at 2 threads", ""]
        L += table(list(s["threads_2"].values()), show_best=False)
    L += ["", "## Targets (issue 7)", "", *TARGET_HEAD]
    L += _target_rows(s["targets"])
    et_t = s.get("executorch_targets") or []
    if et_t:
        L += ["", "## ExecuTorch at every thread count (issue 19)", ""]
        rows = [row for v, per in (s.get("by_threads") or {}).items() for row in per.values()
                if row["format"] == "executorch" or v in LLAMA_Q4]
        L += table(rows, show_best=False)
        L += ["", *TARGET_HEAD, *_target_rows(et_t)]
    if out["failures"]:
        L += ["", "## Not measured", ""]
        for f in out["failures"]:
            L.append(f"- **{f['variant']}** ({f['toolchain']}, {f['stage']}): {f['error'][:600]}")
    L += ["", "MB read/token: weight bytes one decode step reads (all linears + LM head; the embedding gather "
          "excluded unless it is the tied LM head), from the artifact itself (GGUF tensor table, ONNX "
          "initializers, safetensors; .pte: file size minus the embedding table). Roofline = bandwidth / that.", ""]
    return "\n".join(L) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _order(list(out["summary"]["best_threads"].values()))
    if not rows:
        return
    colors = {"cdcda": "tab:blue", "llama.cpp": "tab:orange", "ORT GenAI builder": "tab:green",
              "optimum-executorch": "tab:purple", "ExecuTorch export_llm": "tab:brown", "eager PyTorch": "tab:gray"}
    labels = [f"{r['variant']} ({r['threads']}T)" for r in rows]
    y = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * len(rows) + 2.2), sharey=True)
    ax = axes[0]
    dec = [r["decode_tok_s"] or 0 for r in rows]
    err = [[d - (r["decode_tok_s_min"] or d) for d, r in zip(dec, rows)],
           [(r["decode_tok_s_max"] or d) - d for d, r in zip(dec, rows)]]
    ax.barh(list(y), dec, xerr=err, color=[colors.get(r["toolchain"], "k") for r in rows], capsize=3)
    roof = [r.get("roofline_tok_s") for r in rows]
    ax.scatter([x for x in roof if x], [i for i, x in zip(y, roof) if x], marker="|", s=200, color="red",
               label="decode roofline (bandwidth / bytes per token)", zorder=3)
    ax.set_xlabel("decode tok/s (median, whiskers min-max)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax = axes[1]
    ttft = [r["ttft_ms"] or 0 for r in rows]
    ax.barh(list(y), ttft, xerr=[[t - (r["ttft_ms_min"] or t) for t, r in zip(ttft, rows)],
                                 [(r["ttft_ms_max"] or t) - t for t, r in zip(ttft, rows)]],
            color=[colors.get(r["toolchain"], "k") for r in rows], capsize=3)
    ax.set_xlabel(f"TTFT ms ({out['config']['prompt_len']}-token prompt; lower is better)")
    ax.set_xscale("log")
    ax = axes[2]
    ax.barh([i - 0.2 for i in y], [r["peak_rss_mb"] or 0 for r in rows], height=0.4, color="tab:red", label="peak RSS MiB")
    ax.barh([i + 0.2 for i in y], [r["artifact_mb"] or 0 for r in rows], height=0.4, color="tab:olive", label="artifact MB")
    ax.set_xlabel("memory (lower is better)")
    ax.legend(loc="lower right", fontsize=8)
    m = out["machine"]
    w = "real weights" if str(out.get("weights", "")).startswith("real") else "random weights"
    fig.suptitle(f"{out['arch']} ({w}), prompt {out['config']['prompt_len']} + {out['config']['gen_len']} new tokens, "
                 f"batch 1, best thread count per runtime -- {m['cpu']}, {m['cores']} cores, load avg before "
                 f"{m['loadavg_before'][0]:.1f} / after {m['loadavg_after'][0]:.1f}; blue = ours", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
