"""Where does an artifact start to diverge? The first layer whose residual stream leaves tolerance.

The reference's residual stream (after the embedding and after every decoder layer) comes from
forward hooks on the eager HF model. The artifact's comes from:

* **ONNX**: the graph re-saved (in a temporary folder) with extra graph outputs -- the residual-stream
  tensors, found structurally: start at the embedding ``Gather`` of ``input_ids`` and follow the
  chain of residual ``Add`` nodes (two per decoder layer: after attention, after the MLP). That
  holds for fp32, int8 (``MatMulInteger``) and int4 (``MatMulNBits``) graphs alike, because
  quantization rewrites only the MatMuls. The modified graph runs through the **same prefill +
  step-by-step decode feeding as the runner**, so a KV-cache fault is localised to the layer and the
  decode position where it first bites.
* **Other formats** (ExecuTorch programs expose only their outputs): an eager mirror --
  ``ExportDecoder`` (the module every exporter lowers) over the reference weights, run with the
  same prefill/decode split -- is compared layer by layer with the reference, and its logits with
  the artifact's. When the mirror matches the reference but the artifact does not, the divergence
  was introduced by lowering, quantization or the runtime, and the report says so.

Tolerance: relative error ``max|art - ref| / max|ref|`` per layer against ``layer_rel_err``
(per-scheme default, ``--threshold layer_rel_err=...``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def _compare_layers(ref_states: list[np.ndarray], art_states: list[np.ndarray], tol: float,
                    prompt_len: int) -> dict:
    rows = []
    first = None
    for i, (r, a) in enumerate(zip(ref_states, art_states)):
        r = np.asarray(r, dtype=np.float64)
        a = np.asarray(a, dtype=np.float64).reshape(r.shape)
        scale = max(float(np.abs(r).max()), 1e-12)
        per_pos = np.abs(a - r).max(axis=-1) / scale
        rel = float(per_pos.max())
        name = "embedding" if i == 0 else f"layer {i - 1}"
        row = {"index": i, "name": name, "max_abs_err": float(np.abs(a - r).max()), "rel_err": rel,
               "exceeds": rel > tol}
        if rel > tol:
            pos = int(np.nonzero(per_pos > tol)[0][0])
            row["first_position"] = pos
            row["phase"] = "prefill" if pos < prompt_len else "decode"
            if first is None:
                first = row
        rows.append(row)
    # where the error grows the most (relative to the layer before): the layer to look at even when
    # every layer stays inside the tolerance (e.g. a quantized artifact failing a tightened logit gate)
    incs = [rows[i]["rel_err"] - (rows[i - 1]["rel_err"] if i else 0.0) for i in range(len(rows))]
    jump = max(range(len(rows)), key=lambda i: incs[i]) if rows else None
    out = {"tolerance": {"layer_rel_err": tol}, "layers": rows,
           "largest_increase_layer": None if jump is None else rows[jump]["name"],
           "first_divergent_layer": None if first is None else first["name"],
           "first_divergent_layer_index": None if first is None else first["index"] - 1}
    if first is not None:
        out["first_position"] = first["first_position"]
        out["phase"] = first["phase"]
        out["summary"] = (f"{first['name']} is the first to exceed rel err {tol:g} "
                          f"({first['rel_err']:.3g}, at position {first['first_position']}, {first['phase']})")
    else:
        out["summary"] = (f"every layer within rel err {tol:g}; the error grows most in "
                          f"{out['largest_increase_layer']} (rel err {rows[jump]['rel_err']:.3g})" if rows else
                          "no layers compared")
    return out


# ----------------------------------------------------------------------------- ONNX


_SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def onnx_residual_tensors(graph) -> list[str]:
    """Names of the residual-stream tensors of an exported decoder graph: [embedding, add_1, add_2, ...].

    A residual sum is an ``Add`` output, or the fourth output (``input_skip_bias_sum``) of a fused
    ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization`` (Add + norm in one node, as our
    ORT-fused graphs and ORT GenAI's builder write them). The stream starts at the embedding lookup, after a
    constant scale when the family has one (Gemma: x sqrt(hidden); without that step the chain stopped at the
    embedding and the real Gemma 3 270M's int4 check could not be localised: 1 of 37 tensors found)."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}

    def is_ids(name: str) -> bool:
        if name == "input_ids":
            return True
        p = producers.get(name)
        return p is not None and p.op_type == "Cast" and p.input[0] == "input_ids"

    start = None
    for n in graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and any(is_ids(i) for i in n.input[1:]) \
                and (n.input[0] in inits or n.input[0] in producers):
            start = n.output[0]
            break
    if start is None:
        return []
    cs = consumers.get(start, [])
    if len(cs) == 1 and cs[0].op_type == "Cast":   # a table with fp16 scales (quantization.scale_dtype): cast back
        start = cs[0].output[0]
        cs = consumers.get(start, [])
    if len(cs) == 1 and cs[0].op_type == "Where":  # hot rows (quantization.hot_rows): 8-bit rows over the 4-bit table
        start = cs[0].output[0]
        cs = consumers.get(start, [])
    consts = inits | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    if len(cs) == 1 and cs[0].op_type == "Mul" and any(i in consts for i in cs[0].input if i != start):
        start = cs[0].output[0]                    # Gemma: the embedding times sqrt(hidden) (``embed_scale``)
    chain = [start]
    h = start
    seen = {h}
    while True:
        nxt = None
        for c in consumers.get(h, []):
            if c.op_type == "Add" and h in c.input:
                other = c.input[1] if c.input[0] == h else c.input[0]
                if other in inits:
                    continue      # a bias / eps, not a residual branch
                nxt = c.output[0]
                break
            if c.op_type in _SKIP_NORMS and h in c.input[:2] and len(c.output) > 3 and c.output[3]:
                nxt = c.output[3]
                break
        if nxt is None or nxt in seen:
            break
        chain.append(nxt)
        seen.add(nxt)
        h = nxt
    return chain


def _onnx_states(art: Path, manifest: dict, ids: list[int], cont: list[int], threads: int) -> tuple[list, dict]:
    import onnx
    import onnxruntime as ort

    files = [f for f in manifest.get("files", {}) if f.endswith(".onnx")]
    model_path = art / (files[0] if files else "model.onnx")
    model = onnx.load(str(model_path))                      # with external data
    names = onnx_residual_tensors(model.graph)
    n_layers = int((manifest.get("io") or {}).get("num_layers") or
                   (manifest.get("io") or {}).get("kv_cache", {}).get("num_layers") or 0)
    info = {"method": "onnx-extra-outputs", "residual_tensors": len(names)}
    if len(names) != 2 * n_layers + 1:
        info["problem"] = (f"found {len(names)} residual-stream tensors, expected {2 * n_layers + 1} "
                           f"(embedding + 2 per layer x {n_layers}); graph not localisable")
        return [], info
    wanted = [names[0]] + [names[2 * i + 2] for i in range(n_layers)]   # after each layer's MLP residual
    info["tensors"] = wanted
    existing = {o.name for o in model.graph.output}
    for nm in wanted:
        if nm not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="cdcda-localise-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in sess.get_inputs()}
        out_names = [o.name for o in sess.get_outputs()]
        past_names = [n for n in inputs if n.startswith("past_key_values.")]
        first = inputs[past_names[0]]
        kvh, hd = int(first.shape[1]), int(first.shape[3])
        kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        io = manifest.get("io") or {}
        # GroupQueryAttention with past_present_share_buffer: past/present are max-length buffers that the
        # node updates at the fed positions (the runner binds them to one OrtValue; here present is copied back)
        buf = int(io.get("max_seq_len") or 0) if io.get("share_buffer") else 0
        past = {k: np.zeros((1, kvh, buf, hd), dtype=kv_dtype) for k in past_names}
        prefill_len = int((manifest.get("io") or {}).get("prefill_len") or len(ids))
        chunks = [ids[i:i + prefill_len] for i in range(0, len(ids), prefill_len)] + [[t] for t in cont[:-1]]
        collected: list[list[np.ndarray]] = [[] for _ in wanted]
        pos = 0
        for chunk in chunks:
            t = len(chunk)
            feeds = {"input_ids": np.asarray([chunk], dtype=np.int64)}
            if "attention_mask" in inputs:
                feeds["attention_mask"] = np.ones((1, pos + t), dtype=np.int64)
            if "position_ids" in inputs:
                feeds["position_ids"] = np.arange(pos, pos + t, dtype=np.int64)[None]
            feeds.update(past)
            res = dict(zip(out_names, sess.run(None, feeds)))
            for p in past_names:
                past[p] = res["present." + p[len("past_key_values."):]]
            for j, nm in enumerate(wanted):
                collected[j].append(np.asarray(res[nm], dtype=np.float32).reshape(t, -1))
            pos += t
        del sess
    return [np.concatenate(c, axis=0) for c in collected], info


# ----------------------------------------------------------------------------- eager mirror


def _mirror_states(ref, manifest: dict, ids: list[int], cont: list[int]) -> tuple[list, np.ndarray, dict]:
    """ExportDecoder (io cache) over a copy of the reference weights with the recipe's quantization applied
    eagerly (ExecuTorch: the exporter's own ``quantize``), fed like the runner; residual stream + logits."""
    import copy

    import torch

    from ..export.decoder import ExportDecoder

    max_len = int((manifest.get("io") or {}).get("max_seq_len") or (len(ids) + len(cont)))
    resolved = (manifest.get("recipe") or {}).get("resolved") or {}
    scheme = (resolved.get("quantization") or {}).get("scheme") or "none"
    quantized = scheme != "none"
    model = copy.deepcopy(ref.model) if quantized else ref.model   # quantization swaps weights in place
    dec = ExportDecoder.from_hf(model, max_seq_len=max(max_len, len(ids) + len(cont)), cache="io",
                                untie_lm_head=quantized)
    info = {"mirror_quantization": "none"}
    if quantized and manifest.get("format") == "executorch":
        from ..export.executorch import calibration_for, quantize
        from ..export.recipe import recipe_from_dict

        rec = recipe_from_dict(resolved)
        # GPTQ / SmoothQuant recipes: the same calibration as the export (float model, shipped LaMP sample)
        calib = calibration_for(rec.quantization, ref.model, ref.base_dir, (manifest.get("io") or {}).get("prompt_format"))
        info["mirror_quantization"] = quantize(dec, rec, calib)
    elif quantized:
        info["mirror_quantization"] = f"not reproduced for {manifest.get('format')} ({scheme}): float mirror"
    sp = dec.spec
    captured: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
             for layer in dec.layers]
    hooks.append(dec.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0])))
    past = [torch.zeros(1, sp.num_kv_heads, 0, sp.head_dim) for _ in range(2 * sp.num_layers)]
    per_call: list[list[torch.Tensor]] = []
    logits = []
    pos = 0
    try:
        with torch.no_grad():
            for chunk in [ids] + [[t] for t in cont[:-1]]:
                captured.clear()
                t = len(chunk)
                out = dec(torch.tensor([chunk]), torch.ones(1, pos + t, dtype=torch.long),
                          torch.arange(pos, pos + t)[None], *past)
                logits.append(out[0][0].float().numpy())
                past = list(out[1:])
                per_call.append([c[0].clone() for c in captured])
                pos += t
    finally:
        for h in hooks:
            h.remove()
    n = len(per_call[0])
    states = [np.concatenate([pc[j].float().numpy() for pc in per_call], axis=0) for j in range(n)]
    return states, np.concatenate(logits, axis=0), info


def localise(art: Path, manifest: dict, ref, ids: list[int], cont: list[int], thresholds: dict, opts) -> dict:
    """The divergence section of a report for one prompt (prompt ``ids`` + reference continuation ``cont``)."""
    tol = thresholds.get("layer_rel_err") or 1e-4
    seq = ids + cont
    ref_states = ref.layer_states(seq[:-1])
    fmt = manifest.get("format")
    try:
        if fmt == "onnx":
            art_states, info = _onnx_states(art, manifest, ids, cont, opts.threads)
            if art_states:
                return {**info, **_compare_layers(ref_states, art_states, tol, len(ids))}
            return {**info, "first_divergent_layer": None, "summary": info.get("problem", "not localisable")}
        states, mirror_logits, minfo = _mirror_states(ref, manifest, ids, cont)
        # the mirror's hooks see the residual stream before each layer and before the final norm:
        # [h_0 (embedding), h_1, ..., h_L], the same points as the reference's
        cmp = _compare_layers(ref_states, states, tol, len(ids))
        from ..runtime import load as load_runner
        from ..runtime import teacher_forced_logits

        runner = load_runner(art, threads=opts.threads)
        art_logits = teacher_forced_logits(runner, ids, cont)
        mirror_err = float(np.abs(art_logits.astype(np.float64) - mirror_logits).max())
        ref_err = float(np.abs(ref.logits(seq[:-1]).astype(np.float64) - mirror_logits).max())
        out = {"method": "eager-mirror", **minfo, **cmp, "mirror_vs_reference_max_abs_logit_err": ref_err,
               "artifact_vs_mirror_max_abs_logit_err": mirror_err}
        art_ref_err = float(np.abs(art_logits.astype(np.float64) - ref.logits(seq[:-1])).max())
        if mirror_err > 0.5 * art_ref_err:
            out["summary"] = (f"the artifact differs from its eager mirror by {mirror_err:.3g} (logits; "
                              f"{art_ref_err:.3g} from the reference): the divergence comes from {fmt} lowering or the "
                              "runtime, not from the decoder" + (" or its quantization" if minfo["mirror_quantization"]
                                                                   not in ("none",) else "")
                              + f". Mirror vs reference: {cmp['summary']}")
        else:
            out["summary"] = (f"the eager mirror reproduces the artifact (logit err {mirror_err:.3g}); "
                              f"in the mirror, {cmp['summary']}")
        return out
    except Exception as e:  # noqa: BLE001 - localisation is a diagnosis; its failure must not hide the gate result
        return {"method": f"{fmt}", "first_divergent_layer": None, "error": f"{type(e).__name__}: {e}",
                "summary": "localisation failed"}
