"""Random-weight Hugging Face model directories with the exact configs of real small models.

No model hub is reachable, and speed, size and memory do not depend on weight values, so tests,
the demo and benchmarks build models from these configs (copied from the models' config.json) and
a byte-level BPE tokenizer trained locally on text that ships with the package. The directories
are ordinary HF directories: every command loads them exactly as it loads a user's real model.

Token ids: the configs' bos/eos/pad ids are re-pointed at the local tokenizer's special tokens
(``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2); the vocabulary size stays the
real model's (the local tokenizer uses the first ids of it), except for the ``tiny*`` test shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

# config.json of the real models (architecture fields only; token ids set below).
_SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "rope_scaling": None, "tie_word_embeddings": True, "vocab_size": 49152, "attention_bias": False,
    "mlp_bias": False, "initializer_range": 0.041666666666666664, "torch_dtype": "bfloat16",
}
_QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "max_window_layers": 24, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
    "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
_LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256, "attention_bias": False, "mlp_bias": False,
    "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
_QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "attention_bias": False, "tie_word_embeddings": True, "vocab_size": 151936, "max_window_layers": 28,
    "use_sliding_window": False, "sliding_window": None, "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
_PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32064,
    "attention_bias": False, "initializer_range": 0.02, "sliding_window": 2047, "torch_dtype": "bfloat16",
}

# google/gemma-3-270m (the base model): 5 of 6 layers sliding-window (512), two RoPE bases, 1 KV head.
_GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "query_pre_attn_scalar": 256, "sliding_window": 512,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
    "attention_bias": False, "tie_word_embeddings": True, "vocab_size": 262144, "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
}


def _shrink(cfg: dict, **kw) -> dict:
    out = dict(cfg)
    out.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": TINY_VOCAB, "max_position_embeddings": 512})
    if "head_dim" in out:
        out["head_dim"] = 16
    if out.get("rope_scaling") and out["rope_scaling"].get("rope_type") == "llama3":
        out["rope_scaling"] = dict(out["rope_scaling"], original_max_position_embeddings=128)
    if out["model_type"] == "qwen3":
        out["head_dim"] = 32  # explicit head_dim != hidden / heads, as in the real Qwen3
    if out["model_type"] == "phi3":
        out["original_max_position_embeddings"] = 512
        out["sliding_window"] = None
    if out["model_type"] == "gemma3_text":
        # one sliding and one global layer; a window of 4 so short test prompts already cross it, and
        # query_pre_attn_scalar != head_dim so a wrong attention scale shows
        out.update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                   query_pre_attn_scalar=24)
    out.update(kw)
    return out


TINY_VOCAB = 2048  # the local tokenizer's size

ARCHS: dict[str, dict] = {
    "smollm2-135m": _SMOLLM2_135M,
    "qwen2.5-0.5b": _QWEN25_05B,
    "llama-3.2-1b": _LLAMA32_1B,
    "qwen3-0.6b": _QWEN3_06B,
    "phi-3-mini": _PHI3_MINI,
    "gemma3-270m": _GEMMA3_270M,
    # Shrunk shapes of the same families, for unit tests.
    "tiny": _shrink(_SMOLLM2_135M),
    "tiny-llama": _shrink(_LLAMA32_1B),
    "tiny-qwen2": _shrink(_QWEN25_05B),
    "tiny-qwen3": _shrink(_QWEN3_06B),
    "tiny-phi3": _shrink(_PHI3_MINI),
    "tiny-gemma3": _shrink(_GEMMA3_270M),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Text that ships with the package: the sample LaMP data (all tasks) and the task prompts."""
    from importlib import resources

    from ..data import tasks as T

    lines: list[str] = [T.Q_LAMP1, T.Q_LAMP2, T.Q_LAMP2_OLD, T.Q_LAMP3, T.Q_LAMP4, T.Q_LAMP5, T.Q_LAMP7]
    root = resources.files("cdcda_export") / "assets" / "lamp_sample"
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for name in ("questions.json", "outputs.json"):
            f = task_dir / name
            if f.is_file():
                _walk_strings(json.loads(f.read_text(encoding="utf-8")), lines)
    return lines


def _walk_strings(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, list):
        for v in obj:
            _walk_strings(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_strings(v, out)


def train_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE (GPT-2 style pre-tokenizer) trained on the shipped corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def save_tokenizer(out: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None, model_max_length=model_max_length,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def init_model(arch: str, out: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write a HF model directory: config.json, model.safetensors (random), tokenizer, generation config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..utils import atomic_dir, write_json_atomic

    from .gguf import PACKAGED, init_real

    if arch in PACKAGED:   # real pretrained weights from an installed package (no random init)
        return init_real(arch, out, force=force)
    if arch not in ARCHS:
        raise UserError(f"architecture {arch!r} is not known", field="--arch",
                        expected=f"one of {', '.join([*PACKAGED, *ARCHS])}")
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        return out
    cfg_dict = dict(ARCHS[arch], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("architectures", None)
    cfg_dict.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.architectures = list(ARCHS[arch]["architectures"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if model_type == "gemma3_text":
        # Gemma's RMSNorm scales by (1 + weight) and HF initialises weight to 0: perturb the norms so that
        # random-weight Gemma bases (and the tests on them) exercise that scaling
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.1)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tmp, model_max_length=min(int(cfg_dict["max_position_embeddings"]), 131072))
        GenerationConfig(bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0, do_sample=False).save_pretrained(tmp)
        write_json_atomic(tmp / "cdcda_init.json", {"arch": arch, "seed": seed, "random_weights": True,
                                                   "note": "random weights with the exact config of a real model"})
    return out
