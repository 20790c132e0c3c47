"""Minimal reproduction: ExecuTorch 1.5.1 + torchao 0.18 lower a weight-only int8 linear to XNNPACK
with wrong numerics.

One ``nn.Linear(64, 48)`` quantized with torchao's ``IntxWeightOnlyConfig(weight_dtype=torch.int8)``
(per channel or per group of 32; float activations) matches eager to ~6e-3 before lowering. After
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` the .pte's output differs from
the quantized eager module by ~1.6e3 on outputs of magnitude ~1.5 -- the size of the int8 values
themselves: the .pte returns ``x @ q^T`` exactly (checked 2026-11-27: ratio 1.0000 in every output
column), i.e. the per-channel scales are dropped. Dynamic-activation 8da8w (same weights) lowers correctly.
Seen 2026-11-26 on x86-64 (AVX-512); no upstream issue found in the public trackers.

Cause (executorch 1.5.1, backends/xnnpack/partition/config/gemm_configs.py): ``GEMMConfig._detect_precision``
calls a linear whose weight is a ``dequantize`` and whose input is float STATIC_QUANT, and STATIC_QUANT needs
a dequantized input and a quantized output, so no config takes the linear together with its weight. The
weight's ``dequantize_affine`` is lowered apart from it and loses its scales. The serializer and the runtime
do handle the pair: ``op_linear`` writes an fp32 input, a per-channel qcint8 filter and an fp32 output, and
XNNPACK runs it with its f32 x qc8w kernels.

Run: python benchmarks/repros/xnnpack_weight_only_int8.py   (prints the errors; exit 1 while broken)

Where we work around it: ``cdcda_export/export/executorch.py``, ``_weight_only_linear_config``: a
``LinearConfig`` subclass that takes that pair (no bias) and is passed to ``XnnpackPartitioner(configs=...)``
for the int8wo scheme (recipe ``executorch/xnnpack-int8``) and int8 lm_heads. Weight-only int4 (int4wo)
stays refused: XNNPACK's blockwise int4 kernels need dynamically quantized activations.
"""

from __future__ import annotations

import sys


def errors() -> dict[str, tuple[float, float]]:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    import executorch.kernels.quantized  # noqa: F401  (registers the quantized kernels)

    out = {}
    torch.manual_seed(0)
    for name, gran in (("per-channel", PerAxis(0)), ("group-32", PerGroup(32))):
        m = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).eval()
        x = torch.randn(3, 64)
        quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=gran))
        with torch.no_grad():
            eager = m(x)
            ep = torch.export.export(m, (x,), strict=True)
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        got = _load_for_executorch_from_buffer(prog.buffer).forward((x,))[0]
        out[name] = (float((got - eager).abs().max()), float(eager.abs().max()))
    return out


if __name__ == "__main__":
    errs = errors()
    for k, (err, mag) in errs.items():
        print(f"{k}: max |pte - eager quantized| = {err:.4g} (outputs up to {mag:.3g})")
    sys.exit(1 if any(err > 1e-2 * max(mag, 1.0) for err, mag in errs.values()) else 0)
