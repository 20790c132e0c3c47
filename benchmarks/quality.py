#!/usr/bin/env python
"""Quality beside speed: our quantized recipes and the peers' on the real SmolLM2-135M-Instruct.

    python benchmarks/quality.py                          # base as shipped (Q4_1 / Q8_0 GGUF, dequantized)
    python benchmarks/quality.py --adapter ADAPTER_DIR    # a per-user merged model (LoRA moves weights off grid)
    make quality                                          # both, with a LaMP-3 user adapter trained if missing

Every variant gets the same token ids (one list, written to the results) and is run teacher-forced, one
fresh KV cache per sequence, logits of every position; the reference is the eager float32 model (base +
adapter merged). Sequences, by kind:

* ``chat``: the shipped LaMP sample (6 tasks x 4 users): each query with its gold answer, and two profile
  items per user as user turns, through the model's chat template;
* ``prose``: the generic prompts of ``cdcda check`` and fixed prose paragraphs (``benchmarks/data/prose.txt``);
* ``user`` (with ``--adapter``): the user's held-out profile pairs and query, formatted as in training --
  where the adapter changed the model most.

Variants: our recipes through ``cdcda export`` and ``cdcda_export.runtime`` (the shipped artifacts);
llama.cpp Q8_0 / Q4_K_M / Q4_0 (converted with llama.cpp's own converter from the same merged HF
directory, quantized with ``llama_model_quantize``, logits from llama-cpp-python in its own venv);
ONNX Runtime GenAI's model builder int4 (block 32, accuracy levels 0 and 4) through our ONNX runner;
torchao 8da4w (group 32, 4-bit embeddings) in eager PyTorch, the numerics of optimum-executorch's and
ExecuTorch's own 8da4w .pte (XNNPACK computes the same dynamic-int8 x int4 products).

Metrics per kind and over all positions: mean KL(ref || variant), top-1 agreement, perplexity ratio on
the sequences' own next tokens; bytes of the model files. Decode speed is the peers benchmark's
(``benchmarks/peers.py``: speed does not depend on weight values). Outputs
``benchmarks/results/quality_<name>.{json,md,png}`` (bytes vs KL with the Pareto front).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CACHE = BENCH / ".cache" / "quality"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- token ids


def _prose(tok, max_len: int) -> list[list[int]]:
    """Fixed prose paragraphs (benchmarks/data/prose.txt, one per line), so the ids do not drift."""
    lines = (BENCH / "data" / "prose.txt").read_text(encoding="utf-8").splitlines()
    return [tok(ln)["input_ids"][:max_len] for ln in lines if ln.strip() and not ln.startswith("#")]


def eval_sequences(tok, adapter: Path | None, max_len: int = 192) -> list[tuple[str, list[int]]]:
    from cdcda_export.check.prompts import generic_prompts

    sample = ROOT / "cdcda_export" / "assets" / "lamp_sample"
    seqs: list[tuple[str, list[int]]] = []

    def chat(msgs, gen=False):
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(ids if isinstance(ids, list) else ids["input_ids"])[:max_len]

    for task in ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"):
        qs = json.loads((sample / task / "questions.json").read_text())
        golds = {g["id"]: g["output"] for g in json.loads((sample / task / "outputs.json").read_text())["golds"]}
        for u in qs[:4]:
            seqs.append(("chat", chat([{"role": "user", "content": u["input"]},
                                       {"role": "assistant", "content": golds.get(u["id"], "")}])))
            for item in u["profile"][:2]:
                text = " ".join(str(v) for k, v in item.items() if k != "id")[:400]
                seqs.append(("chat", chat([{"role": "user", "content": text}], gen=True)))
    for p in generic_prompts():
        seqs.append(("prose", tok(p.text)["input_ids"][:max_len]))
    seqs += [("prose", ids) for ids in _prose(tok, max_len)]
    if adapter is not None:
        from cdcda_export.check.prompts import user_prompts

        meta = json.loads((adapter / "training.json").read_text())
        task = meta["task"]
        d = sample / task
        prompts, _ = user_prompts({"user_id": meta.get("user_id") or adapter.name, "task": task}, task,
                                  d / "questions.json", d / "outputs.json", adapter, adapter)
        seqs += [("user", tok(p.text + " " + (p.gold or ""))["input_ids"][:max_len]) for p in prompts]
    return [(k, s) for k, s in seqs if len(s) >= 2]


# ------------------------------------------------------------------------------------------- metrics


def compare(seqs, ref, art) -> dict:
    import numpy as np

    out = {}
    for kind in sorted({k for k, _ in seqs}) + ["all"]:
        kl, top, nll_r, nll_a = [], [], [], []
        for (k, s), r, a in zip(seqs, ref, art):
            if kind != "all" and k != kind:
                continue
            r, a = r[:-1].astype(np.float64), a[:-1].astype(np.float64)
            lr = r - r.max(-1, keepdims=True)
            lr -= np.log(np.exp(lr).sum(-1, keepdims=True))
            la = a - a.max(-1, keepdims=True)
            la -= np.log(np.exp(la).sum(-1, keepdims=True))
            kl.append((np.exp(lr) * (lr - la)).sum(-1))
            top.append(r.argmax(-1) == a.argmax(-1))
            t = np.array(s[1:])
            nll_r.append(-lr[np.arange(len(t)), t])
            nll_a.append(-la[np.arange(len(t)), t])
        kl, top = np.concatenate(kl), np.concatenate(top)
        out[kind] = {"mean_kl": float(kl.mean()), "top1_agreement": float(top.mean()),
                     "ppl_ratio": float(math.exp(np.concatenate(nll_a).mean() - np.concatenate(nll_r).mean())),
                     "positions": int(len(kl))}
    return out


def files_bytes(paths) -> int:
    return int(sum(Path(p).stat().st_size for p in paths))


# ------------------------------------------------------------------------------------------- variants


def reference_logits(base: Path, adapter: Path | None, seqs):
    import torch

    from cdcda_export.export.api import load_merged_model

    model = load_merged_model(base, adapter)
    with torch.no_grad():
        return model, [model(torch.tensor([s])).logits[0].float().numpy() for _, s in seqs]


def artifact_logits(art: Path, seqs) -> list:
    """Every position's logits of each sequence through the artifact's runner, a fresh KV cache each
    (ONNX with 2 threads; ExecuTorch keeps its recipe's thread count)."""
    from cdcda_export import runtime

    fmt = json.loads((art / "manifest.json").read_text())["format"]
    r = runtime.load(art, threads=2) if fmt == "onnx" else runtime.load(art)
    logits = []
    for _, s in seqs:
        r.reset()
        logits.append(r.prefill(s))
    return logits


def ours(base, adapter, recipe: str, work: Path, seqs):
    from cdcda_export.export.api import export

    art = export(base, adapter, recipe, work / recipe.replace("/", "-"), progress=False, overwrite=True)
    logits = artifact_logits(art, seqs)
    man = json.loads((art / "manifest.json").read_text())
    model_files = [art / n for n in man["files"] if n.startswith("model")]
    return logits, files_bytes(model_files), man.get("quantization_applied", {})


def prebuilt(art: Path, base: Path, adapter: Path | None, seqs):
    """An artifact exported before (``cdcda export``), measured as is: refused unless its manifest names the
    same base (and adapter) content hash as this run's reference."""
    from cdcda_export.errors import UserError
    from cdcda_export.export.api import sha256_dir

    man = json.loads((art / "manifest.json").read_text())
    want = (sha256_dir(base), sha256_dir(adapter) if adapter is not None else None)
    got = (man["base_model"]["sha256"], (man.get("adapter") or {}).get("sha256"))
    if got != want:
        raise UserError(f"{art}: exported from base/adapter {got}, this run measures {want}", file=str(art),
                        hint="export it from the same --base/--adapter, or leave it out of --artifacts")
    model_files = [art / n for n in man["files"] if n.startswith("model")]
    recipe = man["recipe"]
    name = recipe.get("name") if isinstance(recipe, dict) else str(recipe)
    fmt = man["format"]
    return f"{fmt}/{name}", artifact_logits(art, seqs), files_bytes(model_files), man.get("quantization_applied", {})


def genai_builder(base, adapter, acc: int, work: Path, seqs):
    from cdcda_export.export.api import export

    art = export(base, adapter, "onnx/int4", work / f"ortgenai-int4-acc{acc}", progress=False, overwrite=True,
                 overrides=["onnx.engine=genai-builder", f"onnx.accuracy_level={acc}"])
    return artifact_logits(art, seqs), files_bytes([p for p in art.iterdir() if p.name.startswith("model")])


def merged_hf_dir(model, base: Path, work: Path) -> Path:
    import shutil

    d = work / "merged-hf"
    if not (d / "model.safetensors").is_file():
        model.save_pretrained(d, safe_serialization=True)
        for f in base.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja",
                                                             "special_tokens_map.json"):
                shutil.copy2(f, d / f.name)
    return d


def llamacpp_variants(hf_dir: Path, work: Path, seqs, quants=("Q8_0", "Q4_K_M", "Q4_0")) -> dict:
    import numpy as np

    from _peers import llamacpp

    llamacpp.FTYPES.setdefault("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    logf = work / "llamacpp.log"
    llamacpp.ensure_venv(logf)
    f16 = llamacpp.convert(hf_dir, work / "gguf", logf)
    seq_file = work / "seqs.json"
    seq_file.write_text(json.dumps([s for _, s in seqs]))
    out = {}
    for q in quants:
        g = llamacpp.quantize(f16, q, logf)
        npz = work / f"llamacpp-{q}.npz"
        subprocess.run([str(llamacpp.PY), str(BENCH / "_quality" / "llamacpp_logits_worker.py"), str(g),
                        str(seq_file), str(npz)], check=True)
        d = np.load(npz)
        out[q] = ([d[f"a{i}"] for i in range(len(seqs))], g.stat().st_size, llamacpp.version())
    return out


def torchao_8da4w(model, seqs):
    """ExecuTorch's quantize_model_ 8da4w (group 32) + 4-bit embeddings (group 32) on a copy, run eager."""
    import copy

    import torch
    from executorch.extension.llm.export.quantize import quantize_model_

    m = copy.deepcopy(model)
    if m.config.tie_word_embeddings:   # the head and the table take different schemes: untie like ExecuTorch
        m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    quantize_model_(m, qlinear_config="8da4w", qlinear_group_size=32, qembedding_config="4w",
                    qembedding_group_size=32)
    with torch.no_grad():
        logits = [m(torch.tensor([s])).logits[0].float().numpy() for _, s in seqs]
    n_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    if model.config.tie_word_embeddings:
        n_params += model.model.embed_tokens.weight.numel()   # the head's own int4 copy
    return logits, int(n_params * (4 + 16 / 32) / 8)   # int4 + a bf16 scale per 32 (XNNPACK qb4w)


# ------------------------------------------------------------------------------------------- report


def pareto(rows: list[dict], kind: str = "all") -> list[str]:
    pts = sorted(rows, key=lambda r: (r["bytes"], r["metrics"][kind]["mean_kl"]))
    front, best = [], float("inf")
    for r in pts:
        if r["metrics"][kind]["mean_kl"] < best:
            front.append(r["id"])
            best = r["metrics"][kind]["mean_kl"]
    return front


def peer_targets(rows: list[dict], kind: str = "all") -> list[dict]:
    """For each peer artifact: our best recipe at <= its bytes and the KL ratio (target <= 0.8)."""
    out = []
    for p in [r for r in rows if r["toolchain"] != "cdcda"]:
        mine = [r for r in rows if r["toolchain"] == "cdcda" and r["bytes"] <= p["bytes"]]
        best = min(mine, key=lambda r: r["metrics"][kind]["mean_kl"], default=None)
        pk = p["metrics"][kind]["mean_kl"]
        ratio = best["metrics"][kind]["mean_kl"] / pk if best and pk > 0 else None
        out.append({"peer": p["id"], "peer_mb": round(p["bytes"] / 1e6, 1), "peer_kl": pk,
                    "ours": best["id"] if best else None, "ours_mb": round(best["bytes"] / 1e6, 1) if best else None,
                    "ours_kl": best["metrics"][kind]["mean_kl"] if best else None,
                    "kl_ratio": ratio, "met": ratio is not None and ratio <= 0.8})
    return out


def markdown(result: dict) -> str:
    kinds = [k for k in ("chat", "prose", "user", "all") if k in result["rows"][0]["metrics"]]
    lines = [f"# Quality on real weights: {result['model']}" + (f" + adapter {result['adapter']}" if result["adapter"] else
                                                               " (base as shipped)"), "",
             f"Run {result['started']} - {result['finished']} on {result['machine']}. Teacher-forced, same token ids for "
             f"every variant ({', '.join(f'{k}: {n}' for k, n in result['positions'].items())} positions); reference: "
             "eager float32" + (" base + adapter merged" if result["adapter"] else "") + ". KL = mean KL(ref || variant).",
             "", "| variant | toolchain | quantization | MB | " + " | ".join(
                 f"{k} KL | {k} top-1 | {k} ppl x" for k in kinds) + " |",
             "|---|---|---|---:|" + "---:|---:|---:|" * len(kinds)]
    front = set(result["pareto_front"])
    for r in sorted(result["rows"], key=lambda r: r["bytes"]):
        cells = " | ".join(f"{r['metrics'][k]['mean_kl']:.4f} | {r['metrics'][k]['top1_agreement']:.3f} | "
                           f"{r['metrics'][k]['ppl_ratio']:.3f}" for k in kinds)
        name = f"**{r['id']}**" if r["id"] in front else r["id"]
        lines.append(f"| {name} | {r['toolchain']} | {r['quant']} | {r['bytes'] / 1e6:.1f} | {cells} |")
    lines += ["", "Bold: on the bytes-vs-KL Pareto front (all positions).", "",
              "Target (issue 14): for each peer artifact, one of our recipes at <= its bytes with mean KL <= 0.8x "
              "the peer's (all positions):", "", "| peer | MB | KL | ours at <= its bytes | MB | KL | ratio | met |",
              "|---|---:|---:|---|---:|---:|---:|---|"]
    for t in result["targets"]:
        ratio = f"{t['kl_ratio']:.2f}" if t["kl_ratio"] is not None else "-"
        lines.append(f"| {t['peer']} | {t['peer_mb']} | {t['peer_kl']:.4f} | {t['ours'] or 'none this small'} | "
                     f"{t['ours_mb'] if t['ours_mb'] is not None else '-'} | "
                     f"{t['ours_kl'] if t['ours_kl'] is None else round(t['ours_kl'], 4)} | {ratio} | "
                     f"{'yes' if t['met'] else 'no'} |")
    notes = result.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = result["rows"]
    for r in rows:
        x, y = r["bytes"] / 1e6, max(r["metrics"]["all"]["mean_kl"], 1e-5)
        ours_ = r["toolchain"] == "cdcda"
        ax.scatter([x], [y], marker="o" if ours_ else "s", color="tab:blue" if ours_ else "tab:orange", s=50)
        ax.annotate(r["id"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = [r for r in sorted(rows, key=lambda r: r["bytes"]) if r["id"] in result["pareto_front"]]
    ax.plot([r["bytes"] / 1e6 for r in front], [max(r["metrics"]["all"]["mean_kl"], 1e-5) for r in front],
            "--", color="gray", lw=1, label="Pareto front")
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel("mean KL vs eager fp32 (log)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']}" + (" + per-user adapter (merged)" if result["adapter"] else " as shipped")
                 + ": ours (blue) vs peers (orange)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="HF dir or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", type=Path, default=None, help="a `cdcda train` adapter: measure the merged model")
    ap.add_argument("--ours", default="onnx/int8,onnx/int8-fast,onnx/int4,onnx/int4-compact,executorch/xnnpack-8da8w",
                    help="our recipes (comma list)")
    ap.add_argument("--artifacts", default="", help="comma list of artifact dirs exported before (same base and "
                    "adapter, checked by content hash), measured as our rows without re-exporting")
    ap.add_argument("--peers", default="llamacpp,ortgenai,torchao-8da4w", help="comma list: llamacpp, ortgenai, torchao-8da4w")
    ap.add_argument("--name", default=None, help="results/quality_<name>.*")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from cdcda_export.models import init_model, resolve_base

    # the base lives apart from the work dirs: files written beside it would change its content hash
    base = (resolve_base(args.base) if args.base
            else init_model("smollm2-135m-instruct", CACHE / "base" / "smollm2-135m-instruct"))
    name = args.name or ("smollm2-135m-instruct" + (f"_merged-{args.adapter.name}" if args.adapter else ""))
    work = CACHE / name
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tok = AutoTokenizer.from_pretrained(str(base))
    seqs = eval_sequences(tok, args.adapter)
    positions = {k: sum(len(s) - 1 for kk, s in seqs if kk == k) for k in sorted({k for k, _ in seqs})}
    log(f"{len(seqs)} sequences, positions {positions}")
    model, ref = reference_logits(base, args.adapter, seqs)
    rows, notes = [], []

    def add(vid, toolchain, quant, logits, nbytes, extra=None):
        m = compare(seqs, ref, logits)
        rows.append({"id": vid, "toolchain": toolchain, "quant": quant, "bytes": nbytes, "metrics": m, **(extra or {})})
        log(f"{vid}: {nbytes / 1e6:.1f} MB, all KL {m['all']['mean_kl']:.4f} top-1 {m['all']['top1_agreement']:.3f}")

    for recipe in [r for r in args.ours.split(",") if r]:
        try:
            logits, nbytes, qa = ours(base, args.adapter, recipe, work, seqs)
            quant = ", ".join(f"{k}: {'/'.join(v)}" for k, v in (qa.get("linear_kinds") or {}).items()) or qa.get("scheme", "")
            add(f"ours-{recipe}", "cdcda", quant, logits, nbytes)
        except Exception as e:  # noqa: BLE001 - one failing variant is reported, the others still run
            notes.append(f"ours-{recipe} failed: {type(e).__name__}: {str(e)[:300]}")
            log(notes[-1])
    for art in [Path(a) for a in args.artifacts.split(",") if a]:
        rid, logits, nbytes, qa = prebuilt(art, base, args.adapter, seqs)
        # the directory name tells apart several builds of one recipe (e.g. with and without a --set override)
        add(f"ours-{rid} [{art.name}]", "cdcda", qa.get("scheme", ""), logits, nbytes, {"artifact": str(art)})
    peers = {p for p in args.peers.split(",") if p}
    if "llamacpp" in peers:
        try:
            hf = merged_hf_dir(model, base, work)
            for q, (logits, nbytes, ver) in llamacpp_variants(hf, work, seqs).items():
                add(f"llamacpp-{q}", "llama.cpp", q, logits, nbytes, {"version": ver})
        except Exception as e:  # noqa: BLE001
            notes.append(f"llama.cpp failed: {type(e).__name__}: {str(e)[:300]}")
            log(notes[-1])
    if "ortgenai" in peers:
        for acc in (4, 0):
            try:
                logits, nbytes = genai_builder(base, args.adapter, acc, work, seqs)
                add(f"ortgenai-int4-acc{acc}", "ORT GenAI builder", f"int4 block 32, accuracy level {acc}", logits, nbytes)
            except Exception as e:  # noqa: BLE001
                notes.append(f"ORT GenAI builder acc {acc} failed: {type(e).__name__}: {str(e)[:300]}")
                log(notes[-1])
    if "torchao-8da4w" in peers:
        logits, nbytes = torchao_8da4w(model, seqs)
        add("executorch-8da4w (eager torchao)", "optimum-executorch / ExecuTorch export_llm numerics",
            "8da4w g32, emb 4w g32", logits, nbytes)
        notes.append("executorch-8da4w: torchao's 8da4w (what optimum-executorch's and ExecuTorch's own 8da4w .pte compute "
                     "with XNNPACK) run in eager PyTorch; bytes computed as int4 + a bf16 scale per 32 weights.")
    from device_harness.bench_runner import describe

    d = describe()
    result = {"schema": "cdcda-quality/1", "model": "SmolLM2-135M-Instruct" if args.base is None else str(args.base),
              "base": str(base), "adapter": str(args.adapter) if args.adapter else None, "started": started,
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{d.get('cpu')} ({os.cpu_count()} cores)", "positions": positions,
              "token_ids": [{"kind": k, "ids": s} for k, s in seqs], "rows": rows, "notes": notes}
    result["pareto_front"] = pareto(rows)
    result["targets"] = peer_targets(rows)
    out = BENCH / "results" / f"quality_{name}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out}.{{json,md,png}}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
