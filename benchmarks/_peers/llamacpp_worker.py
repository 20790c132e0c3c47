"""llama.cpp through llama-cpp-python's C API bindings (runs in benchmarks/.venv-llamacpp).

The low-level API (the shape of llama.cpp's own ``llama-simple``) is used rather than the
high-level ``Llama`` class so that ``use_extra_bufts`` (weight repacking / AMX buffer types) can be
switched, and greedy sampling is one argmax over the last logits (no sampler chain in Python).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observer import emit, now_ms, parser, read_prompt  # noqa: E402


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--extra-bufts", type=int, default=0, help="1: let llama.cpp repack weights (extra buffer types)")
    ap.add_argument("--flash-attn", type=int, default=-1, help="-1: llama.cpp default (auto), 0 off, 1 on")
    args = ap.parse_args()
    import numpy as np
    import llama_cpp as L

    ids = read_prompt(args.prompt_file)
    threads = args.threads or os.cpu_count()
    L.llama_backend_init()
    load0 = now_ms()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = bool(args.extra_bufts)
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    cp = L.llama_context_default_params()
    cp.n_ctx = len(ids) + args.gen_len + 16
    cp.n_batch = max(512, len(ids))
    cp.n_ubatch = max(512, len(ids))
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.no_perf = True
    if args.flash_attn >= 0:
        cp.flash_attn_type = args.flash_attn   # LLAMA_FLASH_ATTN_TYPE_DISABLED / ENABLED
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    load1 = now_ms()

    def step(tokens: list[int]) -> int:
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    inf0 = now_ms()
    tok = step(ids)
    first = now_ms()
    out = [tok]
    while len(out) < args.gen_len:
        tok = step([tok])
        out.append(tok)
    inf1 = now_ms()
    emit(prompt_len=len(ids), tokens=out, load0=load0, load1=load1, inf0=inf0, first=first, inf1=inf1,
         runtime={"llama_cpp_python": L.__version__, "threads": threads, "extra_bufts": bool(args.extra_bufts),
                  "flash_attn_type": int(cp.flash_attn_type), "system_info": L.llama_print_system_info().decode()})
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
