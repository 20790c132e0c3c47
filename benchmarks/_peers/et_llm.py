"""ExecuTorch's own LLM export (``executorch.extension.llm.export.export_llm``) as a peer.

It is the reference for what the ExecuTorch runtime can do with a Llama-family decoder: ExecuTorch's
own transformer (``examples/models/llama``), its custom SDPA + KV-cache ops, XNNPACK, torchao 8da4w
(HQQ scales, group 32) and 4-bit embeddings (group 32), the settings of its SmolLM2 / Llama README.
It runs in the product's own venv (executorch 1.5.1 is the pinned one).

export_llm reads Meta-format checkpoints. Its SmolLM2 converter goes through torchtune (not
installed here), so the peer converts the HF directory itself, the way ``convert_weights`` does it:
rename the tensors, undo the HF q/k row permutation (HF's rotate-half RoPE vs Meta's interleaved
one) and write ``params.json`` from ``config.json``. The conversion is checked before exporting: the
eager ExecuTorch model must give the HF model's logits (max |dlogit| recorded in the results).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from .measure import timed_export

MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
# export_llm options: its documented XNNPACK 8da4w setting (examples/models/llama/README.md, SmolLM2),
# with 4-bit group-32 embeddings as optimum-executorch's row uses
OPTIONS = [
    "base.model_class=smollm2",
    "model.use_kv_cache=True",
    "model.use_sdpa_with_kv_cache=True",
    "model.dtype_override=fp32",
    "backend.xnnpack.enabled=True",
    "backend.xnnpack.extended_ops=True",
    "quantization.qmode=8da4w",
    "quantization.group_size=32",
    "quantization.embedding_quantize='4,32'",
]


def params_from_config(cfg: dict) -> dict:
    """export_llm's ``params.json`` for a HF ``LlamaForCausalLM`` config; a clear error otherwise."""
    if cfg.get("model_type") != "llama":
        raise ValueError(f"ExecuTorch's LLM export peer converts Llama-architecture models only; config.json "
                         f"has model_type={cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"ExecuTorch's LLM export peer: rope scaling {rope or cfg.get('rope_scaling')} is not converted")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError("ExecuTorch's LLM export peer: head_dim * heads != hidden_size is not converted")
    return {
        "dim": cfg["hidden_size"], "hidden_dim": cfg["intermediate_size"], "ffn_dim_multiplier": 1,
        "n_heads": cfg["num_attention_heads"], "n_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "n_layers": cfg["num_hidden_layers"], "norm_eps": cfg["rms_norm_eps"], "rope_theta": float(theta),
        "use_scaled_rope": False, "vocab_size": cfg["vocab_size"], "use_hf_rope": False,
        "attention_qkv_bias": bool(cfg.get("attention_bias")),
    }


def _unpermute(w, n_heads: int):
    """Inverse of HF's ``permute`` in convert_llama_weights_to_hf.py (rows of q / k)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def hf_to_meta(sd: dict, cfg: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k in MAP:
            out[MAP[k]] = v
            continue
        parts = k.split(".")
        if parts[:2] != ["model", "layers"]:
            raise ValueError(f"ExecuTorch's LLM export peer: unexpected tensor {k}")
        i, rest = parts[2], ".".join(parts[3:])
        if rest not in LAYER:
            raise ValueError(f"ExecuTorch's LLM export peer: unexpected tensor {k}")
        if rest == "self_attn.q_proj.weight":
            v = _unpermute(v, cfg["num_attention_heads"])
        elif rest == "self_attn.k_proj.weight":
            v = _unpermute(v, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        out[f"layers.{i}.{LAYER[rest]}"] = v
    if "output.weight" not in out:     # tied embeddings
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _fingerprint(hf_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(hf_dir.glob("*.safetensors")) + [hf_dir / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(OPTIONS).encode())
    return h.hexdigest()[:16]


def convert(hf_dir: Path, out: Path) -> dict:
    """``out/{checkpoint.pth, params.json}`` and the conversion check (eager ExecuTorch vs HF logits)."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    params = params_from_config(cfg)
    sd = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    meta = hf_to_meta(sd, cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(meta, out / "checkpoint.pth")
    (out / "params.json").write_text(json.dumps(params, indent=1))

    # conversion check: 24 positions, no KV cache, fp32
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs
    from transformers import AutoModelForCausalLM

    args = ModelArgs(**params, max_seq_len=64, max_context_len=64, use_kv_cache=False, generate_full_logits=True)
    et = construct_transformer(args).eval()
    missing, unexpected = et.load_state_dict(meta, strict=False)
    missing = [m for m in missing if "rope" not in m and "freqs" not in m]
    if missing or unexpected:
        raise ValueError(f"ExecuTorch's LLM export peer: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, cfg["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = et(tokens=ids)
        a = a[0] if isinstance(a, tuple) else a
        b = hf(ids).logits
    diff = float((a.reshape(b.shape) - b).abs().max())
    if diff > 1e-3:
        raise ValueError(f"ExecuTorch's LLM export peer: converted model differs from HF by max |dlogit| {diff:.3g} "
                         "(tolerance 1e-3); the conversion is wrong")
    return {"max_abs_logit_diff_vs_hf": diff, "positions": 24}


def export(hf_dir: Path, out: Path, log: Path, *, max_seq_len: int = 512, force: bool = False) -> dict:
    """``out/model.pte`` from export_llm (timed, peak RSS of the export process). Cached by fingerprint."""
    fp = _fingerprint(hf_dir)
    done = out / "export.json"
    if (out / "model.pte").exists() and done.exists() and not force:
        info = json.loads(done.read_text())
        if info.get("fingerprint") == fp:
            return {**info, "cached": True}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # executorch 1.5.1's Llama2Model (examples/models/llama/model.py) takes a checkpoint whose PATH contains
    # "int8" or "8da4w" for a pre-quantized one and converts the model for it; ours is float, and the export
    # then failed in torch.export ("dequantize_affine ... Expected: torch.int8, got: torch.float32", block
    # (1, 256)). So the checkpoint goes to a path without either string.
    ckpt = tmp / "ckpt"
    if "int8" in str(ckpt) or "8da4w" in str(ckpt):
        raise ValueError(f"ExecuTorch's LLM export peer: the checkpoint path {ckpt} contains 'int8' or '8da4w', "
                         "which export_llm reads as a pre-quantized checkpoint; use another output directory")
    conv = convert(hf_dir, ckpt)
    cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", *OPTIONS,
           f"base.checkpoint={ckpt / 'checkpoint.pth'}", f"base.params={ckpt / 'params.json'}",
           f"export.max_seq_length={max_seq_len}", f"export.max_context_length={max_seq_len}",
           # export_llm writes export.output_name relative to the working directory, not output_dir
           f"export.output_dir={tmp}", f"export.output_name={tmp / 'model.pte'}"]
    res = timed_export(cmd, tmp, log, "export_llm")
    if not res["ok"]:
        return res
    shutil.rmtree(ckpt)
    shutil.rmtree(tmp / "outputs", ignore_errors=True)   # hydra's run directory (logs only)
    info = {**res, "fingerprint": fp, "conversion": conv, "options": OPTIONS + [f"export.max_seq_length={max_seq_len}"]}
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def worker_cmd(out: Path, prompt_file: Path, gen_len: int, threads: int) -> list[str]:
    # same driver as optimum-executorch's .pte; export_llm's forward takes the start position only
    return [sys.executable, str(Path(__file__).with_name("optimum_et_worker.py")), "--model", str(out / "model.pte"),
            "--prompt-file", str(prompt_file), "--gen-len", str(gen_len), "--threads", str(threads),
            "--input-pos", "start"]
