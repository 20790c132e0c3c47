"""Core ML export on Linux: convert, compress, save, reload the spec; the traced module equals HF eager.

Core ML predictions need macOS, so these tests check what Linux can: the traced torch module (exactly
what ``ct.convert`` receives) against Hugging Face eager logits, and the saved package's spec (I/O,
state, compressed weight ops, weight.bin size). Models are the tiny random-weight ones of conftest.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdcda_export.errors import UserError, ValidationErrors
from cdcda_export.export.registry import resolve_recipe

TOL = 1e-4                      # traced fp32 decoder vs HF eager, max abs logit difference
MAX_SEQ, PREFILL = 64, 16       # small state and range dims keep conversion fast
SMALL = {"max_seq_len": MAX_SEQ, "prefill_len": PREFILL, "options.weight_threshold": 1024}
RECIPES = ("coreml/fp16", "coreml/int8-linear", "coreml/int4-block32", "coreml/palettize-4bit")
# weight.bin of a compressed package / weight.bin of the fp16 package, upper bounds (tiny model, tied
# embeddings compressed with the linears; measured 0.53, 0.30, 0.29)
RATIO_BOUND = {"coreml/int8-linear": 0.60, "coreml/int4-block32": 0.35, "coreml/palettize-4bit": 0.35}
ARCH_FAMILY = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-qwen3": "qwen3",
               "tiny-phi3": "phi3"}


def _recipe(name: str, **over):
    return resolve_recipe(name, [f"{k}={v}" for k, v in {**SMALL, **over}.items()])[0]


# ----------------------------------------------------------------------------- unit (no conversion)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load_with_coreml_options(name):
    r, _ = resolve_recipe(name)
    assert r.format == "coreml"
    assert r.coreml.minimum_deployment_target == "iOS18"
    assert r.coreml.compute_units in ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
    assert r.coreml.precision in ("fp16", "fp32")


@pytest.mark.integration    # imports coremltools (which imports executorch.exir): ~10 s of CPU
def test_compression_configs_target_linear_and_gather_only():
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig

    from cdcda_export.export.coreml import optimization_config

    cfg, fn = optimization_config(_recipe("coreml/int4-block32"))
    assert fn == "linear_quantize_weights" and cfg.global_config is None     # RoPE tables stay fp16
    assert set(cfg.op_type_configs) == {"linear", "gather"}
    lin = cfg.op_type_configs["linear"]
    assert isinstance(lin, OpLinearQuantizerConfig)
    assert lin.granularity.name == "PER_BLOCK" and lin.block_size == 32 and lin.dtype.get_bitwidth() == 4

    cfg, fn = optimization_config(_recipe("coreml/palettize-4bit"))
    pal = cfg.op_type_configs["linear"]
    assert fn == "palettize_weights" and cfg.global_config is None
    assert isinstance(pal, OpPalettizerConfig) and pal.nbits == 4 and pal.granularity.name == "PER_GROUPED_CHANNEL"

    cfg, _ = optimization_config(_recipe("coreml/int8-linear"))
    assert set(cfg.op_type_configs) == {"linear"} and cfg.global_config is None
    # tied embeddings: gather and lm_head read one constant -> one config for both (else coremltools refuses)
    cfg, _ = optimization_config(_recipe("coreml/int8-linear"), tied_embeddings=True)
    assert cfg.op_type_configs["gather"] is cfg.op_type_configs["linear"]
    assert optimization_config(_recipe("coreml/fp16")) == (None, None)


def test_state_needs_ios18_target_named_in_error():
    from cdcda_export.export.coreml import _coreml_options

    with pytest.raises(UserError) as e:
        _coreml_options(_recipe("coreml/fp16", **{"coreml.minimum_deployment_target": "iOS17"}))
    assert "coreml.minimum_deployment_target" in str(e.value) and "iOS18" in str(e.value)


def test_bad_coreml_recipe_value_lists_allowed_values():
    with pytest.raises(ValidationErrors) as e:
        _recipe("coreml/fp16", **{"coreml.compute_units": "npu"})
    assert "coreml.compute_units" in str(e.value) and "cpu_and_ne" in str(e.value)


def test_runtime_needs_macos(monkeypatch, tmp_path):
    from cdcda_export import runtime
    from cdcda_export.runtime import coreml as rc

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "coreml", "io": {}}))
    monkeypatch.setattr(rc.sys, "platform", "linux")
    with pytest.raises(runtime.RuntimeUnavailable, match="Core ML predictions need macOS"):
        runtime.load(tmp_path)


def test_runtime_mask_matches_decoder_mask():
    from cdcda_export.export.decoder import causal_mask as torch_mask
    from cdcda_export.runtime.coreml import causal_mask

    for pos, t in ((0, 5), (5, 1), (3, 4)):
        m = causal_mask(pos, t, np.float32)
        ref = torch_mask(t, pos + t).numpy()
        assert m.shape == (1, 1, t, pos + t)
        assert np.array_equal(m == 0, ref == 0)          # same attended positions
    assert causal_mask(2, 1, np.float16).dtype == np.float16


# ----------------------------------------------------------------------------- upstream workaround


class _IntOfShape(torch.nn.Module):
    """``int(h * w)`` of traced shapes -> an ``aten::Int`` node on a 1-element constant (as YOLO's attention)."""

    def forward(self, x):
        n = int(x.shape[2] * x.shape[3])
        return x.reshape(x.shape[0], x.shape[1], n)


@pytest.mark.integration
def test_numpy_scalar_cast_workaround():
    """apple/coremltools#2633: ``int()`` on a 1-element array (numpy>=2.4 raises, older numpy warns).

    With DeprecationWarning turned into errors, numpy 2.3 behaves like 2.4: coremltools' own ``_cast``
    fails, the patched one converts.
    """
    from coremltools.converters.mil.frontend.torch import ops

    from cdcda_export.export.coreml import _ct

    ct = _ct()                                        # imports coremltools and applies the patch
    assert getattr(ops._cast, "_cdcda_patched", False)
    traced = torch.jit.trace(_IntOfShape(), torch.randn(1, 3, 4, 5))

    def convert():
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            return ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 3, 4, 5))],
                              minimum_deployment_target=ct.target.iOS18, skip_model_load=True)

    patched = ops._cast
    ops._cast = patched._cdcda_original
    try:
        with pytest.raises(Exception, match="0-dimensional|ndim > 0"):
            convert()
    finally:
        ops._cast = patched
    out = convert().get_spec().description.output[0]
    assert list(out.type.multiArrayType.shape) == [1, 3, 20]


# ----------------------------------------------------------------------------- traced module == HF eager


_HF: dict[str, object] = {}


def _hf(tiny_model_dir, arch: str):
    if arch not in _HF:
        from cdcda_export.export.api import load_merged_model

        m = load_merged_model(tiny_model_dir(arch))
        if ARCH_FAMILY[arch] == "qwen2":  # HF initialises the qkv biases to zero; make them matter
            torch.manual_seed(0)
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(p.bias, std=0.1)
        _HF[arch] = m
    return _HF[arch]


def _run_traced(traced, ids: torch.Tensor, n_prefill: int) -> list[torch.Tensor]:
    """Prefill ids[:n_prefill] in one call, then decode the rest one token at a time."""
    from cdcda_export.export.decoder import causal_mask

    for name, buf in traced.named_buffers():
        if "cache" in name:
            buf.zero_()
    outs = [traced(ids[:, :n_prefill], causal_mask(n_prefill, n_prefill))[0]]
    for pos in range(n_prefill, ids.shape[1]):
        outs.append(traced(ids[:, pos:pos + 1], causal_mask(1, pos + 1))[0])
    return outs


# coreml.precision per arch: one arch converts with fp32 compute (inputs/outputs fp32, state still fp16)
PRECISION = {"tiny": "fp16", "tiny-qwen2": "fp16", "tiny-qwen3": "fp16", "tiny-phi3": "fp32"}


@pytest.fixture(scope="module")
def converted(tiny_model_dir):
    """arch -> (traced module, MLModel, decoder) -- the traced module is exactly what was converted."""
    from cdcda_export.export import coreml as C
    from cdcda_export.export.decoder import ExportDecoder

    cache = {}

    def make(arch: str):
        if arch not in cache:
            recipe = _recipe("coreml/fp16", **{"coreml.precision": PRECISION[arch]})
            dec = ExportDecoder.from_hf(_hf(tiny_model_dir, arch), max_seq_len=MAX_SEQ, cache="buffer")
            traced = C.trace_decoder(dec)
            cache[arch] = (traced, C.convert_traced(traced, dec, recipe), dec)
        return cache[arch]

    return make


ARCHS = ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-phi3")


@pytest.mark.integration
@pytest.mark.parametrize("arch", ARCHS)
def test_traced_module_matches_hf_eager(converted, tiny_model_dir, arch):
    traced, _, dec = converted(arch)
    hf = _hf(tiny_model_dir, arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, dec.spec.vocab_size, (1, 9), generator=g)
    n_prefill = 6
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits[0]
        outs = _run_traced(traced, ids, n_prefill)
    err_prefill = (outs[0] - ref[:n_prefill]).abs().max().item()
    err_decode = max((o[-1] - ref[n_prefill + i]).abs().max().item() for i, o in enumerate(outs[1:]))
    assert err_prefill <= TOL, f"{arch}: prefill max abs logit err {err_prefill:.2e} > {TOL}"
    assert err_decode <= TOL, f"{arch}: decode max abs logit err {err_decode:.2e} > {TOL}"


@pytest.mark.integration
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_converts_with_state(converted, arch, tmp_path):
    from cdcda_export.export.coreml import op_counts, read_spec, spec_signature, weight_bytes

    _, mlmodel, dec = converted(arch)
    sp = dec.spec
    mlmodel.save(str(tmp_path / "m.mlpackage"))
    spec = read_spec(tmp_path / "m.mlpackage")                # reloaded from disk
    sig = spec_signature(spec)
    assert list(sig["inputs"]) == ["input_ids", "causal_mask"]
    assert sig["inputs"]["input_ids"] == {"dtype": "int32", "shape_range": [[1, 1], [1, PREFILL]]}
    act = {"fp16": "float16", "fp32": "float32"}[PRECISION[arch]]
    assert sig["inputs"]["causal_mask"] == {"dtype": act, "shape_range": [[1, 1], [1, 1], [1, PREFILL], [1, MAX_SEQ]]}
    assert sig["outputs"] == {"logits": {"dtype": act}}
    kv = [1, sp.num_kv_heads, MAX_SEQ, sp.head_dim]
    assert sig["states"] == {f"cache_{k}_cache_{i}": {"shape": kv, "dtype": "float16"}
                             for i in range(sp.num_layers) for k in ("k", "v")}
    assert sig["spec_version"] >= 9                           # iOS 18
    ops = op_counts(spec)
    assert ops.get("write_state") == 2 * sp.num_layers and ops.get("read_state", 0) >= 2 * sp.num_layers
    assert not any(o.startswith("constexpr_") for o in ops)   # fp16/fp32: nothing compressed
    wb = weight_bytes(tmp_path / "m.mlpackage")
    n_params = sum(p.numel() for p in dec.parameters())
    per_param = {"fp16": 2, "fp32": 4}[PRECISION[arch]]        # every weight stored once, at the precision
    assert 0.9 * per_param * n_params <= wb <= 1.1 * per_param * n_params + 65536, (wb, n_params)


# ----------------------------------------------------------------------------- recipes end to end


@pytest.fixture(scope="module")
def artifacts(tiny_artifact):
    def make(recipe: str) -> Path:
        over = dict(SMALL)
        if recipe == "coreml/fp16":
            over.pop("options.weight_threshold")
        return tiny_artifact("tiny", recipe, **over)

    return make


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ("coreml/fp16", "coreml/int8-linear", "coreml/int4-block32"))
def test_recipe_exports_checked_artifact(artifacts, recipe):
    from cdcda_export.export.coreml import COMPRESSED_OPS, coreml_structural_check
    from cdcda_export.export.manifest import verify

    art = artifacts(recipe)
    assert verify(art) == []
    m = json.loads((art / "manifest.json").read_text())
    assert m["format"] == "coreml" and m["io"]["kv_cache"]["kind"] == "state"
    res = coreml_structural_check(art)
    assert res["passed"], res["problems"]
    scheme = m["recipe"]["resolved"]["quantization"]["scheme"]
    if scheme in COMPRESSED_OPS:
        q = m["quantization_applied"]
        assert q["applied"] and set(q["op_types"]) == {"linear", "gather"}    # tiny model: tied embeddings
        # every linear (incl. the tied lm_head) reads a compressed weight
        assert sum(res["compressed_ops"].values()) == q["linear_ops"]
        fp16 = coreml_structural_check(artifacts("coreml/fp16"))["weight_bin_bytes"]
        ratio = res["weight_bin_bytes"] / fp16
        assert ratio <= RATIO_BOUND[recipe], f"{recipe}: weight.bin is {ratio:.2f} of fp16 (bound {RATIO_BOUND[recipe]})"


@pytest.mark.integration
def test_palettize_4bit_really_palettizes(converted, tmp_path):
    """Palettization is slow (k-means per group), so it runs on the already converted tiny fp16 program."""
    from cdcda_export.export.coreml import compress, op_counts, read_spec, weight_bytes

    _, mlmodel, dec = converted("tiny")
    mlmodel.save(str(tmp_path / "fp16.mlpackage"))
    pal, applied = compress(mlmodel, _recipe("coreml/palettize-4bit"), tied_embeddings=dec.spec.tie_word_embeddings)
    pal.save(str(tmp_path / "pal.mlpackage"))
    ops = op_counts(read_spec(tmp_path / "pal.mlpackage"))
    assert applied["applied"] and ops.get("constexpr_lut_to_dense") == ops.get("linear")
    assert "constexpr_blockwise_shift_scale" not in ops
    ratio = weight_bytes(tmp_path / "pal.mlpackage") / weight_bytes(tmp_path / "fp16.mlpackage")
    bound = RATIO_BOUND["coreml/palettize-4bit"]
    assert ratio <= bound, f"palettize-4bit: weight.bin is {ratio:.2f} of fp16 (bound {bound})"


@pytest.mark.integration
def test_structural_check_catches_mismatches(artifacts, tmp_path):
    from cdcda_export.export.coreml import coreml_structural_check

    src = artifacts("coreml/fp16")
    # a manifest whose state signature differs from the package
    bad = tmp_path / "bad-state"
    shutil.copytree(src, bad)
    m = json.loads((bad / "manifest.json").read_text())
    first = sorted(m["io"]["states"])[0]
    m["io"]["states"][first]["shape"][2] = 2 * MAX_SEQ
    (bad / "manifest.json").write_text(json.dumps(m))
    res = coreml_structural_check(bad)
    assert not res["passed"] and not res["checks"]["states_match"]
    # an fp16 package claimed to be int4: the compressed op types are missing
    fake = tmp_path / "fake-int4"
    shutil.copytree(src, fake)
    m = json.loads((fake / "manifest.json").read_text())
    m["recipe"]["resolved"]["quantization"]["scheme"] = "int4-block"
    (fake / "manifest.json").write_text(json.dumps(m))
    res = coreml_structural_check(fake)
    assert not res["passed"] and not res["checks"]["compressed_weights"]
    assert "constexpr_blockwise_shift_scale" in " ".join(res["problems"])
    # no package at all
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"format": "coreml", "io": {}}))
    assert not coreml_structural_check(tmp_path / "empty")["passed"]


@pytest.mark.integration
def test_runtime_load_on_this_host(artifacts):
    """On Linux the runner says why it cannot run; on macOS it runs prefill + decode."""
    from cdcda_export import runtime

    art = artifacts("coreml/fp16")
    if sys.platform != "darwin":
        with pytest.raises(runtime.RuntimeUnavailable, match="macOS"):
            runtime.load(art)
        return
    r = runtime.load(art)                                   # pragma: no cover - macOS
    assert r.prefill([1, 2, 3]).shape == (3, r.manifest["io"]["vocab_size"])
    assert r.decode(4).shape == (r.manifest["io"]["vocab_size"],) and r.position == 4
