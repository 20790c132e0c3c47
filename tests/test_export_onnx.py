"""ONNX exports of every family: run them with ONNX Runtime (and ORT GenAI) against the eager model.

Artifacts come from the session-cached ``tiny_artifact`` factory (tests/conftest.py), so other
areas' tests (check, bench) reuse them instead of exporting again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdcda_export import runtime
from cdcda_export.export.manifest import REQUIRED_KEYS, verify

FAMILIES = ("tiny", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3")
PROMPT = [5, 17, 42, 99, 123, 7, 300, 64, 12, 1000]
LOGIT_TOL = 1e-4



def eager_greedy(model_dir, prompt, n):
    """Reference: the eager HF model, full forward each step (no cache), logits of prompt + each step."""
    import torch

    from cdcda_export.export.api import load_merged_model

    model = load_merged_model(model_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=False).logits[0].numpy()
        steps, toks = [], []
        logits = prefill[-1]
        for _ in range(n):
            tok = int(np.argmax(logits))
            toks.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].numpy()
            steps.append(logits)
    return prefill, toks, steps


@pytest.mark.integration
@pytest.mark.parametrize("arch", FAMILIES)
def test_fp32_reproduces_eager_greedy_and_logits(arch, tiny_model_dir, tiny_artifact):
    art = tiny_artifact(arch, "onnx/fp32")
    prefill_ref, toks_ref, steps_ref = eager_greedy(tiny_model_dir(arch), PROMPT, 32)
    r = runtime.load(art, threads=1)
    prefill = r.prefill(PROMPT)
    err = float(np.abs(prefill - prefill_ref).max())
    assert err <= LOGIT_TOL, f"{arch}: prefill max |logit err| {err:.2e} > {LOGIT_TOL}"
    res = runtime.greedy_generate(r, PROMPT, 32, keep_logits=True)
    assert res.tokens == toks_ref, f"{arch}: greedy 32 tokens differ from eager (exact match expected)"
    # keep_logits[i] is the logits the i-th token was chosen from: [prefill last, decode 1, ...]
    dec_err = max(float(np.abs(a - b).max()) for a, b in zip(res.logits[1:], steps_ref))
    assert dec_err <= LOGIT_TOL, f"{arch}: decode max |logit err| {dec_err:.2e} > {LOGIT_TOL}"
    assert r.position == len(PROMPT) + 31
    # chunked prefill (a prompt longer than the artifact's prefill length continues from a filled cache)
    r.reset()
    r.prefill_len = 4
    chunked = r.prefill(PROMPT)
    err = float(np.abs(chunked - prefill_ref).max())
    assert err <= LOGIT_TOL, f"{arch}: chunked prefill max |logit err| {err:.2e} > {LOGIT_TOL}"


@pytest.mark.integration
def test_portable_attention_variant(tiny_model_dir, tiny_artifact):
    """``onnx.attention: portable`` (plain ONNX ops, no contrib op) gives the same numbers."""
    art = tiny_artifact("tiny-qwen3", "onnx/fp32", **{"onnx.attention": "portable"})
    ops = json.loads((art / "manifest.json").read_text())["quantization_applied"]["op_counts"]
    assert "GroupQueryAttention" not in ops and ops.get("Softmax") == 2
    assert json.loads((art / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    prefill_ref, toks_ref, _ = eager_greedy(tiny_model_dir("tiny-qwen3"), PROMPT, 32)
    r = runtime.load(art)
    err = float(np.abs(r.prefill(PROMPT) - prefill_ref).max())
    assert err <= LOGIT_TOL, f"portable: max |logit err| {err:.2e} > {LOGIT_TOL}"
    assert runtime.greedy_generate(r, PROMPT, 32).tokens == toks_ref


@pytest.mark.integration
def test_fp32_graph_has_explicit_kv_io(tiny_artifact):
    import onnx

    art = tiny_artifact("tiny", "onnx/fp32")
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in ins and "past_key_values.1.value" in ins
    assert outs[0] == "logits" and "present.1.value" in outs
    past = next(i for i in m.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim]
    assert isinstance(dims[2], str), f"past sequence length must be dynamic, got {dims}"
    cfg = json.loads((art / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert cfg["search"]["past_present_share_buffer"] is True   # GQA updates one KV buffer in place
    man = json.loads((art / "manifest.json").read_text())
    assert man["io"]["share_buffer"] is True
    assert man["io"]["inputs"]["past_key_values.{i}.key"]["shape"][2] == "max_seq_len"


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-qwen2"])
def test_gqa_strategy_eager_matches_hf(share, arch, tiny_model_dir):
    """The ``ort-gqa`` strategy's torch reference (what gets exported) equals HF eager, both KV modes:
    Qwen3 (per-head q/k norm: separate q, k, v) and Qwen2 (fused qkv with bias: packed-QKV form)."""
    import torch

    from cdcda_export.export.api import load_merged_model
    from cdcda_export.export.decoder import ExportDecoder
    from cdcda_export.export.onnx import cache_strategy

    model = load_merged_model(tiny_model_dir(arch))
    calls = []
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0]
        dec = ExportDecoder.from_hf(model, max_seq_len=64, cache=cache_strategy("ort-gqa", share),
                                    fuse_projections=True)
        gqa = dec.cache._gqa
        dec.cache._gqa = lambda i, q, k, v, ctx: calls.append(k is None) or gqa(i, q, k, v, ctx)
        sp = dec.spec
        n = 64 if share else 0
        past = [torch.zeros(1, sp.num_kv_heads, n, sp.head_dim) for _ in range(2 * sp.num_layers)]
        got, pos = [], 0
        for chunk in (PROMPT[:6], PROMPT[6:8], PROMPT[8:9], PROMPT[9:]):
            t = len(chunk)
            out = dec(torch.tensor([chunk]), torch.ones(1, pos + t, dtype=torch.long),
                      torch.arange(pos, pos + t)[None], *past)
            got.append(out[0][0])
            past = list(out[1:])
            pos += t
    err = (torch.cat(got) - ref).abs().max().item()
    assert err <= 1e-5, f"ort-gqa {arch} share={share}: max |logit err| {err:.2e} > 1e-5"
    assert set(calls) == {arch == "tiny-qwen2"}, f"{arch}: packed-QKV calls {calls}"


@pytest.mark.integration
def test_onnxruntime_genai_runs_the_artifact(tiny_artifact):
    """ORT GenAI (its own runtime, reading genai_config.json) generates the same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    art = tiny_artifact("tiny-qwen2", "onnx/fp32")
    model = og.Model(str(art))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    while not gen.is_done():
        gen.generate_next_token()
    theirs = [int(t) for t in gen.get_sequence(0)][len(PROMPT):]
    eos = json.loads((art / "manifest.json").read_text())["io"]["eos_token_ids"]
    ours = runtime.greedy_generate(runtime.load(art), PROMPT, 16, eos_ids=eos).tokens
    assert theirs and theirs == ours[:len(theirs)], f"ORT GenAI {theirs} vs ours {ours}"


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["onnx/fp32", "onnx/int4"])
def test_genai_engine_runner_matches_onnxruntime_runner(recipe, tiny_artifact):
    """``runtime.load(art, engine="onnxruntime-genai")`` (ORT GenAI's generator) gives the logits of the
    onnxruntime session loop: every prefill position (fed one token per call), the prompt's last position
    in one call, and each decode step; same greedy tokens."""
    art = tiny_artifact("tiny-qwen2", recipe)
    ref, og = runtime.load(art, threads=1), runtime.load(art, threads=1, engine="onnxruntime-genai")
    tol = 1e-4 if recipe == "onnx/fp32" else 2e-3   # int4: same kernels, batched vs one-token prefill rounding
    err = float(np.abs(og.prefill(PROMPT) - ref.prefill(PROMPT)).max())
    assert err <= tol, f"{recipe}: genai prefill max |logit err| {err:.2e} > {tol}"
    a = runtime.greedy_generate(ref, PROMPT, 16, keep_logits=True)
    b = runtime.greedy_generate(og, PROMPT, 16, keep_logits=True)
    assert a.tokens == b.tokens
    err = max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits))
    assert err <= tol, f"{recipe}: genai generate max |logit err| {err:.2e} > {tol}"
    assert og.position == len(PROMPT) + 15
    with pytest.raises(ValueError, match="max_seq_len"):
        og.prefill_last(list(range(og.max_seq_len + 1)))
    with pytest.raises(ValueError, match="engine 'nope' is not known"):
        runtime.load(art, engine="nope")


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["onnx/int8", "onnx/int4"])
def test_quantized_artifacts_run_and_really_quantize(recipe, tiny_model_dir, tiny_artifact):
    art = tiny_artifact("tiny", recipe)
    m = json.loads((art / "manifest.json").read_text())
    q = m["quantization_applied"]
    # every linear is quantized: fused qkv, o, fused gate_up, down per layer (2 layers) + the lm_head;
    # attention itself is one GroupQueryAttention node per layer, so no float MatMul is left
    assert q["quantized_matmuls"] == 4 * 2 + 1, q
    assert q["float_matmuls"] == 0, q
    assert q["op_counts"].get("GroupQueryAttention") == 2, q
    # packed QKV straight into GroupQueryAttention (no Split/Reshape of q/k/v; the one Split per layer is
    # gate_up's), residual Add + RMSNorm as SkipSimplifiedLayerNormalization (2 per layer: the first
    # layer's input norm has no residual before it, the final norm follows the last residual)
    ops = q["op_counts"]
    assert ops.get("Split") == 2 and "Reshape" not in {k for k, v in ops.items() if v > 1}, ops
    assert ops.get("SkipSimplifiedLayerNormalization") == 4 and ops.get("SimplifiedLayerNormalization") == 1, ops
    assert m["export"]["ort_fusions"] == {"rms_normalization": 5, "skip_rms_normalization": 4}
    # weight-only MatMulNBits for every linear (int8: 8-bit symmetric; int4: min-scale 4-bit layers, int8
    # head); tied model: the embedding Gather reads the int8 lm_head's weights (one copy of the table)
    assert q["op_counts"].get("MatMulNBits") == 9 and q["quantized_embeddings"] == 1
    assert q["embedding_shares_lm_head"] is True and q["head_bits"] == 8
    assert q["linear_kinds"]["lm_head"] == ["int8 symmetric"]
    assert q["linear_kinds"]["linear"] == (["int4 min-scale"] if recipe == "onnx/int4" else ["int8 symmetric"])
    prefill_ref, toks_ref, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 8)
    r = runtime.load(art)
    logits = r.prefill(PROMPT)
    assert logits.shape == prefill_ref.shape and np.isfinite(logits).all()
    err = float(np.abs(logits - prefill_ref).max())
    assert err < 0.5, f"{recipe}: max |logit err| {err:.3f} >= 0.5 on the tiny model"
    res = runtime.greedy_generate(r, PROMPT, 8)
    assert len(res.tokens) == 8


@pytest.mark.integration
def test_quantized_sizes_against_fp32(tiny_artifact):
    """Weight bytes (model.onnx.data) against fp32 (the tiny graph itself is not weights): int8 block 32
    = 8 + 32/32 bits per weight (28%; <= 33% with the float norms); int4 min-scale block 32 = 4 + 2 x 32/32 bits on the layers, the
    int8 head shared with the embedding (<= 30% here: the 2048 x 64 head is half of the tiny model)."""
    fp32 = (tiny_artifact("tiny", "onnx/fp32") / "model.onnx.data").stat().st_size
    int8 = (tiny_artifact("tiny", "onnx/int8") / "model.onnx.data").stat().st_size
    int4 = (tiny_artifact("tiny", "onnx/int4") / "model.onnx.data").stat().st_size
    assert int8 / fp32 <= 0.33, f"int8/fp32 weight data = {int8 / fp32:.2f} (> 0.33)"
    assert int4 / fp32 <= 0.30 and int4 < int8, f"int4/fp32 weight data = {int4 / fp32:.2f}, int8 {int8 / fp32:.2f}"


@pytest.mark.integration
def test_manifest_keys_and_hashes(tiny_artifact):
    art = tiny_artifact("tiny", "onnx/fp32")
    m = json.loads((art / "manifest.json").read_text())
    assert set(REQUIRED_KEYS) <= set(m), set(REQUIRED_KEYS) - set(m)
    assert m["format"] == "onnx" and m["recipe"]["name"] == "fp32"
    assert m["recipe"]["resolved"]["quantization"]["scheme"] == "none"
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"} <= set(m["files"])
    assert m["io"]["kv_cache"]["kind"] == "explicit_io" and m["io"]["max_seq_len"] == 512
    assert m["versions"]["onnxruntime"] and m["export"]["seconds"] > 0 and m["export"]["peak_rss_mb"] > 0
    assert verify(art) == []
    assert m["quantization_applied"]["op_counts"].get("GroupQueryAttention") == 2


@pytest.mark.slow
def test_genai_builder_engine_runs_in_our_runner(tiny_model_dir, tmp_path):
    """``onnx.engine: genai-builder`` (ORT GenAI's builder on the merged dir): explicit KV I/O + genai_config."""
    from cdcda_export.export.api import export

    art = export(tiny_model_dir("tiny"), None, "onnx/fp32", tmp_path / "b", progress=False,
                 overrides=["onnx.engine=genai-builder"])
    m = json.loads((art / "manifest.json").read_text())
    assert m["io"]["share_buffer"] is True and (art / "genai_config.json").is_file()
    assert m["quantization_applied"]["op_counts"].get("GroupQueryAttention") == 2
    prefill_ref, toks_ref, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 16)
    r = runtime.load(art)
    err = float(np.abs(r.prefill(PROMPT) - prefill_ref).max())
    assert err <= 1e-3, f"builder fp32: max |logit err| {err:.2e} > 1e-3"
    assert runtime.greedy_generate(r, PROMPT, 16).tokens == toks_ref


def on_grid_model(src, dst, delta_rank: int = 0):
    """The tiny model with its linears on a Q4_1 grid (w = d*q + m per block of 32, q in 0..15, as transformers
    dequantizes a Q4_1 GGUF) and its tied embedding on a Q8_0 grid, saved to ``dst``; with ``delta_rank`` a
    LoRA-like merged delta (rank ``delta_rank``, entries ~0.1 of a grid step: rounding takes most of it) is added
    to every linear. Returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                o, i = mod.weight.shape
                # d and m in fp16, as a Q4_1 block stores them
                d = (torch.rand(o, i // 32, 1, generator=g) * 0.01 + 0.001).half().float()
                m = (-8 * d + torch.randn(o, i // 32, 1, generator=g) * 0.002).half().float()
                q = torch.randint(0, 16, (o, i // 32, 32), generator=g).float()
                q[..., 0], q[..., 1] = 0, 15          # Q4_1 blocks span their own min and max
                w = (d * q + m).reshape(o, i)
                if delta_rank:
                    a, b = torch.randn(o, delta_rank, generator=g), torch.randn(delta_rank, i, generator=g)
                    delta = a @ b
                    w = w + delta * (0.1 * 0.006 / delta.std())   # ~0.1 of the mean step d (0.006)
                mod.weight.copy_(w)
        e = model.model.embed_tokens.weight
        v, h = e.shape
        d = (e.reshape(v, h // 32, 32).abs().amax(-1, keepdim=True) / 127).clamp_min(1e-4).half().float()  # fp16 d
        e.copy_((torch.round(e.reshape(v, h // 32, 32) / d) * d).reshape(v, h))
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            (dst / f.name).write_bytes(f.read_bytes())
    return model


@pytest.mark.integration
def test_min_scale_grid_reproduces_an_on_grid_base(tiny_model_dir, tmp_path):
    """A base whose linears sit on a Q4_1 grid (w = d*q + m per block of 32, q in 0..15, as transformers
    dequantizes a Q4_1 GGUF) and whose tied embedding sits on a Q8_0 grid (w = d*q, q in -127..127) is
    re-quantized by onnx/int4 (min-scale int4 block 32, int8 head) without loss: logits equal the eager
    model's to float rounding (tolerance 1e-3 on logits of magnitude ~1-10, against ~0.1-1 for symmetric
    int4 of the same weights), while the default symmetric grid cannot."""
    import torch

    from cdcda_export.export.api import export

    on_grid = tmp_path / "on-grid"
    model = on_grid_model(tiny_model_dir("tiny"), on_grid)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    err = {}
    for grid, scales, extra in (("min-scale", "float32", ""), ("min-scale", "float16", ""),
                                ("symmetric", "float32", ""), ("min-scale", "float16", "-gptq")):
        art = export(on_grid, None, "onnx/int4", tmp_path / f"{grid}-{scales}{extra}", progress=False,
                     overrides=[f"quantization.grid={grid}", "onnx.accuracy_level=0",
                                f"quantization.scale_dtype={scales}"]
                     + (["quantization.layers_calibration=gptq"] if extra else []))
        err[f"{grid}-{scales}{extra}"] = float(np.abs(runtime.load(art).prefill(PROMPT) - ref).max())
    assert err["min-scale-float32"] <= 1e-3, err
    # GPTQ on weights already on the grid: every rounding error is 0, nothing moves (same bound as without)
    assert err["min-scale-float16-gptq"] <= 5e-3, err
    # fp16 scales/minimums are exact here (the grid's own d and m are fp16); what remains is the fp16 activations
    # those matmuls take (relative rounding 2^-11 per input): a few 1e-3 on these logits
    assert err["min-scale-float16"] <= 5e-3, err
    assert err["symmetric-float32"] > 10 * err["min-scale-float16"], err


@pytest.mark.integration
def test_error_correction_restores_a_merged_delta_and_skips_an_on_grid_base(tiny_model_dir, tmp_path):
    """quantization.error_rank (low-rank error compensation): on an on-grid base with a rank-4 merged delta of
    ~0.1 grid step (a LoRA-merged model), min-scale int4 rounds most of the delta away; a rank-8 correction
    of W - Q(W) puts it back. On the tiny model (64-wide matrices, where the block min/max moving with the delta
    adds full-rank rounding noise) it measured: relative weight error 0.022 -> 0.013, max |logit error| 0.054
    -> 0.028; asserted: both at most 0.7x without. (On the real SmolLM2-135M + a rank-8 LoRA the rounding
    error is mostly the delta: KL 0.10 -> 0.0005, benchmarks/results/quality_*_merged-3000.md.) On the same
    base without the delta every matrix is on its grid: nothing is stored (0 corrected, same file bytes)."""
    import torch

    from cdcda_export.export.api import export

    ids = torch.tensor([PROMPT])
    err, facts, sizes = {}, {}, {}
    for label, delta in (("merged", 4), ("base", 0)):
        src = tmp_path / label
        model = on_grid_model(tiny_model_dir("tiny"), src, delta_rank=delta)
        with torch.no_grad():
            ref = model(ids).logits[0].numpy()
        for rank in (0, 8):
            art = export(src, None, "onnx/int4", tmp_path / f"{label}-r{rank}", progress=False,
                         overrides=["onnx.accuracy_level=0", f"quantization.error_rank={rank}"])
            err[label, rank] = float(np.abs(runtime.load(art).prefill(PROMPT) - ref).max())
            man = json.loads((art / "manifest.json").read_text())
            facts[label, rank] = man["quantization_applied"].get("error_correction")
            sizes[label, rank] = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    assert facts["merged", 0] is None and facts["base", 0] is None
    assert facts["merged", 8]["corrected"] > 0 and facts["merged", 8]["on_grid_skipped"] == 0, facts
    assert facts["merged", 8]["rel_err_mean"]["after"] < 0.7 * facts["merged", 8]["rel_err_mean"]["before"], facts
    assert err["merged", 8] < 0.7 * err["merged", 0], err
    assert facts["base", 8]["corrected"] == 0 and facts["base", 8]["on_grid_skipped"] > 0, facts
    assert sizes["base", 8] == sizes["base", 0], sizes
    assert err["base", 8] <= 5e-3, err   # as test_min_scale_grid_reproduces_an_on_grid_base (fp16 scales)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_nbits_dequant_matches_onnxruntime(bits, symmetric, tmp_path):
    """nbits_dequant reads a MatMulNBits node's packed weights, scales and zero points as ONNX Runtime computes
    with them: the node run on the identity matrix returns its weight (tolerance 1e-5, float32 compute)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from cdcda_export.export.onnx import nbits_dequant

    k, n = 96, 40
    w = np.random.default_rng(bits + symmetric).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits, accuracy_level=0)
    quant = mnq.MatMulNBitsQuantizer(proto, algo_config=cfg)
    quant.process()
    proto = quant.model.model
    node = next(nd for nd in proto.graph.node if nd.op_type == "MatMulNBits")
    inits = {i.name: i for i in proto.graph.initializer}
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.eye(k, dtype=np.float32)})[0]
    deq = nbits_dequant(node, inits)
    np.testing.assert_allclose(deq, got, atol=1e-5)
    assert np.abs(deq - w).max() > 1e-3   # it is quantized, not the float weight


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["onnx/int8", "onnx/int4"])
def test_untied_model_keeps_its_own_embedding_table(recipe, tiny_model_dir, tiny_artifact):
    """Phi-3 does not tie its embeddings: the quantized head must not replace its table (a shared head once
    made every tiny-phi3 int8/int4 artifact emit garbage: top-1 0.02). Its table is quantized on its own."""
    art = tiny_artifact("tiny-phi3", recipe)
    q = json.loads((art / "manifest.json").read_text())["quantization_applied"]
    assert q["embedding_shares_lm_head"] is False and q["quantized_embeddings"] == 1, q
    prefill_ref, _, _ = eager_greedy(tiny_model_dir("tiny-phi3"), PROMPT, 4)
    err = float(np.abs(runtime.load(art).prefill(PROMPT) - prefill_ref).max())
    assert err < 0.5, f"{recipe} on untied tiny-phi3: max |logit err| {err:.3f} >= 0.5"


@pytest.mark.parametrize("fuse", [True, False])
def test_smoothquant_keeps_the_float_function_and_the_lora_input(fuse, tiny_model_dir):
    """``quantization.smooth_alpha`` (onnx._smooth): every layer linear becomes Mul(x, 1/s) then the linear with
    weight columns * s. Before any rounding that is the same function (tolerance 1e-4 relative on the logits,
    float32 rounding of s and 1/s), with a LoRA attached as inputs too: the LoRA reads the linear's undivided
    input, so an adapter package needs no change. The tied lm_head is left alone (the embedding reads it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cdcda_export.export import calibrate as cal
    from cdcda_export.export.decoder import ExportDecoder
    from cdcda_export.export.lora import LoraLayout, attach, example_tensors
    from cdcda_export.export.onnx import _smooth
    from cdcda_export.export.recipe import Quantization

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny-llama"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in (9, 14, 11)]
    _, hess, absmax = cal.head_inputs(model, seqs, layers=True, layer_positions=10**6)
    calib = cal.Calibration(torch.zeros(1, 1), {}, hess, absmax)
    dec = ExportDecoder.from_hf(model, max_seq_len=32, cache="io", untie_lm_head=True, fuse_projections=fuse)
    layout = LoraLayout(rank=4, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    attach(dec, layout)
    lora = [t * 30 for t in example_tensors(layout, dec.spec, seed=1, dtype="float32")]   # a visible delta
    inputs = (*dec.cache.example_inputs(dec, 12), *lora)
    with torch.no_grad():
        before = dec(*inputs)[0]
        head = dec.lm_head.weight.detach().clone()
        facts = _smooth(dec, calib, Quantization(scheme="int8", bits=8, smooth_alpha=0.5))
        after = dec(*inputs)[0]
    n_layers = dec.spec.num_layers
    assert facts["smoothed"] == n_layers * (4 if fuse else 7) and facts["alpha"] == 0.5, facts
    assert facts["scale_spread_max"] > 1.5, facts          # the scales really vary across channels
    assert torch.equal(dec.lm_head.weight, head)
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-4, rel
    # the delta is really there: without the LoRA inputs the output differs
    with torch.no_grad():
        plain = dec(*dec.cache.example_inputs(dec, 12), *[torch.zeros_like(t) for t in lora])[0]
    assert float((plain - after).abs().max()) > 1e-2


def test_smooth_alpha_needs_int8_compute():
    """ONNX smooth_alpha is refused where no activation is rounded to int8 (accuracy_level 0-3), and beside
    GPTQ layers (their Hessians are taken on the undivided inputs), with the field named."""
    from cdcda_export.errors import ValidationErrors
    from cdcda_export.export.registry import resolve_recipe

    resolve_recipe("onnx/int8-fast")   # the shipped recipe uses it
    with pytest.raises(ValidationErrors, match="smooth_alpha needs int8 activations.*accuracy_level 0"):
        resolve_recipe("onnx/int8", ["quantization.smooth_alpha=0.5"])
    with pytest.raises(ValidationErrors, match="smooth_alpha and layers_calibration"):
        resolve_recipe("onnx/int4-compact", ["quantization.smooth_alpha=0.5", "onnx.accuracy_level=4"])


@pytest.mark.integration
def test_int8_fast_export_records_its_smoothing(tiny_model_dir, tiny_artifact):
    """onnx/int8-fast ships smooth_alpha 0.5: the manifest says how many linears were smoothed, the graph has
    one Mul per layer linear in front of its MatMulNBits, and the artifact still tracks the eager model (the
    same loose bound as the other quantized tiny artifacts: 0.5 logits on random weights)."""
    art = tiny_artifact("tiny", "onnx/int8-fast")
    q = json.loads((art / "manifest.json").read_text())["quantization_applied"]
    sm = q["smoothing"]
    assert sm["alpha"] == 0.5 and sm["smoothed"] == 4 * 2, sm      # qkv, o, gate_up, down x 2 layers
    import onnx

    g = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in g.node for o in n.output}
    fed_by_mul = [n for n in g.node if n.op_type == "MatMulNBits" and n.input[0] in producers
                  and producers[n.input[0]].op_type == "Mul"]
    assert len(fed_by_mul) == 8, [n.name for n in fed_by_mul]
    prefill_ref, _, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 1)
    err = float(np.abs(runtime.load(art).prefill(PROMPT) - prefill_ref).max())
    assert err < 0.5, err


@pytest.mark.integration
def test_float_weights_are_read_from_the_data_file_as_stored(tiny_artifact):
    """The quantizer's float weights come from the float graph's data file, one matrix at a time
    (onnx._FloatWeights): exactly the arrays onnx.load gives (bit for bit), inline tensors included; and a
    quantized export records its peak RSS after each phase."""
    import onnx
    from onnx import numpy_helper

    from cdcda_export.export.onnx import _FloatWeights

    art = tiny_artifact("tiny", "onnx/fp32")
    full = onnx.load(str(art / "model.onnx"))
    inits = {i.name: i for i in full.graph.initializer}
    mms = {n.name: n.input[1] for n in full.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    small = next(i.name for i in full.graph.initializer if 0 < np.prod(i.dims) * 4 < 1024)   # stored inline
    fw = _FloatWeights(art / "model.onnx", {**mms, "inline": small})
    assert len(mms) >= 4 and len(fw) == len(mms) + 1 and set(fw.subset(list(mms)[:2])) == set(list(mms)[:2])
    for mm, init in {**mms, "inline": small}.items():
        want = numpy_helper.to_array(inits[init])
        got = fw[mm]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), mm
    q = json.loads((tiny_artifact("tiny", "onnx/int8") / "manifest.json").read_text())["export"]
    after = q["timings"]["peak_rss_mb_after"]
    assert set(after) == {"model_and_calibration", "torch_onnx_export", "quantize"}, after
    assert after["model_and_calibration"] <= after["torch_onnx_export"] <= after["quantize"] <= q["peak_rss_mb"]
