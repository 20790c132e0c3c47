"""ONNX Runtime GenAI running its own model builder's output (greedy, no EOS stop).

Threads go into the decoder session's ``intra_op_num_threads`` through ``og.Config.overlay``
(the same key as genai_config.json ``model.decoder.session_options``).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observer import emit, now_ms, parser, read_prompt  # noqa: E402


def main() -> int:
    args = parser(__doc__).parse_args()
    import numpy as np
    import onnxruntime_genai as og

    ids = read_prompt(args.prompt_file)
    total = len(ids) + args.gen_len
    load0 = now_ms()
    cfg = og.Config(args.model)
    if args.threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    load1 = now_ms()
    params = og.GeneratorParams(model)
    # min_length = max_length: EOS is masked, so a random-weight model always makes gen_len tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    gen = og.Generator(model, params)
    inf0 = now_ms()
    gen.append_tokens(np.asarray([ids], dtype=np.int32))   # prefill: logits of the prompt
    gen.generate_next_token()                              # first token (argmax of those logits)
    first = now_ms()
    out = [int(gen.get_next_tokens()[0])]
    while len(out) < args.gen_len:
        gen.generate_next_token()                          # run the model on the last token, pick the next
        out.append(int(gen.get_next_tokens()[0]))
    inf1 = now_ms()
    emit(prompt_len=len(ids), tokens=out, load0=load0, load1=load1, inf0=inf0, first=first, inf1=inf1,
         runtime={"onnxruntime_genai": og.__version__, "threads": args.threads or None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
