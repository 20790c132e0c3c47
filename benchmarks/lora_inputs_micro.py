"""What the LoRA-as-inputs path of an ONNX base package costs per decode step, by how the adapter tensors are fed.

A base package (`cdcda export --adapter-only`) computes every targeted linear as ``base(x) + (x @ A) @ B`` with
``A`` and ``B`` graph inputs, fp16 by default (``Cast`` to fp32, then two ``MatMul``s: 4 nodes per target). On
SmolLM2-135M (30 layers, 7 targets, rank 8) that is 840 extra nodes per token, and decode with the adapter active
falls short of the merged artifact's (``benchmarks/results/adapter_packages_*.md``). This script isolates that path at M = 1 (one token), on
SmolLM2-135M's LoRA shapes, and times the ways the adapter tensors could be fed:

* ``fp16+Cast``         -- today's graph (fp16 inputs, Cast to fp32, fp32 MatMuls)
* ``fp32``              -- fp32 inputs, no Cast (the adapter file doubles)
* ``fp16 compute``      -- fp16 MatMuls on fp16 inputs (x cast to fp16, the result back to fp32)
* ``int8+Dequantize``   -- int8 inputs + per-column fp32 scales, DequantizeLinear(axis=1) (3.07 MB with the
  per-column scales instead of 4.88 MB)
* ``int8+Cast*scale``   -- int8 inputs, Cast then Mul by the per-column scales
* ``int8 DQMatMul``     -- com.microsoft.DynamicQuantizeMatMul on int8 inputs (activations quantized per tensor)
* ``fp16+Cast, fused A`` -- q/k/v's and gate/up's A concatenated into one input each (one MatMul for the group,
  a Split, then each part's B): 720 nodes instead of 840
* ``fp16+Cast, fused A+B`` -- also the group's B concatenated along the output ([r, sum(out)]): the group's
  [T, n, r] @ B, then each part's columns picked by a constant 0/1 mask and a ReduceSum (660 nodes)

    python benchmarks/lora_inputs_micro.py [--out benchmarks/results/lora_inputs_micro_<cpu>.json]

Each figure: median over 5 rounds of the median of 30 runs of the whole 30-layer LoRA path (including Python's
InferenceSession.run overhead, which a decode step pays once either way). Error: max |delta - fp64 delta| over
max |fp64 delta| (int8 rows: the rounding of A and B; ``int8 DQMatMul`` gave 0.49 on onnxruntime 1.32 with
per-column scales of a non-constant B, not investigated). Run it with nothing else busy; compare rows of one run
only.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

from device_harness.bench_runner import cpu_flags

H, INTER, KV, R, LAYERS = 576, 1536, 192, 8, 30     # SmolLM2-135M, rank 8
TARGETS = [("q", H, H), ("k", H, KV), ("v", H, KV), ("o", H, H), ("gate", H, INTER), ("up", H, INTER),
           ("down", INTER, H)]
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile")
MODES = ("fp16+Cast", "fp32", "fp16 compute", "int8+Dequantize", "int8+Cast*scale", "int8 DQMatMul",
         "fp16+Cast, fused A", "fp16+Cast, fused A+B")


def _q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.maximum(np.abs(w).max(0), 1e-12) / 127.0
    return np.round(w / s).astype(np.int8), s.astype(np.float32)


def build(mode: str, rng: np.random.Generator):
    """(serialized model, feeds, fp64 reference output, payload bytes)."""
    vi = h.make_tensor_value_info
    x = rng.standard_normal((1, H)).astype(np.float32) * 2
    xi = rng.standard_normal((1, INTER)).astype(np.float32)
    inits = []
    inputs, nodes, outs, refs = [vi("x", TP.FLOAT, [1, H]), vi("xi", TP.FLOAT, [1, INTER])], [], [], []
    feeds = {"x": x, "xi": xi}
    payload = 0

    def add(name, arr, dt):
        nonlocal payload
        inputs.append(vi(name, dt, list(arr.shape)))
        feeds[name] = arr
        payload += arr.nbytes

    for layer in range(LAYERS):
        w = {t: ((rng.standard_normal((i, R)) * 0.02).astype(np.float16).astype(np.float32),
                 (rng.standard_normal((R, o)) * 0.02).astype(np.float16).astype(np.float32)) for t, i, o in TARGETS}
        for t, _, _ in TARGETS:
            src = xi if t == "down" else x
            refs.append(src.astype(np.float64) @ w[t][0].astype(np.float64) @ w[t][1].astype(np.float64))
        groups = ([["q", "k", "v"], ["o"], ["gate", "up"], ["down"]] if "fused" in mode
                  else [[t] for t, _, _ in TARGETS])
        for g in groups:
            p = f"l{layer}.{'_'.join(g)}"
            xin = "xi" if g == ["down"] else "x"
            if len(g) > 1 and mode.endswith("A+B"):
                # one A [in, n*r] and one B [r, sum(out)] for the group: h [T, n*r] -> [T, n, r] @ B -> [T, n, sum(out)],
                # then part j's columns from row j (a constant 0/1 mask and a ReduceSum over n)
                widths = [o for t, i, o in TARGETS if t in g]
                mask = np.zeros((len(g), sum(widths)), np.float32)
                for j, o in enumerate(widths):
                    mask[j, sum(widths[:j]):sum(widths[:j]) + o] = 1
                add(p + ".A", np.concatenate([w[t][0] for t in g], 1).astype(np.float16), TP.FLOAT16)
                add(p + ".B", np.concatenate([w[t][1] for t in g], 1).astype(np.float16), TP.FLOAT16)
                inits.append(numpy_helper.from_array(mask, p + ".mask"))
                inits.append(numpy_helper.from_array(np.array([1, len(g), R], np.int64), p + ".shape"))
                inits.append(numpy_helper.from_array(np.array([1], np.int64), p + ".ax"))
                nodes += [h.make_node("Cast", [p + ".A"], [p + ".Af"], to=TP.FLOAT),
                          h.make_node("Cast", [p + ".B"], [p + ".Bf"], to=TP.FLOAT),
                          h.make_node("MatMul", [xin, p + ".Af"], [p + ".h"]),
                          h.make_node("Reshape", [p + ".h", p + ".shape"], [p + ".h3"]),
                          h.make_node("MatMul", [p + ".h3", p + ".Bf"], [p + ".y3"]),
                          h.make_node("Mul", [p + ".y3", p + ".mask"], [p + ".ym"]),
                          h.make_node("ReduceSum", [p + ".ym", p + ".ax"], [p + ".y"], keepdims=0)]
                outs.append(p + ".y")
                continue
            if len(g) > 1:   # one A for the group, then each part's B
                add(p + ".A", np.concatenate([w[t][0] for t in g], 1).astype(np.float16), TP.FLOAT16)
                nodes += [h.make_node("Cast", [p + ".A"], [p + ".Af"], to=TP.FLOAT),
                          h.make_node("MatMul", [xin, p + ".Af"], [p + ".h"]),
                          h.make_node("Split", [p + ".h"], [f"{p}.h{j}" for j in range(len(g))], axis=1,
                                      num_outputs=len(g))]
                for j, t in enumerate(g):
                    b = f"l{layer}.{t}.B"
                    add(b, w[t][1].astype(np.float16), TP.FLOAT16)
                    nodes += [h.make_node("Cast", [b], [b + "f"], to=TP.FLOAT),
                              h.make_node("MatMul", [f"{p}.h{j}", b + "f"], [b + ".y"])]
                    outs.append(b + ".y")
                continue
            t = g[0]
            a, b, y = f"l{layer}.{t}.A", f"l{layer}.{t}.B", f"l{layer}.{t}.y"
            A, B = w[t]
            if mode.startswith("fp16"):
                add(a, A.astype(np.float16), TP.FLOAT16)
                add(b, B.astype(np.float16), TP.FLOAT16)
                if mode != "fp16 compute":
                    nodes += [h.make_node("Cast", [a], [a + "f"], to=TP.FLOAT),
                              h.make_node("Cast", [b], [b + "f"], to=TP.FLOAT),
                              h.make_node("MatMul", [xin, a + "f"], [a + ".h"]),
                              h.make_node("MatMul", [a + ".h", b + "f"], [y])]
                else:
                    nodes += [h.make_node("Cast", [xin], [a + ".x16"], to=TP.FLOAT16),
                              h.make_node("MatMul", [a + ".x16", a], [a + ".h"]),
                              h.make_node("MatMul", [a + ".h", b], [y + "16"]),
                              h.make_node("Cast", [y + "16"], [y], to=TP.FLOAT)]
            elif mode == "fp32":
                add(a, A, TP.FLOAT)
                add(b, B, TP.FLOAT)
                nodes += [h.make_node("MatMul", [xin, a], [a + ".h"]), h.make_node("MatMul", [a + ".h", b], [y])]
            else:
                (qa, sa), (qb, sb) = _q8(A), _q8(B)
                add(a, qa, TP.INT8)
                add(a + ".s", sa, TP.FLOAT)
                add(b, qb, TP.INT8)
                add(b + ".s", sb, TP.FLOAT)
                if mode == "int8+Dequantize":
                    nodes += [h.make_node("DequantizeLinear", [a, a + ".s"], [a + "f"], axis=1),
                              h.make_node("DequantizeLinear", [b, b + ".s"], [b + "f"], axis=1),
                              h.make_node("MatMul", [xin, a + "f"], [a + ".h"]),
                              h.make_node("MatMul", [a + ".h", b + "f"], [y])]
                elif mode == "int8+Cast*scale":
                    nodes += [h.make_node("Cast", [a], [a + "c"], to=TP.FLOAT),
                              h.make_node("Mul", [a + "c", a + ".s"], [a + "f"]),
                              h.make_node("Cast", [b], [b + "c"], to=TP.FLOAT),
                              h.make_node("Mul", [b + "c", b + ".s"], [b + "f"]),
                              h.make_node("MatMul", [xin, a + "f"], [a + ".h"]),
                              h.make_node("MatMul", [a + ".h", b + "f"], [y])]
                else:
                    add(a + ".z", np.zeros(qa.shape[1], np.int8), TP.INT8)
                    add(b + ".z", np.zeros(qb.shape[1], np.int8), TP.INT8)
                    nodes += [h.make_node("DynamicQuantizeMatMul", [xin, a, a + ".s", a + ".z"], [a + ".h"],
                                          domain="com.microsoft"),
                              h.make_node("DynamicQuantizeMatMul", [a + ".h", b, b + ".s", b + ".z"], [y],
                                          domain="com.microsoft")]
            outs.append(y)
    nodes.append(h.make_node("Concat", outs, ["out"], axis=1))
    graph = h.make_graph(nodes, "lora", inputs, [vi("out", TP.FLOAT, None)], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString(), feeds, np.concatenate(refs, 1), payload, len(nodes) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sessions, res = {}, {}
    for mode in MODES:
        model, feeds, ref, payload, n_nodes = build(mode, np.random.default_rng(0))
        for th in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = th
            s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            err = float(np.abs(s.run(None, feeds)[0] - ref).max() / np.abs(ref).max())
            sessions[(mode, th)] = (s, feeds)
            res[f"{mode} {th}T"] = {"nodes": n_nodes, "payload_mb": round(payload / 1e6, 3), "rel_err": err,
                                    "ms": []}
    for _ in range(args.rounds):   # rounds interleave the variants, so a burst of load hits them all
        for (mode, th), (s, feeds) in sessions.items():
            for _ in range(3):
                s.run(None, feeds)
            ts = []
            for _ in range(30):
                t = time.perf_counter()
                s.run(None, feeds)
                ts.append(time.perf_counter() - t)
            res[f"{mode} {th}T"]["ms"].append(statistics.median(ts) * 1e3)
    for k, v in res.items():
        v["ms_median"] = round(statistics.median(v.pop("ms")), 3)
        print(f"{k:26s} {v['nodes']:5d} nodes  {v['payload_mb']:6.2f} MB  err {v['rel_err']:.1e}  "
              f"{v['ms_median']:7.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "cpu_flags": cpu_flags(FLAGS),
                       "shape": {"hidden": H, "intermediate": INTER, "kv_out": KV, "rank": R, "layers": LAYERS},
                       "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
