"""Decode roofline: measured memory bandwidth / weight bytes read per generated token.

A decode step of a dense decoder reads every weight once (all linears and the LM head) but only
one row of the embedding table (a gather). ``*_weight_bytes_per_token`` count exactly that from the
artifact itself where the format allows (GGUF tensor table, ONNX initializers and their consumers,
HF safetensors) and from the file size minus the embedding table for ExecuTorch ``.pte`` files.
KV-cache reads (which grow with the position) are reported apart, not in the roofline.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def measure_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> dict:
    """Copy a ``gib`` GiB float32 array with ``threads`` threads (numpy releases the GIL).

    Bytes moved per pass = read + write = 2 x size. Returns GB/s (1e9) best and median.
    """
    import numpy as np

    n = int(gib * (1 << 30)) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    chunks = [(slice(i * n // threads, (i + 1) * n // threads)) for i in range(threads)]

    def part(s):
        np.copyto(dst[s], src[s])

    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, chunks))          # touch the pages first
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(part, chunks))
            dt = time.perf_counter() - t
            rates.append(2 * src.nbytes / dt / 1e9)
    return {"threads": threads, "bytes": int(src.nbytes), "method": "numpy copyto, read+write bytes",
            "gb_s_best": max(rates), "gb_s_median": statistics.median(rates), "samples": rates}


# ------------------------------------------------------------------ weight bytes per token


def hf_weight_bytes_per_token(model_dir: Path) -> dict:
    """HF safetensors: every tensor except an untied input embedding (tied: it is the LM head)."""
    from safetensors import safe_open

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    total = emb = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shape = sl.get_shape()
                nbytes = int(__import__("numpy").prod(shape)) * {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
                total += nbytes
                if k.endswith("embed_tokens.weight"):
                    emb = nbytes
    tied = bool(cfg.get("tie_word_embeddings"))
    per_tok = total if tied else total - emb
    return {"bytes_per_token": per_tok, "total_weight_bytes": total, "embedding_bytes": emb, "tied": tied,
            "method": "safetensors tensor sizes (fp32), embedding gather excluded unless tied"}


def gguf_weight_bytes_per_token(path: Path, gguf_py: Path) -> dict:
    """GGUF: all tensors; ``token_embd`` counts only when there is no separate ``output.weight``."""
    sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    total = sum(sizes.values())
    emb = sizes.get("token_embd.weight", 0)
    tied = "output.weight" not in sizes
    per_tok = total if tied else total - emb
    return {"bytes_per_token": per_tok, "total_weight_bytes": total, "embedding_bytes": emb, "tied": tied,
            "types": sorted({v for v in types.values()}), "lm_head_type": types.get("output.weight",
                                                                                    types.get("token_embd.weight")),
            "method": "GGUF tensor table"}


def onnx_weight_bytes_per_token(model_path: Path) -> dict:
    """ONNX: initializers, minus those whose only consumers are Gather ops (embedding lookups)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set] = {}

    def walk(graph):
        for node in graph.node:
            for i in node.input:
                consumers.setdefault(i, set()).add(node.op_type)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(m.graph)
    total = gather = 0
    for t in m.graph.initializer:
        if uses_external_data(t):
            n = int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            n = len(t.raw_data) if t.raw_data else int(
                __import__("numpy").prod(t.dims or [1])) * 4
        total += n
        ops = consumers.get(t.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"}:
            gather += n
    return {"bytes_per_token": total - gather, "total_weight_bytes": total, "embedding_bytes": gather,
            "method": "ONNX initializers; Gather-only initializers excluded"}


def pte_weight_bytes_per_token(pte: Path, *, vocab: int, hidden: int, embedding_bits: float | None,
                               tied_embedding_shared: bool = False) -> dict:
    """ExecuTorch .pte: file size minus the embedding table (estimated from its bit width).

    ``embedding_bits`` is the stored bits per embedding element incl. scales (32 for fp32, 4.x for
    4-bit grouped); ``tied_embedding_shared``: the table is also the LM head's weight (then read whole).
    """
    size = Path(pte).stat().st_size
    emb = 0 if (tied_embedding_shared or embedding_bits is None) else int(vocab * hidden * embedding_bits / 8)
    return {"bytes_per_token": size - emb, "total_weight_bytes": size, "embedding_bytes": emb,
            "method": "pte file size minus estimated embedding table" if emb else "pte file size (upper bound)"}


def kv_bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, position: float, elem_bytes: int) -> int:
    """KV cache bytes read by one decode step at ``position`` (K and V of every layer)."""
    return int(2 * layers * kv_heads * head_dim * position * elem_bytes)


def roofline(bandwidth_gb_s: float, bytes_per_token: float, decode_tok_s: float | None) -> dict:
    roof = bandwidth_gb_s * 1e9 / bytes_per_token if bytes_per_token else None
    return {"weight_mb_per_token": bytes_per_token / 1e6, "roofline_tok_s": roof,
            "achieved_fraction": (decode_tok_s / roof) if (roof and decode_tok_s) else None}


if __name__ == "__main__":
    print(json.dumps(measure_bandwidth(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
