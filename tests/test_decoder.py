"""ExportDecoder == HF eager, per family and per cache strategy (tiny random models built from configs)."""

from __future__ import annotations

import pytest
import torch

from cdcda_export.errors import UserError
from cdcda_export.export.decoder import (AttnContext, CacheStrategy, ExportDecoder, available_cache_strategies,
                                         causal_mask, eager_attention, get_cache_strategy, register_cache_strategy)

TOL = 1e-5
MAX_SEQ = 64


def _config(family: str):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":  # SmolLM2 / Llama-3.2 shape: tied, llama3 rope scaling
        return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "llama-untied":
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=100000.0)
    if family == "qwen2":  # qkv bias
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norm, explicit head_dim != hidden / heads
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if family == "phi3":  # fused qkv / gate_up, untied
        return Phi3Config(**common, tie_word_embeddings=False)
    raise AssertionError(family)


FAMILIES = ("llama", "llama-untied", "qwen2", "qwen3", "phi3")
_MODELS: dict[str, object] = {}


def hf_model(family: str):
    if family not in _MODELS:
        from transformers import AutoModelForCausalLM

        cfg = _config(family)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).eval()
        if family == "qwen2":  # HF initialises biases to zero; make them matter
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(p.bias, std=0.1)
        _MODELS[family] = m
    return _MODELS[family]


def prompt(n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 256, (1, n), generator=g)


class Stepper:
    """Drives a decoder of either built-in strategy one call at a time."""

    def __init__(self, dec: ExportDecoder):
        self.dec, self.pos = dec, 0
        sp = dec.spec
        self.past = [torch.zeros(1, sp.num_kv_heads, 0, sp.head_dim) for _ in range(2 * sp.num_layers)]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if self.dec.cache.name == "io":
            out = self.dec(ids, torch.ones(1, self.pos + t, dtype=torch.long),
                           torch.arange(self.pos, self.pos + t)[None], *self.past)
            logits, self.past = out[0], list(out[1:])
        else:
            logits = self.dec(ids, causal_mask(t, self.pos + t))
        self.pos += t
        return logits


@pytest.mark.parametrize("cache", ["io", "buffer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_hf_eager(family, cache):
    model = hf_model(family)
    ids = prompt(20)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    dec = ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache=cache)
    step = Stepper(dec)
    got = [step(ids[:, :12])] + [step(ids[:, t:t + 1]) for t in range(12, 20)]
    err = (torch.cat(got, 1) - ref).abs().max().item()
    assert err <= TOL, f"{family}/{cache}: max |logit err| {err:.2e} > {TOL}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_match_hf_exactly(family):
    model = hf_model(family)
    ids = prompt(8)
    ref = ids
    with torch.no_grad():
        for _ in range(32):  # eager greedy without cache: the plainest reference there is
            nxt = model(input_ids=ref, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    ref_tokens = ref[0, 8:].tolist()
    for cache in ("io", "buffer"):
        step = Stepper(ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache=cache))
        logits = step(ids)[:, -1]
        toks = []
        for _ in range(32):
            tok = int(logits.argmax(-1))
            toks.append(tok)
            logits = step(torch.tensor([[tok]]))[:, -1]
        assert toks == ref_tokens, f"{family}/{cache}: greedy tokens differ from HF eager (exact match expected)"


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_match_hf(family):
    """The speed option of from_hf (one qkv / gate_up matmul) keeps the numbers."""
    model = hf_model(family)
    ids = prompt(16)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    dec = ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache="io", fuse_projections=True,
                                untie_lm_head=True)
    step = Stepper(dec)
    got = [step(ids[:, :10])] + [step(ids[:, t:t + 1]) for t in range(10, 16)]
    err = (torch.cat(got, 1) - ref).abs().max().item()
    assert err <= TOL, f"{family}: fused decoder max |logit err| {err:.2e} > {TOL}"


def test_delegate_friendly_norm_same_numbers():
    model = hf_model("qwen3")
    ids = prompt(10)
    a = Stepper(ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache="buffer"))(ids)
    b = Stepper(ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache="buffer", delegate_friendly_norm=True))(ids)
    assert (a - b).abs().max().item() <= 1e-6, "4-D-mean RMSNorm must match the plain one within 1e-6"


def test_pluggable_strategy_bthd_layout():
    """A third-party strategy (as ExecuTorch's custom ops use: [B, T, H, D] caches) plugs in by name."""

    @register_cache_strategy("test-bthd")
    class BTHD(CacheStrategy):
        name = "test-bthd"
        layout = "bthd"

        def setup(self, dec):
            super().setup(dec)
            sp = dec.spec
            for i in range(sp.num_layers):
                self.register_buffer(f"k{i}", torch.zeros(1, sp.max_seq_len, sp.num_kv_heads, sp.head_dim))
                self.register_buffer(f"v{i}", torch.zeros(1, sp.max_seq_len, sp.num_kv_heads, sp.head_dim))

        def prepare(self, dec, tokens, input_pos):
            start = int(input_pos[0])
            t = tokens.shape[1]
            cos, sin = dec.rope_slice(start, t)
            return AttnContext(input_ids=tokens, cos=cos, sin=sin, start=start, mask=causal_mask(t, start + t))

        def attend(self, i, q, k, v, ctx):
            assert q.shape[2] == self.spec.num_heads, "bthd layout: heads on dim 2"
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            end = ctx.start + q.shape[1]
            kc[:, ctx.start:end] = k
            vc[:, ctx.start:end] = v
            return eager_attention(q.transpose(1, 2), kc[:, :end].transpose(1, 2), vc[:, :end].transpose(1, 2),
                                   ctx.mask, self.scale)

    assert "test-bthd" in available_cache_strategies()
    model = hf_model("llama")
    ids = prompt(16)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        dec = ExportDecoder.from_hf(model, max_seq_len=MAX_SEQ, cache="test-bthd")
        got = [dec(ids[:, :10], torch.tensor([0]))] + [dec(ids[:, t:t + 1], torch.tensor([t])) for t in range(10, 16)]
    err = (torch.cat(got, 1) - ref).abs().max().item()
    assert err <= TOL, f"bthd strategy: max |logit err| {err:.2e} > {TOL}"


def test_unknown_strategy_and_family_are_user_errors():
    with pytest.raises(UserError, match=r"Cache strategy 'nope' not available. Available: \["):
        get_cache_strategy("nope")
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        ExportDecoder.from_hf(m, max_seq_len=16)
