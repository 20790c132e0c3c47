"""Calibrated lm_head rounding (export/calibrate.py) and the onnx/int4-compact recipe that uses it.

The numbers that justify the recipe come from the real SmolLM2-135M-Instruct (tests/fidelity/test_real_model.py,
benchmarks/quality.py); here: the packing matches ONNX Runtime's own layout, GPTQ lowers the output error
against round-to-nearest on correlated inputs, the hot rows are the high-mass ones, and the exported graph
computes what the manifest says on a tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdcda_export import runtime
from cdcda_export.export import calibrate as cal
from cdcda_export.export.onnx import pack_int4, pack_int4_zero_points


def _ort_asym_int4(w_kn: np.ndarray, block: int):
    """ONNX Runtime's own asymmetric 4-bit MatMulNBits initializers for a MatMul weight [K, N]."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    k, n = w_kn.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [numpy_helper.from_array(w_kn, "W")])
    q = mnq.MatMulNBitsQuantizer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
                                 algo_config=mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=4))
    q.process()
    node = q.model.model.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in q.model.model.graph.initializer}
    return inits[node.input[1]], inits[node.input[2]], inits[node.input[3]]


@pytest.mark.parametrize("k", [64, 96])   # 96 / 32 = 3 blocks: a row's zero points end in a padded nibble
def test_int4_packing_matches_onnxruntime(k):
    block, n = 32, 5
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    data, scales, zps = _ort_asym_int4(w, block)
    # unpack ORT's bytes, then pack them again our way: byte-identical
    q = np.stack([data & 15, data >> 4], -1).reshape(n, k)
    z = np.stack([zps & 15, zps >> 4], -1).reshape(n, -1)[:, : k // block]
    assert np.array_equal(pack_int4(q, block), data.reshape(n, k // block, block // 2))
    assert np.array_equal(pack_int4_zero_points(z).reshape(zps.shape), zps)
    # and our grid is ORT's asymmetric grid: same scales (fp32) and zero points, same codes for the same weights
    scale, zp = cal.block_grid(torch.from_numpy(w.T.copy()), block, scale_dtype="float32")
    np.testing.assert_allclose(scale.numpy(), scales.reshape(n, -1), rtol=1e-6)
    assert np.array_equal(zp.numpy().astype(np.uint8), z)


def _correlated(n_pos: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions and outlier channels (like a decoder's hidden state)."""
    basis = torch.randn(8, k, generator=torch.Generator().manual_seed(100))   # one distribution, ``seed`` draws
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pos, 8, generator=g) @ basis * 3 + 0.3 * torch.randn(n_pos, k, generator=g)
    x[:, :4] *= 10
    return x


def test_gptq_lowers_output_error_against_round_to_nearest():
    k, n, block = 128, 64, 32
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.05
    x_cal, x_test = _correlated(2048, k, 0), _correlated(1024, k, 1)
    q, scale, zp = cal.gptq(w, x_cal, block)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    ref = x_test @ w.T

    def rel(deq):
        return float((x_test @ deq.T - ref).norm() / ref.norm())

    e_gptq = rel(cal.dequant(q, scale, zp, block))
    e_rtn = rel(cal.dequant(cal.rtn(w, scale, zp, block), scale, zp, block))
    # same grid, same storage; on held-out inputs of the same distribution GPTQ must at least halve the error
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_onnxruntime_vendored_gptq_still_equals_round_to_nearest():
    """Why calibrate.gptq exists: onnxruntime 1.32's ``neural_compressor.weight_only.gptq`` propagates no error
    (it reads column ``Hinv[i:, i]`` of an upper-triangular factor), so it returns round-to-nearest. When this
    fails, ONNX Runtime fixed it: compare its output with ours and consider dropping ours."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq as ort_gptq

    k, n, block = 64, 16, 32
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05)
    x = _correlated(512, k)
    h = (x.double().T @ x.double()).numpy() * (2 / x.shape[0])
    q_ort = ort_gptq(w.T.numpy().copy(), h, num_bits=4, group_size=block, scheme="asym")   # [K, N] fake-quantized
    scale, zp = cal.block_grid(w, block, scale_dtype="float32")
    rtn = cal.dequant(cal.rtn(w, scale, zp, block), scale, zp, block).T.numpy()
    np.testing.assert_allclose(q_ort, rtn, atol=1e-6)


def test_hot_rows_are_the_high_mass_rows():
    k, v = 16, 50
    w = torch.randn(v, k, generator=torch.Generator().manual_seed(3)) * 0.01
    w[7] = 1.0
    w[21] = 0.8          # rows 7 then 21 take almost all the probability of inputs x = +1
    x = torch.ones(32, k)
    rows = cal.hot_rows(w, x, 2)
    assert rows.tolist() == [7, 21]
    assert len(cal.hot_rows(w, x, 500)) == v


def test_int4_compact_tiny_export(tiny_model_dir, tiny_artifact):
    """The compact recipe on a tiny model: the manifest records the calibration, the GPTQ head error is
    below round-to-nearest's on the calibration inputs, the graph overrides the hot rows in the head and the
    embedding, and the artifact reproduces the eager model within the int4 tolerance of the tiny tests."""
    from tests.test_export_onnx import PROMPT, eager_greedy

    art = tiny_artifact("tiny", "onnx/int4-compact", **{"quantization.hot_rows": 16})
    m = json.loads((art / "manifest.json").read_text())
    q = m["quantization_applied"]
    assert q["linear_kinds"]["lm_head"] == ["int4 asymmetric"] and q["embedding_shares_lm_head"] is True
    assert q["hot_rows"] == 16 and q["hot_rows_embedding"] is True
    hr = q["head_rounding"]
    assert hr["method"] == "gptq" and hr["calibration_output_rel_err"] < hr["rtn_output_rel_err"], hr
    c = q["calibration"]
    assert c["sequences"] > 0 and c["positions"] > c["sequences"] and len(c["ids_sha256"]) == 16
    ops = q["op_counts"]
    assert ops.get("ScatterElements") == 1 and ops.get("Where") == 1 and ops.get("GatherBlockQuantized") == 2, ops
    # the per-layer localiser still finds the residual stream (embedding = the hot-row Where, then 2 per layer)
    import onnx

    from cdcda_export.check.localise import onnx_residual_tensors

    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    names = onnx_residual_tensors(graph)
    where = [n for n in graph.node if n.op_type == "Where"]
    assert len(names) == 2 * 2 + 1 and names[0] == where[0].output[0], names
    prefill_ref, _, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 8)
    logits = runtime.load(art).prefill(PROMPT)
    assert logits.shape == prefill_ref.shape and np.isfinite(logits).all()
    err = float(np.abs(logits - prefill_ref).max())
    assert err < 0.5, f"int4-compact: max |logit err| {err:.3f} >= 0.5 on the tiny model"


def test_hot_rows_logits_come_from_the_8bit_table(tiny_model_dir, tiny_artifact):
    """Hot rows' logits come from the 8-bit table (the 4-bit values are overwritten): with every row hot
    (hot_rows >= vocabulary) the artifact is closer to eager than with the 4-bit head alone. The layers stay
    int4 in both, so their error (about 60% of the total on this tiny random model) is common to the two."""
    from tests.test_export_onnx import PROMPT, eager_greedy

    prefill_ref, _, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 8)
    errs = {}
    for rows in (0, 100000):
        art = tiny_artifact("tiny", "onnx/int4-compact", **{"quantization.hot_rows": rows})
        errs[rows] = float(np.abs(runtime.load(art).prefill(PROMPT) - prefill_ref).mean())
    assert errs[100000] < 0.8 * errs[0], errs


def test_float_hot_rows_skip_the_int8_heads_input_rounding(tiny_model_dir, tiny_artifact):
    """``hot_rows_bits: 32`` on the int8-compute recipe: the hot rows' logits come from a float MatMul that reads
    the int8 head's own (unrounded) input, with the float head's columns bit for bit, written over the int8 head's
    logits with ScatterElements; the tied embedding keeps its int8 lookup (no Where). With every row hot the
    head is float, so the artifact is closer to eager than with the int8 head alone. On this tiny random model
    the layers' int8 error dominates (the head is ~14% of the mean |logit err|), so that check is strict
    inequality only; the real model's figures are in recipes/README.md."""
    import onnx
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    from tests.test_export_onnx import PROMPT, eager_greedy

    prefill_ref, _, _ = eager_greedy(tiny_model_dir("tiny"), PROMPT, 8)
    head = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny")).lm_head.weight.detach().numpy()   # [V, K]
    errs = {}
    for rows in (0, 100000):
        art = tiny_artifact("tiny", "onnx/int8-fast", **{"quantization.hot_rows": rows,
                                                         "quantization.hot_rows_bits": 32})
        q = json.loads((art / "manifest.json").read_text())["quantization_applied"]
        ops = q["op_counts"]
        if rows:
            assert q["hot_rows_bits"] == 32 and "hot_rows_embedding" not in q, q
            assert ops.get("ScatterElements") == 1 and not ops.get("Where"), ops
            g = onnx.load(str(art / "model.onnx")).graph
            inits = {i.name: i for i in g.initializer}
            mm = next(n for n in g.node if n.name == "lm_head_hot_MatMul")
            int8_head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.output[0] == "logits_cold")
            assert mm.input[0] == int8_head.input[0]
            idx = numpy_helper.to_array(inits["lm_head_hot_rows"])
            assert sorted(idx.tolist()) == list(range(head.shape[0]))
            np.testing.assert_array_equal(numpy_helper.to_array(inits[mm.input[1]]), head[idx].T)
        errs[rows] = float(np.abs(runtime.load(art).prefill(PROMPT) - prefill_ref).mean())
    assert errs[100000] < errs[0], errs


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_layer_statistics_are_each_linears_own_input(arch, tiny_model_dir):
    """head_inputs(layers=True): every decoder linear's Hessian X^T X / n and max |x| are those of its own
    inputs (hooks recorded beside it; tolerance 1e-5 relative), and only linears that read the very same
    tensor (q/k/v, gate/up) share them. Matching inputs by data_ptr() aliased gate_proj to o_proj whenever the
    allocator reused o_proj's freed input for the post-attention norm's output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in (9, 14, 11)]
    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float().clone()))
        for name, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for s in seqs:
            model.model(input_ids=torch.tensor([s]))
    for h in hooks:
        h.remove()
    _, hess, absmax = cal.head_inputs(model, seqs, layers=True, layer_positions=10**6)   # every sequence
    calib = cal.Calibration(torch.zeros(1, 1), {}, hess, absmax)
    mods = dict(model.model.named_modules())
    assert seen
    for name, xs in seen.items():
        x = torch.cat(xs)
        w_kn = mods[name].weight.detach().T.numpy()
        torch.testing.assert_close(calib.absmax_for(w_kn).float(), x.abs().amax(0), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(calib.hessian_for(w_kn).float(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_absmax_only_calibration_reads_the_same_statistics(tiny_model_dir):
    """SmoothQuant needs max |x| only: ``hessians=False, head=False`` runs just the sequences the layer
    statistics read and gives the very same per-channel maxima (exact), no Hessians and no head inputs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny-llama"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in (9, 14, 11, 7, 12, 10)]
    h, hess, amax = cal.head_inputs(model, seqs, layers=True, layer_positions=20)   # every 3rd sequence
    h2, hess2, amax2 = cal.head_inputs(model, seqs, layers=True, layer_positions=20, hessians=False, head=False)
    assert h.shape[0] == sum(len(s) for s in seqs) and h2.shape[0] == 0
    assert hess and not hess2
    assert amax.keys() == amax2.keys()
    for k in amax:
        assert torch.equal(amax[k], amax2[k])


def test_fisher_scores_are_the_empirical_fisher_quadratic_form(tiny_model_dir):
    """fisher_scores: for each linear, the sum over sequences of (grad . dW)^2, with the gradient of that
    sequence's next-token loss; checked against torch.autograd.grad computed here (relative tolerance 1e-4).
    A zero delta scores 0, scaling a delta by c scales its score by c^2 (a quadratic form), a key the model
    has no linear for (or one of another shape) is left out, and every parameter's requires_grad / grad is as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny-llama"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in (9, 14, 11)]
    layer = model.model.layers[0]
    lins = {"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj, "o": layer.self_attn.o_proj}
    key = {n: cal.weight_key(m.weight.detach().T.numpy()) for n, m in lins.items()}
    d = {"q": 1e-2 * torch.randn(lins["q"].weight.shape, generator=g),
         "down": 1e-2 * torch.randn(lins["down"].weight.shape, generator=g), "o": torch.zeros(lins["o"].weight.shape)}
    flags = [p.requires_grad for p in model.parameters()]
    got = cal.fisher_scores(model, seqs, {key[n]: d[n] for n in d} | {b"absent": torch.zeros(3, 3)})
    assert b"absent" not in got and got[key["o"]] == 0.0
    want = {"q": 0.0, "down": 0.0}
    for s in seqs:
        ids = torch.tensor([s])
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [lins["q"].weight, lins["down"].weight])
        for n, gr in zip(("q", "down"), grads):
            want[n] += float((gr * d[n]).sum()) ** 2
    for n in want:
        assert want[n] > 0 and got[key[n]] == pytest.approx(want[n], rel=1e-4), (n, got[key[n]], want[n])
    # a key whose linear has another shape (a split fused projection: Phi-3's qkv_proj) is left out
    assert cal.fisher_scores(model, seqs[:1], {key["q"]: torch.zeros(3, 3)}) == {}
    scaled = cal.fisher_scores(model, seqs, {key["q"]: 3.0 * d["q"]})
    assert scaled[key["q"]] == pytest.approx(9.0 * got[key["q"]], rel=1e-4)
    # deltas given as callables (the export builds each dW from its uint8 codes when needed): the same scores,
    # each dW built once per sequence plus once for the shape check, no gradient left on any weight
    calls = {n: 0 for n in d}

    def lazy(n):
        def build():
            calls[n] += 1
            return d[n].clone()
        return build

    built = cal.fisher_scores(model, seqs, {key[n]: lazy(n) for n in d})
    for n in d:
        assert built[key[n]] == pytest.approx(got[key[n]], rel=1e-6, abs=0.0), n
        assert calls[n] == len(seqs) + 1, (n, calls[n])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_dequant_broadcast_equals_the_expanded_grid():
    """dequant broadcasts each block's scale and zero point; the values are those of the [N, K]-expanded
    formula bit for bit (exact equality), per channel (block = K) and in blocks of 32, with float zero points."""
    g = torch.Generator().manual_seed(0)
    for block in (96, 32):
        q = torch.randint(0, 256, (5, 96), generator=g, dtype=torch.int64).to(torch.uint8)
        scale = torch.rand(5, 96 // block, generator=g)
        zp = torch.rand(5, 96 // block, generator=g) * 255
        want = (q.float() - zp.repeat_interleave(block, 1)) * scale.repeat_interleave(block, 1)
        assert torch.equal(cal.dequant(q, scale, zp, block), want), block
