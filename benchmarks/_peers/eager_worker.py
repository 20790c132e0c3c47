"""Eager PyTorch fp32 baseline: ``model.generate`` greedy, HF dynamic cache, one run per process."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observer import emit, now_ms, parser, read_prompt  # noqa: E402


def main() -> int:
    args = parser(__doc__).parse_args()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = read_prompt(args.prompt_file)
    load0 = now_ms()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load1 = now_ms()

    class Clock(BaseStreamer):
        """Time stamp of every new token (the first put() is the prompt)."""

        def __init__(self):
            self.calls = 0
            self.first = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = now_ms()

        def end(self):
            pass

    clock = Clock()
    x = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        inf0 = now_ms()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.gen_len,
                             min_new_tokens=args.gen_len, do_sample=False, streamer=clock,
                             pad_token_id=0, eos_token_id=None)
        inf1 = now_ms()
    toks = out[0, len(ids):].tolist()
    emit(prompt_len=len(ids), tokens=toks, load0=load0, load1=load1, inf0=inf0, first=clock.first, inf1=inf1,
         runtime={"torch": torch.__version__, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
