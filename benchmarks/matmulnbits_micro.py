"""One ONNX Runtime MatMul call at decode (M = 1) for SmolLM2-135M's shapes: fp32 MatMul against MatMulNBits
int8 / int4 (block 32, symmetric) at accuracy level 4 (int8 compute) and int8 at level 0 (float compute).

Why: which of our ONNX recipes is fast depends on the CPU's MLAS kernels, not only on bytes. On a 2-core
AVX2-only VM (2026-11-27) the int8 level-4 head ran at ~5 GB/s (compute-bound) and, at 2 threads, int8 level 4
was no faster than fp32 on the small shapes; int4 level 4 was 25-40% faster than int8 level 4.

    python benchmarks/matmulnbits_micro.py [--out benchmarks/results/matmulnbits_micro_<cpu>.json]

Each figure: median of 5 rounds, each the mean of 200 calls (20 for level-0 int8 and the 576 x 49152 head),
including Python's InferenceSession.run overhead. Run it with nothing else busy.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import matmul_nbits_quantizer as mnq

from device_harness.bench_runner import cpu_flags

rng = np.random.default_rng(0)
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def model(K, N, bits, acc):
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [X], [Y],
                          [numpy_helper.from_array(W, "w")])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    if bits:
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=acc,
                                               op_types_to_quantize=("MatMul",))
        q = mnq.MatMulNBitsQuantizer(p, algo_config=cfg)
        q.process()
        p = q.model.model
    return p.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {}
    for K, N in [(576, 960), (576, 3072), (1536, 576), (576, 49152)]:
        for bits, acc in [(0, 0), (8, 4), (4, 4), (8, 0)]:
            for th in (1, 2):
                so = ort.SessionOptions()
                so.intra_op_num_threads = th
                s = ort.InferenceSession(model(K, N, bits, acc), so, providers=["CPUExecutionProvider"])
                x = rng.standard_normal((1, K)).astype(np.float32)
                n = 20 if (bits == 8 and acc == 0) or N > 10000 else 200
                for _ in range(10):
                    s.run(None, {"x": x})
                rounds = []
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(n):
                        s.run(None, {"x": x})
                    rounds.append((time.perf_counter() - t) / n * 1e6)
                key = f"{K}x{N} {'fp32' if not bits else f'int{bits} level {acc}'} {th}T"
                res[key] = round(statistics.median(rounds), 1)
                print(key, res[key], "us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "cpu_flags": cpu_flags(FLAGS), "us_per_call": res}, f, indent=1)


if __name__ == "__main__":
    main()
