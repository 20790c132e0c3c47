"""Reading adapter packages on the device side (no exporter imports): identity, checks, tensors.

An adapter package (``cdcda export --adapter-only``) holds one user's LoRA weights in the format's adapter
file and a manifest naming the base package it was written for (``base_package.sha256``). The base
package's identity is the sha256 of its manifest's ``files`` table (:func:`package_sha256`), which the
runtime verifies file by file on load anyway, so the check costs no hashing of the base's model files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"


def lora_input_shapes(io: dict, lora: dict) -> dict[str, tuple[int, int]]:
    """``{input name: shape}`` of a base package's LoRA inputs, in graph input order, from its manifest's
    ``io`` (decoder shape) and ``lora`` (rank, targets): ``lora.{layer}.{target}.A`` [in, r] then ``.B``
    [r, out], layer by layer, targets in q, k, v, o, gate, up, down order."""
    q_out = int(io["num_heads"]) * int(io["head_dim"])
    kv_out = int(io["num_kv_heads"]) * int(io["head_dim"])
    h, inter = int(io["hidden_size"]), int(io["intermediate_size"])
    fan = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
           "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    r = int(lora["rank"])
    out = {}
    for i in range(int(io["num_layers"])):
        for t in [t for t in fan if t in lora["targets"]]:
            out[f"lora.{i}.{t}.A"] = (fan[t][0], r)
            out[f"lora.{i}.{t}.B"] = (r, fan[t][1])
    return out


def package_sha256(manifest: dict) -> str:
    """The identity of a base package: sha256 of its ``files`` table (canonical JSON)."""
    blob = json.dumps(manifest.get("files", {}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {path.name}: not {what}", file=str(path.parent),
                        hint="build one with `cdcda export --base-package ...` / `--adapter-only ...`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot be read ({e})", file=str(path), hint="rebuild it") from None


def read_adapter_package(pkg: str | Path, base_manifest: dict | None = None) -> dict:
    """The adapter package's manifest after checking its files (sizes, sha256) and, with ``base_manifest``,
    that it was built for that base package (UserError otherwise)."""
    from .base import file_problems

    pkg = Path(pkg)
    m = read_json(pkg / MANIFEST, "an adapter package")
    if m.get("delivery") != "adapter-package":
        raise UserError("not an adapter package", file=str(pkg / MANIFEST), field="delivery",
                        expected="adapter-package", hint="write one with `cdcda export --adapter-only ...`")
    problems = file_problems(pkg, m)
    if problems:
        name, what, expected = problems[0]
        raise UserError(f"{what}: the adapter package does not match its manifest.json", file=str(pkg / name),
                        expected=expected, hint="rewrite it with `cdcda export --adapter-only ... --force`")
    if base_manifest is not None:
        want, got = package_sha256(base_manifest), (m.get("base_package") or {}).get("sha256")
        if want != got:
            raise UserError(f"built for base package {str(got)[:12]}..., but the loaded base package is "
                            f"{want[:12]}...", file=str(pkg / MANIFEST), field="base_package.sha256",
                            expected=want, hint="load the base package this adapter was written for, or rewrite "
                                                "the adapter package for this base with `cdcda export --adapter-only`")
    return m


def load_adapter_tensors(pkg: str | Path, manifest: dict) -> dict:
    """``{input name: numpy array}`` of an adapter package (ExecuTorch / Core ML; ONNX uses ORT's loader)."""
    from safetensors.numpy import load_file

    return load_file(str(Path(pkg) / manifest["adapter_file"]))


__all__ = ["lora_input_shapes", "package_sha256", "read_json", "read_adapter_package", "load_adapter_tensors"]
