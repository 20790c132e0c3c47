"""ONNX Runtime runner for ``format: onnx`` artifacts (explicit past/present KV I/O).

Feeds ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key|value``
(ORT GenAI names) and keeps ``present.{i}.*`` as the next call's past. Works for artifacts from
both ONNX engines (our decoder and ORT GenAI's builder). For graphs whose KV buffers are shared
(``io.share_buffer``: GroupQueryAttention with ``past_present_share_buffer``), past and present are
bound to one max_seq_len OrtValue per tensor (IOBinding), so the cache is updated in place.
Imports only numpy and onnxruntime (this module travels to devices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import RuntimeUnavailable, chunked_prefill

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


def _widen_lora_inputs(proto, names: set) -> None:
    """fp16 LoRA inputs -> float32 inputs, in memory: each ``Cast(to=float)`` that reads one is removed (its
    readers read the input). The graph casts the (small, constant per user) A/B tensors on every call; this runner
    widens them once per user switch instead (the cast of 2.4M values per token cost SmolLM2 decode time).
    The file on disk keeps fp16 inputs for ORT GenAI and ORT's own adapters. The session's input types say
    what to feed."""
    from onnx import TensorProto

    fp16 = [i for i in proto.graph.input if i.name in names and i.type.tensor_type.elem_type == TensorProto.FLOAT16]
    if not fp16:
        return
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] in names]
    if any(next(a.i for a in n.attribute if a.name == "to") != TensorProto.FLOAT for n in casts) or \
            any(n.input[0] in names and n.op_type != "Cast" for n in proto.graph.node):
        return   # another use of the fp16 inputs: leave the graph as it is
    alias = {n.output[0]: n.input[0] for n in casts}
    for n in casts:
        proto.graph.node.remove(n)
    for n in proto.graph.node:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]
    for i in fp16:
        i.type.tensor_type.elem_type = TensorProto.FLOAT


class OnnxRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int | None = None,
                 provider: str = "CPUExecutionProvider"):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the host
            raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime)") from e
        self.manifest = manifest
        io = manifest["io"]
        self.max_seq_len = int(io["max_seq_len"])
        self.prefill_len = int(io.get("prefill_len") or self.max_seq_len)
        files = [f for f in manifest.get("files", {}) if f.endswith(".onnx")]
        model = artifact_dir / (files[0] if files else "model.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.lora_names: list[str] = []
        self.lora_arrays: dict = {}   # base packages: the active LoRA inputs, fed (or bound) on every call
        self.lora_values: dict = {}   # the same arrays as OrtValues (sharing their memory) for IOBinding
        if manifest.get("delivery") == "base-package":
            self.session = self._base_package_session(model, so, provider)
            self._set_lora({})
        else:
            self.session = ort.InferenceSession(str(model), sess_options=so, providers=[provider])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.share_buffer = bool(io.get("share_buffer", False))
        first = self.inputs[self.past_names[0]]
        self.kv_dtype = _NP.get(first.type, np.float32)
        dims = [d if isinstance(d, int) else None for d in first.shape]
        self.kv_heads = dims[1] or int(io["num_kv_heads"])
        self.head_dim = dims[3] or int(io["head_dim"])
        self.ids_dtype = _NP.get(self.inputs["input_ids"].type, np.int64)
        self.mask_dtype = _NP.get(self.inputs["attention_mask"].type, np.int64) if "attention_mask" in self.inputs else None
        self.adapter = None         # the active adapter package (base packages only)
        self._binding = None        # the IOBinding reused across calls (see _run_bound)
        self.reset()

    def _base_package_session(self, model: Path, so, provider: str):
        """A base package's session with its LoRA inputs as plain inputs that this runner feeds.

        The base package gives each LoRA input an empty default initializer, the contract of ORT's adapters
        (ORT GenAI's ``og.Adapters`` applies ``.onnx_adapter`` files to it, see :mod:`.onnx_genai`). In
        onnxruntime 1.32's Python API, though, ``run_with_iobinding`` ignores the adapters of
        ``RunOptions.add_active_adapter`` and IOBinding cannot bind an input that has an initializer
        ("Failed to find NodeArg ... in the def list"), and this runner needs IOBinding for the shared KV
        buffers. So the session is built from the graph with those empty defaults dropped (in memory; the
        weights still come from the artifact's data file) and the active adapter's tensors are bound as
        inputs. Tested by tests/test_adapter_packages.py (adapter vs merged logits, both engines)."""
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(model), load_external_data=False)
        graph_inputs = {i.name for i in proto.graph.input}
        keep = [i for i in proto.graph.initializer if not (i.name.startswith("lora.") and i.name in graph_inputs)]
        self.lora_names = [i.name for i in proto.graph.initializer if i.name.startswith("lora.") and i.name in graph_inputs]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        _widen_lora_inputs(proto, set(self.lora_names))
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.parent))
        return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=[provider])

    def _set_lora(self, tensors: dict) -> None:
        import onnxruntime as ort

        inputs = {i.name: i for i in self.session.get_inputs()}
        arrays = {}
        for name in self.lora_names:
            arr = tensors.get(name)
            if arr is None:   # no adapter (or a target it lacks): rank 0, the product adds zeros
                shape = [d if isinstance(d, int) else 0 for d in inputs[name].shape]
                arr = np.zeros(shape, dtype=_NP.get(inputs[name].type, np.float16))
            arrays[name] = np.ascontiguousarray(arr.astype(_NP.get(inputs[name].type, np.float16), copy=False))
        self.lora_arrays = arrays
        self.lora_values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self._binding = None   # rebuilt with the new LoRA values on the next call

    def set_adapter(self, package) -> float:
        """Make one user's adapter package active (``None``: the plain base); the base session is kept.

        Reads the ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``) after checking that the package was
        written for this base package (its hash) and that its files match their sha256; its tensors are then
        fed to the same-named LoRA inputs on every call. Returns the seconds it took (the user-switch time)."""
        import time

        import onnxruntime as ort

        from .adapters import read_adapter_package

        t0 = time.perf_counter()
        if not self.lora_names:
            from ..errors import UserError

            raise UserError("this artifact takes no adapter (it is not a base package)",
                            field="delivery", expected="base-package")
        if package is None:
            self._set_lora({})
            self.adapter = None
            return time.perf_counter() - t0
        m = read_adapter_package(package, self.manifest)
        fmt = ort.AdapterFormat.read_adapter(str(Path(package) / m["adapter_file"]))
        # copies: the OrtValues point into the AdapterFormat's buffer, which is freed with it
        self._set_lora({k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()})
        del fmt
        self.adapter = {"package": str(package), "user_id": m.get("user_id")}
        return time.perf_counter() - t0

    def reset(self) -> None:
        n = self.max_seq_len if self.share_buffer else 0
        self.past = {k: np.zeros((1, self.kv_heads, n, self.head_dim), dtype=self.kv_dtype) for k in self.past_names}
        if self.share_buffer:
            # past and present bound to the same OrtValue: GroupQueryAttention updates the cache in place
            import onnxruntime as ort

            self.kv_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.past.items()}
        self._binding = None
        self.position = 0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        t = len(ids)
        if self.position + t > self.max_seq_len:
            raise ValueError(f"{self.position + t} tokens exceed max_seq_len={self.max_seq_len}; call reset()")
        feeds = {"input_ids": np.asarray([ids], dtype=self.ids_dtype)}
        total = self.position + t
        if self.mask_dtype is not None:
            feeds["attention_mask"] = np.ones((1, total), dtype=self.mask_dtype)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.position, total, dtype=np.int64)[None]
        if self.share_buffer:
            return self._run_bound(feeds, total)
        feeds.update(self.past)
        feeds.update(self.lora_arrays)
        outs = self.session.run(None, feeds)
        res = dict(zip(self.output_names, outs))
        for past, present in zip(self.past_names, self.present_names):
            self.past[past] = res[present]
        self.position = total
        return np.asarray(res["logits"][0], dtype=np.float32)

    def _run_bound(self, feeds: dict, total: int) -> np.ndarray:
        # One IOBinding per (KV buffers, LoRA values), kept across calls: the KV caches and a base package's
        # LoRA inputs (420 on SmolLM2 at all seven targets) are bound once, not on every token. Binding them
        # per call cost a Python loop of ~480 bind calls per decoded token. Each call rebinds only the
        # token inputs, and the logits output (ORT would otherwise try to reuse the last call's logits buffer,
        # whose shape differs between a prefill chunk and a decode step); a rebound name keeps its position.
        b = self._binding
        if b is None:
            b = self.session.io_binding()
            b.bind_output("logits")   # first, so it is get_outputs()[0]
            for past, present in zip(self.past_names, self.present_names):
                b.bind_ortvalue_input(past, self.kv_values[past])
                b.bind_ortvalue_output(present, self.kv_values[past])
            for name, value in self.lora_values.items():
                b.bind_ortvalue_input(name, value)
            self._binding = b
        else:
            b.bind_output("logits")
        for name, arr in feeds.items():
            b.bind_cpu_input(name, arr)
        self.session.run_with_iobinding(b)
        self.position = total
        return np.asarray(b.get_outputs()[0].numpy()[0], dtype=np.float32)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return chunked_prefill(self._run, token_ids, self.prefill_len)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([int(token_id)])[-1]


ENGINES = ("onnxruntime", "onnxruntime-genai")


def load(artifact_dir: Path, manifest: dict, threads: int | None = None, engine: str | None = None, **options):
    """``engine``: ``onnxruntime`` (default: this module's session loop) or ``onnxruntime-genai`` (ORT
    GenAI's generator reading the artifact's genai_config.json, :mod:`.onnx_genai`)."""
    if engine in (None, "", "onnxruntime"):
        return OnnxRunner(Path(artifact_dir), manifest, threads=threads, **options)
    if engine == "onnxruntime-genai":
        from .onnx_genai import load as genai_load

        return genai_load(Path(artifact_dir), manifest, threads=threads)
    raise ValueError(f"onnx engine {engine!r} is not known; known: {', '.join(ENGINES)}")
