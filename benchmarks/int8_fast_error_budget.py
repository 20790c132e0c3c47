"""Where ``onnx/int8-fast``'s error comes from: an eager emulation of its arithmetic on a real base.

The recipe computes every decoder linear as int8 weights per block of 32 (symmetric, fp16 scales) times
int8 activations per block of 32 (ONNX Runtime's ``accuracy_level: 4``), after SmoothQuant (alpha 0.5, scales
from max |x| on the calibration text); the tied lm_head likewise, without smoothing. This script quantizes
one part at a time and reports mean KL and top-1 against the float model, teacher-forced on calibration
sequences (every 10th, starting at the second), the rows of recipes/README.md's error-budget table:

    python benchmarks/int8_fast_error_budget.py --base /tmp/real/smollm2 [--grid asymmetric] [--out F.json]

Remedies, each adding rows: ``--gptq`` (GPTQ-rounded layers), ``--hot-rows 1024,4096`` (the N most likely
vocabulary rows' logits in float from the unrounded head input: ``quantization.hot_rows_bits: 32``),
``--block 16`` (weights and activations per block of 16). Calibration for them (Hessians, hot rows) reads only
the sequences that are not evaluated.

It emulates, it does not run ONNX Runtime: the "everything" row is to be compared with ``cdcda check`` of
the artifact (KL 0.0034, top-1 0.960 on 2026-11-27) by order of magnitude only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="HF model directory (float)")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant alpha (the recipe's smooth_alpha)")
    ap.add_argument("--grid", choices=("symmetric", "asymmetric"), default="symmetric", help="layers' 8-bit grid")
    ap.add_argument("--block", type=int, default=32,
                    help="block of the weights and of level 4's activation rounding (MatMulNBits block_size)")
    ap.add_argument("--every", type=int, default=10, help="evaluate every N-th calibration sequence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gptq", action="store_true",
                    help="also GPTQ-round the layers (on the smoothed inputs' Hessians from the calibration "
                         "sequences that are not evaluated) and add the GPTQ rows")
    ap.add_argument("--hot-rows", default="",
                    help="comma-separated counts N: rows with the N most likely vocabulary rows' logits computed "
                         "in float from the unrounded head input (the recipe's quantization.hot_rows at float), "
                         "chosen on the calibration sequences that are not evaluated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdcda_export.export.calibrate import (block_grid, calibration_ids, dequant, gptq, head_inputs, hot_rows,
                                              rtn, smooth_scales, weight_key)
    from cdcda_export.train.format import PLAIN

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32).eval()
    seqs = calibration_ids(AutoTokenizer.from_pretrained(str(args.base)), PLAIN)
    _, _, absmax = head_inputs(model, seqs, layers=True, hessians=False, head=False)
    hess = {}
    hot_counts = [int(n) for n in args.hot_rows.split(",") if n.strip()]
    ranked = None
    if args.gptq or hot_counts:   # one pass over the sequences score() does not read, so neither is in-sample:
        calib = [s for i, s in enumerate(seqs) if i % args.every != 1]   # GPTQ's Hessians, the hot rows' inputs
        hidden, hess, _ = head_inputs(model, calib, layers=args.gptq, hessians=True, head=bool(hot_counts))
        if hot_counts:
            ranked = hot_rows(model.lm_head.weight.detach(), hidden, max(hot_counts))
        del hidden

    B = args.block

    def q_act(x):   # int8 per block of B along the input channels, symmetric (level 4's activation rounding)
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // B, B)
        s = xb.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.round(xb / s) * s).reshape(x.shape)

    def q_weight(w, grid):   # int8 blocks of B along K, fp16 scales (MatMulNBitsQuantizer's grids), dequantized
        scale, zp = block_grid(w, B, bits=8, grid=grid)
        return dequant(rtn(w, scale, zp, B, bits=8), scale, zp, B)

    # linears that read one input share SmoothQuant's s (the export fuses q/k/v and gate/up)
    groups = []
    for layer in model.model.layers:
        a, p = layer.self_attn, layer.mlp
        groups += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [p.gate_proj, p.up_proj], [p.down_proj]]
    def q_gptq(w, h, grid):   # the same grid, GPTQ-rounded on the input Hessian h
        q, scale, zp = gptq(w, None, B, bits=8, grid=grid, hessian=h)
        return dequant(q, scale, zp, B)

    plan = {}   # linear -> (1/s, smoothed quantized weight, quantized weight without smoothing[, GPTQ'd smoothed,
    #                        GPTQ'd without smoothing])
    for lins in groups:
        w = torch.cat([lin.weight.detach() for lin in lins])
        key = weight_key(lins[0].weight.detach().T.numpy())
        s = smooth_scales(absmax[key], w, args.alpha)
        for lin in lins:
            w = lin.weight.detach()
            plan[lin] = (1.0 / s, q_weight(w * s[None, :], args.grid), q_weight(w, args.grid))
            if args.gptq:   # the smoothed input x / s has the Hessian diag(1/s) H diag(1/s)
                h = hess[key]
                plan[lin] += (q_gptq(w * s[None, :], h / s[:, None] / s[None, :], args.grid),
                              q_gptq(w, h, args.grid))
    head = model.lm_head
    head_q = q_weight(head.weight.detach(), "symmetric")   # the recipe's 8-bit head is symmetric
    mode = {"layers": None, "head": False, "hot": 0}

    def layer_forward(lin):
        def fwd(x):
            if mode["layers"] in ("all", "all-gptq"):
                inv, wq = plan[lin][0], plan[lin][3 if mode["layers"] == "all-gptq" else 1]
                return torch.nn.functional.linear(q_act(x * inv), wq, lin.bias)
            if mode["layers"] in ("weights", "weights-gptq"):
                return torch.nn.functional.linear(x, plan[lin][4 if mode["layers"] == "weights-gptq" else 2],
                                                  lin.bias)
            return torch.nn.functional.linear(x, lin.weight, lin.bias)
        return fwd

    def head_forward(x):
        if mode["head"]:
            out = torch.nn.functional.linear(q_act(x), head_q)
            if mode["hot"]:
                rows = ranked[:mode["hot"]]
                out[..., rows] = torch.nn.functional.linear(x, head.weight[rows])
            return out
        return torch.nn.functional.linear(x, head.weight)

    for lin in plan:
        lin.forward = layer_forward(lin)
    head.forward = head_forward
    evals = seqs[1::args.every]
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1) for s in evals]

    def score() -> dict:
        kl = agree = n = 0
        with torch.no_grad():
            for s, r in zip(evals, ref):
                lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
                kl += float((r.exp() * (r - lp)).sum())
                agree += int((lp.argmax(-1) == r.argmax(-1)).sum())
                n += len(s)
        return {"mean_kl": kl / n, "top1": agree / n, "positions": n}

    rows = {}
    plan_rows = [("everything", "all", True), ("layers only", "all", False),
                 ("layers' weights only", "weights", False), ("lm_head input only", None, True)]
    if args.gptq:
        plan_rows += [("everything, GPTQ layers", "all-gptq", True), ("layers only, GPTQ", "all-gptq", False),
                      ("layers' weights only, GPTQ", "weights-gptq", False)]
    for n in hot_counts:
        plan_rows += [(f"lm_head input only, {n} float hot rows", None, True, n),
                      (f"everything, {n} float hot rows", "all", True, n)]
        if args.gptq:
            plan_rows.append((f"everything, GPTQ layers, {n} float hot rows", "all-gptq", True, n))
    for name, layers, head_on, *hot in plan_rows:
        mode.update(layers=layers, head=head_on, hot=hot[0] if hot else 0)
        t0 = time.perf_counter()
        rows[name] = score()
        print(f"{name:24s} KL {rows[name]['mean_kl']:.5f}  top-1 {rows[name]['top1']:.4f}  "
              f"({rows[name]['positions']} positions, {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"base": str(args.base), "alpha": args.alpha, "grid": args.grid, "block": B,
                                        "gptq": args.gptq, "hot_rows": hot_counts,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
