"""Teacher-forced logits of every position from llama.cpp (runs in benchmarks/.venv-llamacpp).

    python llamacpp_logits_worker.py MODEL.gguf SEQS.json OUT.npz

SEQS.json: a list of token-id lists. Each sequence is fed in one batch from position 0 (a fresh KV
cache) with logits requested for every position; OUT.npz holds ``a{i}`` = float32 [T, vocab].
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import numpy as np
    from llama_cpp import Llama

    model, seqs_path, out = sys.argv[1:4]
    seqs = json.loads(open(seqs_path).read())
    llm = Llama(model_path=model, n_ctx=max(len(s) for s in seqs) + 8, n_batch=512, logits_all=True,
                n_threads=2, verbose=False)
    res = {}
    for i, ids in enumerate(seqs):
        llm.reset()
        llm.eval(ids)
        res[f"a{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    np.savez(out, **res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
