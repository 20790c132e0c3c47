"""Recipe schema, registry and messages (unit tests: no export)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cdcda_export.errors import UserError, ValidationErrors
from cdcda_export.export.recipe import Recipe, load_recipe, recipe_from_dict
from cdcda_export.export.registry import available_formats, get_exporter, list_recipes, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads_and_is_listed():
    entries = list_recipes()
    keys = {e.key for e in entries}
    assert {"onnx/fp32", "onnx/int8", "onnx/int4"} <= keys
    for e in entries:
        assert isinstance(e.recipe, Recipe)
        assert e.key == f"{e.recipe.format}/{e.path.stem}", f"{e.path}: folder must be the format"
        assert e.recipe.name == e.path.stem, f"{e.path}: name must match the file name"


def test_onnx_recipes_content():
    r4, _ = resolve_recipe("onnx/int4")
    assert (r4.quantization.scheme, r4.quantization.block_size, r4.onnx.accuracy_level) == ("int4", 32, 4)
    assert (r4.quantization.grid, r4.quantization.head_bits, r4.quantization.embeddings) == ("min-scale", 8, "same")
    r8, _ = resolve_recipe("onnx-int8")  # "<format>-<name>" alias
    # MatMulNBits int8 block 32, float compute: the near-lossless recipe holds the near-lossless gate;
    # int8-fast (int8 compute, ORT's fast kernel) is the named speed variant with its measured gate
    assert (r8.quantization.scheme, r8.quantization.block_size, r8.onnx.accuracy_level) == ("int8", 32, 0)
    rf8, _ = resolve_recipe("onnx/int8-fast")
    assert rf8.onnx.accuracy_level == 4 and rf8.thresholds.top1_agreement < r8.thresholds.top1_agreement
    assert (r8.thresholds.mean_kl, r8.thresholds.top1_agreement, r8.thresholds.ppl_ratio) == (0.01, 0.97, 1.01)
    rf, _ = resolve_recipe("onnx/fp32")
    assert rf.quantization.scheme == "none" and rf.onnx.opset >= 17


def test_bad_recipe_names_key_value_and_allowed(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"format": "onnx", "name": "bad", "quantization": {"scheme": "int3"},
                                 "onnx": {"execution_provider": "tpu"}, "colour": "red"}))
    with pytest.raises(ValidationErrors) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "quantization.scheme: 'int3' is not allowed; allowed: none" in msg
    assert "onnx.execution_provider: 'tpu' is not allowed; allowed: cpu" in msg
    assert "colour: unknown key" in msg


def test_scheme_must_fit_format():
    with pytest.raises(ValidationErrors, match=r"'8da4w' is not allowed for format 'onnx'; allowed: none, int8-dynamic"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "8da4w"}})


def test_bad_grid_and_mixed_precision_keys_are_named():
    with pytest.raises(ValidationErrors, match="quantization.grid: 'q4_k' is not allowed; allowed: None, symmetric, "
                                               "asymmetric, min-scale"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "int4", "grid": "q4_k"}})
    with pytest.raises(ValidationErrors, match="head_bits: 6 is not allowed; allowed: 4, 8"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "int4", "head_bits": 6}})
    with pytest.raises(UserError, match="head_calibration"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "int4", "head_bits": 8,
                                                                          "head_calibration": "gptq"}})
    with pytest.raises(UserError, match="needs scheme int8wo for format executorch"):
        recipe_from_dict({"format": "executorch", "name": "x", "quantization": {"scheme": "8da8w",
                                                                                "layers_calibration": "gptq"}})
    with pytest.raises(UserError, match="hot_rows is an ONNX option"):
        recipe_from_dict({"format": "executorch", "name": "x", "quantization": {"scheme": "int8wo", "hot_rows": 16}})
    ok = recipe_from_dict({"format": "executorch", "name": "x", "quantization": {
        "scheme": "int8wo", "head_calibration": "gptq", "layers_calibration": "gptq"}})
    assert ok.quantization.head_calibration == "gptq"
    with pytest.raises(ValidationErrors, match=r"eight_bit: \['attn'\] is not allowed; allowed: down_proj"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "int4", "eight_bit": ["attn"]}})


def test_bad_numbers_are_named():
    with pytest.raises(ValidationErrors) as ei:
        recipe_from_dict({"format": "onnx", "name": "x", "max_seq_len": 64, "prefill_len": 128})
    assert "prefill_len: 128 is not allowed; allowed: 1..max_seq_len (64)" in str(ei.value)
    with pytest.raises(ValidationErrors, match=r"block_size: 48 is not allowed; allowed: a power of two"):
        recipe_from_dict({"format": "onnx", "name": "x", "quantization": {"scheme": "int4", "block_size": 48}})
    with pytest.raises(ValidationErrors, match=r"format: 'tflite' is not allowed; allowed: executorch, onnx, coreml"):
        recipe_from_dict({"format": "tflite", "name": "x"})


def test_overrides_and_file_path(tmp_path):
    r, src = resolve_recipe("onnx/int4", overrides=["quantization.block_size=64", "max_seq_len=256"])
    assert (r.quantization.block_size, r.max_seq_len) == (64, 256)
    assert src.name == "int4.yaml"
    p = tmp_path / "mine.yaml"
    p.write_text((REPO / "recipes/onnx/fp32.yaml").read_text())
    r2, src2 = resolve_recipe(str(p))
    assert r2.format == "onnx" and src2 == p
    with pytest.raises(ValidationErrors, match="quantization.block_size: expected an integer, got 'big'"):
        resolve_recipe("onnx/int4", overrides=["quantization.block_size=big"])


def test_unknown_recipe_lists_available():
    with pytest.raises(UserError) as ei:
        resolve_recipe("no-such-recipe")
    msg = str(ei.value)
    assert "Recipe 'no-such-recipe' not found. Available: [" in msg and "'onnx/int4'" in msg
    with pytest.raises(UserError, match="recipe file not found"):
        resolve_recipe("missing.yaml")


def test_unknown_format_lists_available():
    assert "onnx" in available_formats()
    with pytest.raises(UserError, match=r"Format 'tflite' not available. Available: \[.*'onnx'"):
        get_exporter("tflite")
    assert callable(get_exporter("onnx"))


def test_recipes_from_env_dir(tmp_path, monkeypatch):
    d = tmp_path / "extra" / "onnx"
    d.mkdir(parents=True)
    (d / "mine-int4.yaml").write_text(yaml.safe_dump({"format": "onnx", "name": "mine-int4",
                                                      "quantization": {"scheme": "int4", "block_size": 64}}))
    monkeypatch.setenv("CDCDA_RECIPES", str(tmp_path / "extra"))
    r, _ = resolve_recipe("mine-int4")
    assert r.quantization.block_size == 64


def test_runs_on_this_host():
    onnx = recipe_from_dict({"format": "onnx", "name": "x"})
    coreml = recipe_from_dict({"format": "coreml", "name": "y", "quantization": {"scheme": "fp16"}})
    assert onnx.runs_on_this_host() is True
    assert coreml.runs_on_this_host() is (sys.platform == "darwin")


def test_cli_recipes_lists_table():
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    res = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "onnx/int4" in res.output and "int4 b32" in res.output


def test_cli_recipes_shows_each_recipes_gate():
    """`cdcda recipes` shows the thresholds `cdcda check` holds each recipe to: a speed recipe's own (marked *)
    beside the scheme's defaults, read from the same resolution `cdcda check` uses."""
    from typer.testing import CliRunner

    from cdcda_export.check.thresholds import resolve_thresholds
    from cdcda_export.cli import app

    r, _ = resolve_recipe("onnx/int8-fast")
    values, sources = resolve_thresholds({"format": "onnx", "recipe": {"resolved": r.to_dict()}})
    assert sources["top1_agreement"] == "recipe" and sources["task_metric_drop"].startswith("default:")
    res = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()

    def block(key: str) -> str:   # the recipe's lines up to the blank one after it, as one line of words
        i = next(i for i, ln in enumerate(lines) if ln.startswith(key + " "))
        j = next(j for j in range(i + 1, len(lines)) if not lines[j].strip())
        return " ".join(" ".join(lines[i:j]).split())

    fast = block("onnx/int8-fast")
    assert f"top-1 >= {values['top1_agreement']:g}*" in fast, fast
    assert f"KL <= {values['mean_kl']:g}*" in fast and f"task drop <= {values['task_metric_drop']:g} " in fast
    fp32 = block("onnx/fp32")
    assert "gate: max|dlogit| <= 0.001" in fp32 and "KL <= 1e-05" in fp32 and "free greedy >= 0.9," in fp32, fp32


def test_palettize_4bit_avoids_the_ane_for_coremltools_2716():
    """coremltools issue #2716 (open): a 4-bit palettized *stateful* model converted with coremltools 9.0
    crashes on the Neural Engine after 100-200 predictions. coreml/palettize-4bit is exactly that, so it
    defaults to CPU + GPU and says why in its description (what `cdcda recipes` shows) and in its YAML."""
    r, _ = resolve_recipe("coreml/palettize-4bit")
    assert r.coreml.compute_units == "cpu_and_gpu"
    assert "#2716" in r.description and "Neural Engine" in r.description
    text = (REPO / "recipes" / "coreml" / "palettize-4bit.yaml").read_text()
    comment = [ln for ln in text.splitlines() if ln.lstrip().startswith("#")]
    assert any("#2716" in ln for ln in comment), "the YAML comment must name the upstream issue"
    # an explicit override still opts back in
    assert resolve_recipe("coreml/palettize-4bit", ["coreml.compute_units=all"])[0].coreml.compute_units == "all"
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    res = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "#2716" in res.output and "cpu_and_gpu" in res.output


def test_cli_recipes_is_readable_at_80_columns():
    """At 80 columns every recipe shows its name, format, quantization, target and host support whole, and
    no line is wider than the terminal (a 6-column table there left all but a cut description blank)."""
    from typer.testing import CliRunner

    from cdcda_export.cli import app
    from cdcda_export.export.registry import list_recipes

    res = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    for e in list_recipes():
        q = e.recipe.quantization
        qs = q.scheme + (f" b{q.block_size or q.group_size}" if (q.block_size or q.group_size) else "")
        head = next((ln for ln in lines if ln.startswith(e.key + " ")), None)
        assert head is not None, f"{e.key} has no line of its own"
        assert f"{e.recipe.format}, {qs}, {e.recipe.target}, runs here:" in head
    assert "#2716" in res.output   # descriptions are whole (wrapped), not cut
