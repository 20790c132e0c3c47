"""CLI smoke tests through the real `cdcda` entry point (subprocess: what a user runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cdcda_export.data import sample_paths

VERBS = ["demo", "data", "augment", "train", "export", "check", "bench", "pipeline", "serve-teacher",
         "init-model", "merge", "eval", "recipes", "generate", "bench-report", "bench-compare"]


def cdcda(*args, check=False):
    return subprocess.run([sys.executable, "-c", "from cdcda_export.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=check)


def test_help_lists_every_contract_verb():
    r = cdcda("--help")
    assert r.returncode == 0, r.stderr
    missing = [v for v in VERBS if v not in r.stdout]
    assert not missing, f"verbs missing from `cdcda --help`: {missing}"


@pytest.mark.parametrize("verb", ["train", "merge", "eval", "demo", "pipeline", "init-model"])
def test_every_core_verb_has_help(verb):
    r = cdcda(verb, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_data_validate_ok_on_sample():
    q, o = sample_paths("LaMP-3")
    r = cdcda("data", "validate", "--task", "LaMP-3", "--questions", q, "--outputs", o)
    assert r.returncode == 0, r.stderr
    assert "ok: LaMP-3, 4 users" in r.stdout


def test_data_validate_bad_file_exits_nonzero_without_traceback(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"id": "../x", "input": "y", "profile": [{"text": "t"}]}]))
    r = cdcda("data", "validate", "--task", "LaMP-3", "--questions", bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "q.json" in r.stderr and "not safe as a folder name" in r.stderr and "missing field 'score'" in r.stderr


def test_unknown_task_is_a_clear_error(tmp_path):
    q, _ = sample_paths("LaMP-3")
    r = cdcda("data", "validate", "--task", "LaMP-9", "--questions", q)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "one of LaMP-1" in r.stderr


def test_init_model_writes_hf_dir_with_real_config(tmp_path):
    r = cdcda("init-model", "--arch", "tiny-qwen2", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    r2 = cdcda("init-model", "--arch", "gpt-9", "--out", tmp_path / "n")
    assert r2.returncode == 2 and "not known" in r2.stderr and "tiny-phi3" in r2.stderr


def test_real_configs_are_exact():
    from cdcda_export.models import ARCHS

    s = ARCHS["smollm2-135m"]
    assert (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
            s["vocab_size"]) == (576, 30, 9, 3, 49152)
    q = ARCHS["qwen2.5-0.5b"]
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_key_value_heads"], q["vocab_size"]) == (896, 24, 2, 151936)
    assert ARCHS["llama-3.2-1b"]["rope_scaling"]["rope_type"] == "llama3"
    assert ARCHS["llama-3.2-1b"]["tie_word_embeddings"] and q["tie_word_embeddings"]
    assert ARCHS["qwen3-0.6b"]["head_dim"] == 128 and ARCHS["tiny-phi3"]["tie_word_embeddings"] is False
