"""Minimal reproduction: ExecuTorch 1.5.1's XNNPACK delegate runs ``gelu(x, approximate="tanh")`` as the exact
(erf) GELU.

``nn.functional.gelu(x, approximate="tanh")`` on x in [-6, 6], lowered with
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])``: the .pte's output is 7.9e-7 from
the *erf* GELU and 4.73e-4 from the tanh GELU it was asked for (the largest gap between the two forms, near
|x| = 2.7). The same formula written out (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``) lowers to
XNNPACK's tanh / mul / add and is 7.8e-7 from the tanh GELU. Measured 2026-11-28 on x86-64 (AVX2).

Upstream: pytorch/executorch PR #22851, "XNNPACK: Route tanh GELU to approxgelu" (the backend serialized both
modes as ``XNNGelu``; merged 2026-09, after 1.5.1; it needs a re-export and a new runtime).

Why it matters here: Gemma 3's MLP is GeGLU with ``gelu_pytorch_tanh``. 18 layers of 4.7e-4 per activation put
the real Gemma 3 270M's fp32 ``.pte`` 1e-2..6e-2 logits from eager.

Run: python benchmarks/repros/xnnpack_gelu_tanh.py   (prints the errors; exit 1 while broken)

Where we work around it: ``cdcda_export/export/decoder.py``, ``spell_out_gelu_tanh``, called by
``export_executorch`` before lowering.
"""

from __future__ import annotations

import sys


def errors() -> dict[str, float]:
    """Max |pte - tanh GELU| (float64 reference) for ``aten.gelu(approximate="tanh")`` and for the spelled-out
    formula, each lowered to XNNPACK."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from cdcda_export.export.decoder import gelu_tanh_spelled_out

    class Act(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return self.f(x)

    x = torch.linspace(-6, 6, 4001).reshape(1, -1)
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    out = {}
    for name, f in (("aten.gelu(approximate='tanh')", lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
                     ("spelled out", gelu_tanh_spelled_out)):
        ep = torch.export.export(Act(f).eval(), (x,), strict=True)
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        got = _load_for_executorch_from_buffer(prog.buffer).forward((x,))[0]
        out[name] = float((got.double() - ref).abs().max())
    return out


if __name__ == "__main__":
    errs = errors()
    for k, err in errs.items():
        print(f"{k}: max |pte - tanh GELU| = {err:.3g}")
    sys.exit(1 if errs["aten.gelu(approximate='tanh')"] > 1e-5 else 0)
