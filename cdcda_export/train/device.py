"""Where training runs: ``--device auto|cpu|cuda|mps`` and ``--precision auto|fp32|bf16|fp16``.

``auto`` device: CUDA when ``torch.cuda.is_available()``, else MPS when ``torch.backends.mps.is_available()``,
else the CPU. ``auto`` precision: bf16 autocast on a CUDA GPU that supports bf16, fp16 autocast with a
``GradScaler`` on other CUDA GPUs, fp32 on the CPU and on MPS. Autocast only changes the dtype of the
forward's matmuls: the LoRA weights, the optimizer state and the saved adapter stay fp32.

On the CPU in fp32 the training loop runs exactly the operations it ran before devices existed: the same
adapter bytes for the same seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def available_devices() -> list[str]:
    """The devices torch can train on in this process, CPU last (e.g. ``["cuda", "cpu"]``)."""
    import torch

    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def _why_not(device: str) -> str:
    import torch

    if device == "cuda":
        build = torch.version.cuda
        if not build:
            return f"this torch ({torch.__version__}) is a CPU-only build"
        return f"torch {torch.__version__} was built with CUDA {build} but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        return f"this torch ({torch.__version__}) has no MPS support (Apple silicon + macOS only)"
    return "MPS is built in but not available on this machine"


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision: what the training loop needs, and what training.json records."""

    requested_device: str
    requested_precision: str
    device: str                 # cpu | cuda | mps
    precision: str              # fp32 | bf16 | fp16

    @property
    def autocast_dtype(self):
        import torch

        return getattr(torch, _DTYPES[self.precision]) if self.precision in _DTYPES else None

    @property
    def uses_scaler(self) -> bool:
        """fp16 on CUDA: gradients are scaled so that small ones do not underflow (bf16 needs none)."""
        return self.precision == "fp16" and self.device == "cuda"

    def autocast(self):
        """The forward's autocast context (a no-op context in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)

    def scaler(self):
        if not self.uses_scaler:
            return None
        import torch

        return torch.amp.GradScaler("cuda")

    def record(self) -> dict[str, Any]:
        """training.json's ``device`` block: requested and resolved device/precision, torch and CUDA versions."""
        import torch

        rec: dict[str, Any] = {"requested": {"device": self.requested_device, "precision": self.requested_precision},
                               "device": self.device, "precision": self.precision,
                               "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
                               "grad_scaler": self.uses_scaler, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "gpu": None}
        if self.device == "cuda":
            idx = torch.cuda.current_device()
            rec["gpu"] = torch.cuda.get_device_name(idx)
            rec["cudnn"] = torch.backends.cudnn.version()
            rec["capability"] = ".".join(map(str, torch.cuda.get_device_capability(idx)))
        return rec


def resolve_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """The device and precision to train with, or a UserError naming the flag and what is available."""
    import torch

    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not a device", field="--device", expected=" | ".join(DEVICES))
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not a precision", field="--precision",
                        expected=" | ".join(PRECISIONS))
    avail = available_devices()
    if device == "auto":
        dev = avail[0]
    elif device in avail:
        dev = device
    else:
        raise UserError(f"--device {device} is not available: {_why_not(device)}", field="--device",
                        expected=f"one of the devices available here: {', '.join(avail)} (or auto)",
                        hint="leave --device out (auto picks the best available) or pass --device cpu")
    if precision == "auto":
        prec = "fp32"
        if dev == "cuda":
            prec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        prec = precision
    if dev == "cpu" and prec == "fp16":
        raise UserError("--precision fp16 is for GPUs: CPU autocast in fp16 is slow and needs loss scaling",
                        field="--precision", expected="fp32 (or bf16) with --device cpu")
    if dev == "cuda" and prec == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: this GPU ({torch.cuda.get_device_name()}) does not support bfloat16",
                        field="--precision", expected="fp16 (with loss scaling) or fp32, or auto")
    return Placement(device, precision, dev, prec)
