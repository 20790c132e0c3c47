"""fp32 parity of our exports of the real Gemma 3 270M base against eager Hugging Face.

    cdcda init-model --arch gemma3-270m-base --out DIR
    python benchmarks/gemma3_real_parity.py --base DIR --recipe onnx/fp32 --out /tmp/g3-onnx

For each prompt: the artifact's prefill logits (every position) and a 16-token greedy continuation (the
logits each token was chosen from) against HF eager (full forward per step, no cache). One prompt is
longer than the sliding window (512), so the sliding layers' window is exercised; ``--max-seq-len``
must exceed it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
]


def long_prompt(tok, n_tokens: int) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    return ids[:n_tokens]


def eager(model, ids: list[int], n: int):
    x = torch.tensor([ids])
    with torch.no_grad():
        prefill = model(input_ids=x, use_cache=False).logits[0].numpy()
        toks, steps, logits = [], [], prefill[-1]
        for _ in range(n):
            tok = int(np.argmax(logits))
            toks.append(tok)
            x = torch.cat([x, torch.tensor([[tok]])], 1)
            logits = model(input_ids=x, use_cache=False).logits[0, -1].numpy()
            steps.append(logits)
    return prefill, toks, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--long-tokens", type=int, default=600)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reuse", action="store_true", help="use an existing artifact in --out")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from cdcda_export import runtime
    from cdcda_export.export.api import export, load_merged_model

    out = Path(args.out)
    t0 = time.perf_counter()
    if not (args.reuse and (out / "manifest.json").is_file()):
        export(args.base, None, args.recipe, out, progress=False, overrides=[f"max_seq_len={args.max_seq_len}"])
    export_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args.base)
    model = load_merged_model(args.base)
    prompts = [tok(p)["input_ids"] for p in PROMPTS] + [long_prompt(tok, args.long_tokens)]
    r = runtime.load(out, threads=2)
    rows = []
    for ids in prompts:
        prefill_ref, toks_ref, steps_ref = eager(model, ids, args.steps)
        r.reset()
        prefill = r.prefill(ids)
        res = runtime.greedy_generate(r, ids, args.steps, keep_logits=True)
        rows.append({"prompt_tokens": len(ids),
                     "prefill_max_abs_err": float(np.abs(prefill - prefill_ref).max()),
                     "decode_max_abs_err": max(float(np.abs(a - b).max()) for a, b in zip(res.logits[1:], steps_ref)),
                     "logit_scale": float(np.abs(prefill_ref).max()),
                     "greedy_match": res.tokens == toks_ref,
                     "greedy_text": tok.decode(toks_ref)})
    print(json.dumps({"recipe": args.recipe, "max_seq_len": args.max_seq_len, "export_s": round(export_s, 1),
                      "max_abs_err": max(max(r_["prefill_max_abs_err"], r_["decode_max_abs_err"]) for r_ in rows),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
