"""benchmarks/ablation_summary.py: the direction of each metric decides "beats" (MAE lower, accuracy higher), runs
without a teacher row say "-", and files that are not ablation results are skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation_summary as A  # noqa: E402


def _row(task, config, metric, hi, heldout, query=None):
    return {"task": task, "config": config, "metric": metric, "higher_is_better": hi, "heldout": heldout,
            "query": query, "users": 4, "synthetic_used": 0, "train_s": 0.0}


def test_summary_reads_direction_and_missing_rows(tmp_path):
    mae = [_row("LaMP-3", "base", "MAE", False, 2.0), _row("LaMP-3", "lora real", "MAE", False, 0.25),
           _row("LaMP-3", "lora real+offline", "MAE", False, 0.5),
           _row("LaMP-3", "lora real+teacher", "MAE", False, 0.125)]
    acc = [_row("LaMP-2", "base", "accuracy", True, 0.4), _row("LaMP-2", "lora real", "accuracy", True, 0.3),
           _row("LaMP-2", "lora real+offline", "accuracy", True, 0.6)]
    (tmp_path / "a_LaMP-3.json").write_text(json.dumps({"rows": mae, "args": {"seed": "1", "teacher_model": "t"}}))
    (tmp_path / "a_LaMP-2.json").write_text(json.dumps({"rows": acc, "args": {"seed": "0"}}))
    (tmp_path / "a_other.json").write_text(json.dumps({"results": []}))
    runs = [A.summarize(r) for r in A.load_runs(str(tmp_path / "a_*.json"))]
    assert [(s["task"], s["seed"]) for s in runs] == [("LaMP-2", 0), ("LaMP-3", 1)]
    lamp2, lamp3 = runs
    assert lamp2["lora_beats_base"] is False and lamp2["synthetic_beats_real"] == {"offline": True}
    assert lamp3["lora_beats_base"] is True
    assert lamp3["synthetic_beats_real"] == {"offline": False, "teacher": True}
    md = A.write(tmp_path / "out", runs)
    assert "beats the base in 1 of 2 runs" in md and "beats real data alone in 2 of 2" in md
    lamp2_line = next(ln for ln in md.splitlines() if ln.startswith("| LaMP-2"))
    assert lamp2_line.split("|")[8].strip() == "-"          # no teacher row
    assert "**0.600 / -**" in lamp2_line                       # the best held-out value, higher is better
    assert "**0.125 / -**" in md                               # MAE: the lowest is the best
