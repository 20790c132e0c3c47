"""Builders of real tiny adapters and of real broken artifacts, for the fidelity gate's tests.

Every fault is a real artifact directory that loads and runs; where the fault is in the model files the
manifest's file table is rewritten to match, so only the numbers can catch it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cdcda_export.export.manifest import file_table
from cdcda_export.utils import sha256_dir, write_json_atomic

MODEL_SUFFIXES = (".onnx", ".onnx.data", ".pte", ".mlpackage")


def make_adapter(base_dir: Path, out: Path, user_id: str, task: str = "LaMP-3", seed: int = 0,
                 scale: float = 0.05) -> Path:
    """A real peft LoRA adapter (all linear layers, rank 4) with random nonzero B, plus training.json.

    peft initialises B to zero (a no-op adapter); a trained adapter is not, so B is drawn here.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    meta = {"user_id": user_id, "task": task, "status": "trained",
            "base_model": {"source": str(base_dir), "sha256": sha256_dir(base_dir)},
            "adapter": {"sha256": sha256_dir(out)},
            "hyperparameters": {"seed": 0, "holdout": 0.2, "retrieve_k": 1}}
    write_json_atomic(out / "training.json", meta)
    return out


def copy_artifact(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))


def rehash(art: Path) -> None:
    """Rewrite the manifest's file table to the files now on disk (what a careless tool would do)."""
    m = _manifest(art)
    m["files"] = file_table(art)
    write_json_atomic(art / "manifest.json", m)


def transplant_model(model_from: Path, manifest_from: Path, out: Path) -> Path:
    """``manifest_from``'s manifest with ``model_from``'s model files (hashes updated): e.g. the artifact of
    one user carrying another user's weights, or the base model's weights (exported without the adapter)."""
    copy_artifact(manifest_from, out)
    for f in list(out.iterdir()):
        if f.name.endswith(MODEL_SUFFIXES):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in model_from.iterdir():
        if f.name.endswith(MODEL_SUFFIXES):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
    rehash(out)
    return out


def _onnx_path(art: Path) -> Path:
    return art / "model.onnx"


def _save_onnx(model, path: Path) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def perturb_onnx_layer(src: Path, out: Path, layer: int, rel: float = 0.05, seed: int = 0) -> tuple[Path, str]:
    """Add noise (``rel`` x the weights' std) to the MLP output projection of decoder layer ``layer``
    (the MatMul feeding that layer's second residual Add); returns (artifact, initializer name).
    Hashes updated in the manifest."""
    import onnx
    from onnx import numpy_helper

    from cdcda_export.check.localise import onnx_residual_tensors

    copy_artifact(src, out)
    model = onnx.load(str(_onnx_path(out)))
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    chain = onnx_residual_tensors(g)
    add = producers[chain[2 * layer + 2]]                     # h + mlp(...) of this layer
    branch = add.input[1] if add.input[0] == chain[2 * layer + 1] else add.input[0]
    matmul = producers[branch]
    if matmul.op_type != "MatMul":
        raise RuntimeError(f"layer {layer}: the MLP branch is produced by {matmul.op_type}, not MatMul")
    target = matmul.input[1]
    init = next(t for t in g.initializer if t.name == target)
    w = numpy_helper.to_array(init).astype(np.float32)
    rng = np.random.default_rng(seed)
    w2 = (w + rng.standard_normal(w.shape).astype(np.float32) * w.std() * rel).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(w2, name=target))
    _save_onnx(model, _onnx_path(out))
    rehash(out)
    return out, target


def break_kv_cache(src: Path, out: Path) -> Path:
    """An ONNX artifact whose KV cache is not updated between decode steps.

    Each ``present.{i}.key|value`` output becomes ``concat(past, zeros)`` instead of ``concat(past, new)``:
    the cache grows but the new tokens' keys/values are never written into it. Attention *inside* one
    call still sees the real values (the original present tensor is kept for it), so prefill logits are
    exact -- only the decode path shows the fault. Works whatever produces ``present`` (a ``Concat`` of
    the portable graph or ``GroupQueryAttention``).
    """
    import onnx
    from onnx import TensorProto, helper

    copy_artifact(src, out)
    model = onnx.load(str(_onnx_path(out)))
    g = model.graph
    present = [o.name for o in g.output if o.name.startswith("present.")]
    g.initializer.extend([helper.make_tensor("cdcda_fault_zero", TensorProto.FLOAT, [], [0.0]),
                          helper.make_tensor("cdcda_fault_end", TensorProto.INT64, [1], [2 ** 62]),
                          helper.make_tensor("cdcda_fault_axis", TensorProto.INT64, [1], [2])])
    new_nodes = []
    for name in present:
        past = "past_key_values." + name[len("present."):]
        prod = next(n for n in g.node if name in n.output)
        internal = name + "__attn"
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == name:
                    n.input[k] = internal
        prod.output[list(prod.output).index(name)] = internal
        p_len, new, zeros = name + "__past_len", name + "__new", name + "__zeros"
        new_nodes += [
            helper.make_node("Shape", [past], [p_len], start=2, end=3, name=f"fault_shape_{name}"),
            helper.make_node("Slice", [internal, p_len, "cdcda_fault_end", "cdcda_fault_axis"], [new],
                             name=f"fault_slice_{name}"),
            helper.make_node("Mul", [new, "cdcda_fault_zero"], [zeros], name=f"fault_mul_{name}"),
            helper.make_node("Concat", [past, zeros], [name], axis=2, name=f"fault_concat_{name}")]
    g.node.extend(new_nodes)
    _save_onnx(model, _onnx_path(out))
    rehash(out)
    return out


def point_base_at(src: Path, out: Path, other_base: Path) -> Path:
    """The artifact with its manifest's base_model.source pointing at another model dir (hash kept)."""
    copy_artifact(src, out)
    m = _manifest(out)
    m["base_model"]["source"] = str(other_base)
    write_json_atomic(out / "manifest.json", m)
    return out
