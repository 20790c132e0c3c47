"""The reference an artifact is judged against: base + adapter, merged, eager PyTorch, float32.

It is rebuilt from the artifact's manifest (``base_model`` / ``adapter``: source and sha256). The
directories found on disk must hash to the manifest's values (``utils.sha256_dir``, the hash the
exporter recorded); a mismatch is a :class:`UserError`, never a silent comparison against the wrong
model. ``base=``/``adapter=`` point at moved copies (the hashes must still match).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..utils import sha256_dir, sha256_file


@dataclass(frozen=True)
class ReferenceKey:
    base_sha256: str
    adapter_sha256: str | None


def _locate(kind: str, recorded: dict, override: str | Path | None, art: Path, flag: str) -> Path:
    path = Path(override) if override is not None else Path(recorded.get("source") or "")
    if override is not None and kind == "base model":
        from ..models.gguf import resolve_base

        path = resolve_base(path)   # --base X.gguf: its cached HF conversion
    if not str(path) or not path.is_dir():
        raise UserError(f"the {kind} this artifact was exported from is not on disk at {str(path)!r}",
                        file=str(art / "manifest.json"), field=f"{'base_model' if kind == 'base model' else 'adapter'}.source",
                        expected=f"a directory whose sha256_dir is {recorded.get('sha256')}",
                        hint=f"pass {flag} DIR pointing at the {kind} (e.g. `cdcda check {art} {flag} DIR ...`)")
    return path


def verify_sources(art: Path, manifest: dict, base: str | Path | None = None,
                   adapter: str | Path | None = None) -> tuple[Path, Path | None, ReferenceKey]:
    """Find the base (and adapter) of an artifact and check their hashes against the manifest."""
    mb = manifest.get("base_model") or {}
    if not mb.get("sha256"):
        raise UserError("manifest has no base_model.sha256; the reference cannot be verified",
                        file=str(art / "manifest.json"), field="base_model.sha256",
                        hint="re-export the artifact with `cdcda export ...`")
    base_dir = _locate("base model", mb, base, art, "--base")
    got = sha256_dir(base_dir)
    if got != mb["sha256"]:
        raise UserError(
            f"the base model at {base_dir} does not match the one this artifact was exported from "
            f"(sha256_dir {got[:16]}..., manifest {mb['sha256'][:16]}...); refusing to compare against the wrong model",
            file=str(art / "manifest.json"), field="base_model.sha256", expected=mb["sha256"],
            hint="point --base at the exact base model the artifact was exported from, or re-export the artifact "
                 "from this base with `cdcda export --base DIR ...`")
    ma = manifest.get("adapter")
    adapter_dir = None
    if ma:
        adapter_dir = _locate("adapter", ma, adapter, art, "--adapter")
        got_a = sha256_dir(adapter_dir)
        if got_a != ma.get("sha256"):
            raise UserError(
                f"the adapter at {adapter_dir} does not match the one this artifact was exported from "
                f"(sha256_dir {got_a[:16]}..., manifest {str(ma.get('sha256'))[:16]}...)",
                file=str(art / "manifest.json"), field="adapter.sha256", expected=str(ma.get("sha256")),
                hint="point --adapter at the exact adapter, or re-export with `cdcda export --adapter DIR ...`")
    elif adapter is not None:
        raise UserError("--adapter was given but the artifact was exported without an adapter",
                        file=str(art / "manifest.json"), field="adapter", expected="null in the manifest",
                        hint="drop --adapter, or re-export with the adapter")
    return base_dir, adapter_dir, ReferenceKey(mb["sha256"], (ma or {}).get("sha256"))


class Reference:
    """The eager merged model, with its tokenizer, and cached results per token sequence."""

    def __init__(self, base_dir: Path, adapter_dir: Path | None, key: ReferenceKey):
        from ..export.api import load_merged_model

        self.base_dir, self.adapter_dir, self.key = base_dir, adapter_dir, key
        self.model = load_merged_model(base_dir, adapter_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.tokenizer_sha256 = sha256_file(base_dir / "tokenizer.json")
        cfg = self.model.config
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else cfg.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        self.num_layers = int(cfg.num_hidden_layers)
        self._greedy: dict[tuple, list[int]] = {}
        self._logits: dict[tuple, np.ndarray] = {}

    def describe(self) -> dict:
        return {"base_model": {"source": str(self.base_dir), "sha256": self.key.base_sha256, "verified": True},
                "adapter": ({"source": str(self.adapter_dir), "sha256": self.key.adapter_sha256, "verified": True}
                            if self.adapter_dir else None),
                "merged": self.adapter_dir is not None, "framework": "transformers (eager attention)",
                "dtype": "float32", "model_type": self.model.config.model_type,
                "num_layers": self.num_layers, "tokenizer_sha256": self.tokenizer_sha256}

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """Token ids as training and evaluation make them (``train.format.encode_prompt``: cut from the left)."""
        from ..train.format import encode_prompt

        return encode_prompt(self.tokenizer, text, max_tokens)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, vocab] of every position of ``ids`` in one cache-free forward."""
        key = tuple(ids)
        if key not in self._logits:
            import torch

            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            self._logits[key] = out.to(torch.float32).numpy()
        return self._logits[key]

    def greedy(self, ids: list[int], n: int, eos_ids: list[int] | None = None) -> list[int]:
        """Greedy continuation of ``ids`` (HF's own KV cache), ``n`` tokens or until an EOS in ``eos_ids``."""
        key = (tuple(ids), n, tuple(eos_ids or ()))
        if key not in self._greedy:
            import torch

            out: list[int] = []
            with torch.no_grad():
                res = self.model(input_ids=torch.tensor([ids]), use_cache=True)
                past = res.past_key_values
                for _ in range(n):
                    tok = int(res.logits[0, -1].argmax())
                    out.append(tok)
                    if eos_ids and tok in eos_ids:
                        break
                    if len(out) == n:
                        break
                    res = self.model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                    past = res.past_key_values
            self._greedy[key] = out
        return self._greedy[key]

    def layer_states(self, ids: list[int]) -> list[np.ndarray]:
        """Residual stream [T, hidden] after the embedding and after each decoder layer (L + 1 arrays)."""
        import torch

        states: list[Any] = []
        hooks = [self.model.model.embed_tokens.register_forward_hook(lambda m, i, o: states.append(o))]
        for layer in self.model.model.layers:
            hooks.append(layer.register_forward_hook(
                lambda m, i, o: states.append(o[0] if isinstance(o, (tuple, list)) else o)))
        try:
            with torch.no_grad():
                self.model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return [s[0].to(torch.float32).numpy() for s in states]


_CACHE: dict[ReferenceKey, Reference] = {}


def get_reference(art: Path, manifest: dict, base: str | Path | None = None,
                  adapter: str | Path | None = None) -> Reference:
    """The verified reference of an artifact; one per (base, adapter) hash pair in this process."""
    base_dir, adapter_dir, key = verify_sources(art, manifest, base, adapter)
    if key not in _CACHE:
        _CACHE[key] = Reference(base_dir, adapter_dir, key)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
