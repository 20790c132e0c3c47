"""ExecuTorch runner for ``format: executorch`` artifacts (``model.pte``).

The program has one method, ``forward(tokens [1, T] int64, input_pos [1] int64) -> logits``,
whose KV cache lives in the program's mutable buffers: prefill feeds chunks of up to the artifact's
``prefill_len`` tokens (``static_seq`` for delegates without dynamic shapes), decode one token, and
the runner keeps the position. ``reset()`` only rewinds the position: cache rows past it are
never read (attention is causal from ``input_pos``) and are overwritten as the sequence grows.

Logits are ``[1, T, V]`` (every fed position) or, with ``io.prefill_logits: last`` (the XNNPACK
recipes' default), ``[1, 1, V]``: the lm_head runs on the last position only. ``prefill_last`` is
the fast path generation uses; ``prefill`` still returns every position's logits (for the
fidelity check) by feeding such an artifact one token at a time -- the same math, per position.

Loading runs the method once on one token (position 0, rewound after): ExecuTorch initialises
the method and XNNPACK packs its weights on the first execute, which ``llama_main`` does inside
``Module::load_method`` and the pybindings do lazily. So ``load`` pays it, as in ExecuTorch's own
runner, and TTFT is the prompt's prefill alone.

Threads: ``threads`` sizes ExecuTorch's own threadpool (XNNPACK and the custom ops use it). The custom-op
library links libtorch, whose MKL opens an OpenMP team per calling thread unless ``OMP_NUM_THREADS=1`` was
in the environment when torch was imported; ``cdcda bench`` children set it (``bench_runner.CHILD_ENV``).
A process that loads a .pte with threads > 1 after importing torch without it gets a slower prefill.

Imports only numpy and the ExecuTorch runtime (pybindings, which use torch tensors for I/O) plus
the kernel libraries the program calls: ``llama::update_cache``/``custom_sdpa`` and the quantized
embedding kernels. Nothing from the exporters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import RuntimeUnavailable, chunked_prefill

_THREADS: int | None = None   # ExecuTorch's threadpool size, set once per process


def set_threads(n: int) -> int:
    """Size ExecuTorch's threadpool (XNNPACK uses it, not torch's) once per process; returns the size.

    Resizing it again in the same process hung on executorch 1.5.1, so a later, different request
    keeps the first size and warns (measure other thread counts in a new process).
    """
    global _THREADS
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if _THREADS is None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
        _THREADS = n
    elif _THREADS != n:
        import warnings

        warnings.warn(f"ExecuTorch's threadpool was already sized to {_THREADS} threads in this process "
                      f"(resizing it mid-process hangs); keeping {_THREADS}, not {n}. Use a new process for "
                      f"threads={n}.", RuntimeWarning, stacklevel=3)
    return _THREADS


def _load_kernels() -> None:
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama::update_cache, custom_sdpa
        import executorch.kernels.quantized  # noqa: F401  quantized embedding kernels
    except ImportError as e:  # pragma: no cover - depends on the host
        raise RuntimeUnavailable(f"the ExecuTorch runtime is not installed ({e}); pip install executorch==1.5.1") from e


class ExecuTorchRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int | None = None):
        io = manifest["io"]
        if io.get("backend") == "coreml" and sys.platform != "darwin":
            raise RuntimeUnavailable(
                f"{artifact_dir}: this .pte is delegated to Core ML, which runs only on macOS/iOS "
                f"(this host is {sys.platform}). Run it on a Mac or an Apple device, or export an XNNPACK "
                "recipe (executorch/xnnpack-8da4w) for this host.")
        _load_kernels()
        # The recipe's xnnpack.threads is the default (1: decode is memory-bound and 2 threads
        # made it slower and erratic on a 2-core VM).
        threads = threads or ((manifest.get("recipe", {}).get("resolved") or {}).get("xnnpack") or {}).get("threads")
        self.threads = set_threads(threads) if threads else None   # None: ExecuTorch's default pool
        import torch
        from executorch.extension.pybindings.portable_lib import _load_for_executorch

        self._torch = torch
        self.manifest = manifest
        self.max_seq_len = int(io["max_seq_len"])
        self.prefill_len = int(io.get("static_seq") or io.get("prefill_len") or 1)
        path = artifact_dir / io.get("model_file", "model.pte")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; re-export the artifact with `cdcda export ...`")
        # custom_sdpa's kernel library links libtorch, whose MKL/OpenMP pool would add threads on top
        # of ExecuTorch's own threadpool (oversubscribing the cores); torch here only carries I/O.
        torch.set_num_threads(1)
        self.last_only = io.get("prefill_logits") == "last"
        self.module = _load_for_executorch(str(path))
        self.lora: tuple = ()          # base packages: the LoRA inputs fed after tokens/input_pos
        self.adapter = None
        if manifest.get("delivery") == "base-package":
            from .adapters import lora_input_shapes

            self.lora_shapes = lora_input_shapes(io, manifest["lora"])
            self._set_lora({})
        self.position = 0
        self._run([0])          # method init + XNNPACK weight packing now, not in the first prefill
        self.position = 0

    def reset(self) -> None:
        self.position = 0

    def _set_lora(self, tensors: dict) -> None:
        torch = self._torch
        lora_io = self.manifest["io"].get("lora") or {}
        dt = getattr(torch, lora_io.get("input_dtype") or self.manifest["lora"].get("dtype", "float16"))
        self.lora = tuple(torch.from_numpy(tensors[n]).to(dt).contiguous() if n in tensors else torch.zeros(shape, dtype=dt)
                          for n, shape in self.lora_shapes.items())

    def set_adapter(self, package) -> float:
        """Make one user's adapter package active (``None``: the plain base, zero LoRA inputs) without reloading
        the program: its ``adapter.safetensors`` tensors become the method's LoRA inputs. Checks the package's
        files and that it names this base package's hash. Returns the seconds it took."""
        import time

        from ..errors import UserError
        from .adapters import load_adapter_tensors, read_adapter_package

        t0 = time.perf_counter()
        if self.manifest.get("delivery") != "base-package":
            raise UserError("this artifact takes no adapter (it is not a base package)", field="delivery",
                            expected="base-package")
        if package is None:
            self._set_lora({})
            self.adapter = None
            return time.perf_counter() - t0
        m = read_adapter_package(package, self.manifest)
        tensors = load_adapter_tensors(package, m)
        bad = [n for n, shape in self.lora_shapes.items() if n in tensors and tuple(tensors[n].shape) != tuple(shape)]
        if bad:
            raise UserError(f"{bad[0]} has shape {list(tensors[bad[0]].shape)}, the base package takes "
                            f"{list(self.lora_shapes[bad[0]])}", file=str(Path(package) / m["adapter_file"]),
                            hint="rewrite the adapter package for this base package (`cdcda export --adapter-only`)")
        self._set_lora(tensors)
        self.adapter = {"package": str(package), "user_id": m.get("user_id")}
        return time.perf_counter() - t0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        t = len(ids)
        if self.position + t > self.max_seq_len:
            raise ValueError(f"{self.position + t} tokens exceed max_seq_len={self.max_seq_len}; call reset()")
        torch = self._torch
        tokens = torch.tensor([list(ids)], dtype=torch.long)
        pos = torch.tensor([self.position], dtype=torch.long)
        logits = self.module.forward((tokens, pos, *self.lora))[0]
        self.position += t
        return logits[0].numpy()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        # A last-position-logits program gives every position's logits only one token per call.
        return chunked_prefill(self._run, token_ids, 1 if self.last_only else self.prefill_len)

    def prefill_last(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed the prompt in ``prefill_len`` chunks; only the last position's logits [vocab]."""
        return chunked_prefill(self._run, token_ids, self.prefill_len, last=True)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([int(token_id)])[-1].astype(np.float32, copy=False)


def load(artifact_dir: Path, manifest: dict, threads: int | None = None, **_options) -> ExecuTorchRunner:
    return ExecuTorchRunner(Path(artifact_dir), manifest, threads=threads)
