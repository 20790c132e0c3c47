"""optimum-executorch's .pte (XNNPACK, custom SDPA + custom KV cache) run with the ExecuTorch
pybindings, the way ``ExecuTorchModelForCausalLM.generate`` drives it: ``forward(input_ids,
cache_position)``, one parallel prefill call, then one call per token. Runs in optimum's own venv.

``--input-pos start`` drives a .pte from ExecuTorch's own ``export_llm`` the way its runner
(``extension/llm/runner``) does: ``forward(tokens, input_pos)`` with the start position only.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observer import emit, now_ms, parser, read_prompt  # noqa: E402


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--input-pos", choices=("range", "start"), default="range",
                    help="range: one position per token (optimum); start: the first position only (export_llm)")
    args = ap.parse_args()
    import torch
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (custom_sdpa / update_cache kernels)
    from executorch.kernels import quantized  # noqa: F401

    ids = read_prompt(args.prompt_file)
    torch.set_num_threads(1)   # as cdcda's runner: custom_sdpa's library calls libtorch's MKL, whose pool would oversubscribe
    if args.threads:
        _unsafe_reset_threadpool(args.threads)     # XNNPACK uses ExecuTorch's threadpool; once per process
    pte = args.model if args.model.endswith(".pte") else os.path.join(args.model, "model.pte")
    load0 = now_ms()
    m = _load_for_executorch(pte)
    # The pybindings initialise the method (and XNNPACK packs weights) on the first execute; ExecuTorch's
    # llama_main does it in Module::load_method. One token at position 0 (overwritten by the prompt)
    # puts it in load, exactly as cdcda's ExecuTorch runner does, so TTFT is the prefill alone for both.
    m.forward((torch.tensor([[0]], dtype=torch.long), torch.tensor([0], dtype=torch.long)))
    load1 = now_ms()

    def positions(pos0: int, n: int):
        if args.input_pos == "start":
            return torch.tensor([pos0], dtype=torch.long)
        return torch.arange(pos0, pos0 + n, dtype=torch.long)

    def fwd(tokens: list[int], pos0: int) -> int:
        logits = m.forward((torch.tensor([tokens], dtype=torch.long),
                            positions(pos0, len(tokens))))[0]
        last = logits[0, -1] if logits.dim() == 3 else logits[-1] if logits.dim() == 2 else logits
        return int(torch.argmax(last).item())

    inf0 = now_ms()
    tok = fwd(ids, 0)
    first = now_ms()
    out = [tok]
    while len(out) < args.gen_len:
        tok = fwd([tok], len(ids) + len(out) - 1)
        out.append(tok)
    inf1 = now_ms()
    emit(prompt_len=len(ids), tokens=out, load0=load0, load1=load1, inf0=inf0, first=first, inf1=inf1,
         runtime={"torch": torch.__version__, "threads": args.threads or None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
