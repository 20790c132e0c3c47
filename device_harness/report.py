"""Renderings of bench results: a markdown table, a CSV file and a PNG figure (matplotlib).

The figure has three panels: decode tok/s and TTFT per artifact@device (bars at the median,
whiskers from min to max), and peak RSS vs decode tok/s (one point per result; up and left is
better). Emulated devices are hatched / hollow and say "(emulated)" in their label.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .schema import METRICS, UNITS, result_key

COLUMNS = [("load_ms", "load ms"), ("ttft_ms", "TTFT ms"), ("prefill_tok_s", "prefill tok/s"),
           ("decode_tok_s", "decode tok/s"), ("peak_rss_mb", "peak RSS MiB"), ("artifact_mb", "size MB")]


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _label(res: dict) -> str:
    return result_key(res) + (" (emulated)" if res["device"].get("emulated") else "")


def markdown_table(results: list[dict]) -> str:
    head = ["artifact", "format", "device", *[c for _, c in COLUMNS], "greedy = host"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(COLUMNS) + [":---:"]) + "|"]
    for r in results:
        a, d, m = r["artifact"], r["device"], r["metrics"]
        dev = d.get("kind", "?") + (f" ({d.get('arch')}, emulated)" if d.get("emulated") else f" ({d.get('arch')})")
        cells = []
        for key, _ in COLUMNS:
            s = m.get(key) or {}
            cell = _fmt(s.get("median"))
            if key != "artifact_mb" and s.get("min") is not None and len(s.get("samples") or []) > 1:
                cell += f" ({_fmt(s['min'])}-{_fmt(s['max'])})"
            cells.append(cell)
        match = (r.get("greedy") or {}).get("matches_host")
        fmt = str(a.get("format")) + (f" ({r['config']['engine']})" if r["config"].get("engine") else "")
        lines.append("| " + " | ".join([a.get("name", "?"), fmt, dev, *cells,
                                         {True: "yes", False: "NO", None: "-"}[match]]) + " |")
    cfgs = {(r["config"].get("prompt_len"), r["config"].get("gen_len"), r["config"].get("threads")) for r in results}
    note = "; ".join(f"prompt {p}, gen {g}, threads {t or 'default'}" for p, g, t in sorted(cfgs, key=str))
    lines.append("")
    lines.append(f"Median (min-max) over measured runs; {note}.")
    return "\n".join(lines) + "\n"


def csv_text(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    stats = ("median", "min", "max")
    w.writerow(["artifact", "format", "recipe", "device_kind", "device_name", "arch", "emulated", "prompt_len",
                "gen_len", "threads", "runs", *[f"{m}_{s}" for m in METRICS for s in stats], "matches_host"])
    for r in results:
        a, d, c, m = r["artifact"], r["device"], r["config"], r["metrics"]
        w.writerow([a.get("name"), a.get("format"), a.get("recipe"), d.get("kind"), d.get("name"), d.get("arch"),
                    d.get("emulated"), c.get("prompt_len"), c.get("gen_len"), c.get("threads"), c.get("runs"),
                    *[m[k].get(s) for k in METRICS for s in stats], (r.get("greedy") or {}).get("matches_host")])
    return buf.getvalue()


def plot(results: list[dict], out: str | Path) -> Path:
    """Write the three-panel PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(r) for r in results]
    colors = plt.get_cmap("tab10").colors
    fmt_color = {}
    for r in results:
        fmt_color.setdefault(r["artifact"].get("format"), colors[len(fmt_color) % len(colors)])
    n = len(results)
    fig, axes = plt.subplots(1, 3, figsize=(max(13, 4 + 1.6 * n), 4.8), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})

    def bars(ax, key, title):
        med = [r["metrics"][key]["median"] or 0 for r in results]
        lo = [max(0.0, (r["metrics"][key]["median"] or 0) - (r["metrics"][key]["min"] or 0)) for r in results]
        hi = [max(0.0, (r["metrics"][key]["max"] or 0) - (r["metrics"][key]["median"] or 0)) for r in results]
        y = list(range(n))
        for i, r in enumerate(results):
            ax.barh(i, med[i], xerr=[[lo[i]], [hi[i]]], color=fmt_color[r["artifact"].get("format")],
                    hatch="//" if r["device"].get("emulated") else None, edgecolor="black", linewidth=0.6, capsize=3)
            ax.text(med[i] + hi[i], i, f"  {_fmt(med[i])}", va="center", ha="left", fontsize=8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(UNITS[key])
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, max([m + h for m, h in zip(med, hi)] or [1]) * 1.25)

    bars(axes[0], "decode_tok_s", "decode tokens/s (higher is better)")
    bars(axes[1], "ttft_ms", "time to first token, ms (lower is better)")
    axes[1].set_yticks(range(n), [""] * n)
    ax = axes[2]
    pts = [(r["metrics"]["decode_tok_s"]["median"], r["metrics"]["peak_rss_mb"]["median"], r, lab)
           for r, lab in zip(results, labels)]
    pts = sorted([p for p in pts if p[0] is not None and p[1] is not None], key=lambda p: (p[1], p[0]))
    for j, (x, y, r, lab) in enumerate(pts):
        c = fmt_color[r["artifact"].get("format")]
        ax.scatter([x], [y], s=60, facecolors="none" if r["device"].get("emulated") else c, edgecolors=c, linewidths=1.5)
        # alternate label offsets so neighbours with similar memory do not print over each other
        ax.annotate(lab.replace(" (emulated)", "\n(emulated)"), (x, y), textcoords="offset points",
                    xytext=(6, 8 if j % 2 == 0 else -16), fontsize=7)
    ax.set_xlabel("decode tok/s (median)")
    ax.set_ylabel("peak RSS, MiB (median)")
    ax.set_title("memory vs speed (right and low is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in fmt_color.values()]
    names = [str(k) for k in fmt_color]
    if any(r["device"].get("emulated") for r in results):
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
        names.append("emulated device (hatched bar / hollow point)")
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def render(results: list[dict], *, markdown: str | Path | None = None, csv_path: str | Path | None = None,
           plot_path: str | Path | None = None) -> str:
    """Write whatever was asked for; return the markdown table (for printing)."""
    md = markdown_table(results)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(md, encoding="utf-8")
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        Path(csv_path).write_text(csv_text(results), encoding="utf-8")
    if plot_path:
        plot(results, plot_path)
    return md
