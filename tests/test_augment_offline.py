"""The offline augmenter end to end on the shipped sample, and the hand-off to training."""

from __future__ import annotations

import json
from pathlib import Path

from cdcda_export.augment import AugmentConfig, FilterSettings, read_synthetic, run_augment
from cdcda_export.data import get_task, load_lamp, sample_paths


def _rows(out: Path) -> dict[str, list[tuple[str, str]]]:
    return {p.parent.name: [(r["input"], r["output"]) for r in read_synthetic(p)]
            for p in sorted(out.glob("*/synthetic.jsonl"))}


def test_offline_run_is_deterministic_and_feeds_training(tmp_path):
    q = Path(sample_paths("LaMP-2")[0])
    kw = dict(task="LaMP-2", questions=q, teacher="offline", per_user=6, seed=3,
              filters=FilterSettings(min_relevance=None))
    rep = run_augment(AugmentConfig(out=tmp_path / "a", **kw))
    run_augment(AugmentConfig(out=tmp_path / "b", **kw))
    assert rep["status"] == "complete" and rep["users"]["complete"] == 4
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a == b and sum(map(len, a.values())) == rep["kept_total"] > 0
    task = get_task("LaMP-2")
    for uid, rows in a.items():
        assert len(rows) <= 6 and len({i for i, _ in rows}) == len(rows)          # no example twice
        assert all(o in task.labels and i.startswith("Which tag does this movie") for i, o in rows)
    row = json.loads((tmp_path / "a" / "2000" / "synthetic.jsonl").read_text().splitlines()[0])
    assert row["provenance"]["teacher"] == "offline" and row["provenance"]["template"] == "offline-eda@v1"
    assert {"near_dup", "input_chars", "label_share"} <= row["provenance"]["filter_scores"].keys()

    # What `cdcda train --synthetic DIR` reads for a user is exactly what was kept.
    from cdcda_export.train.train import Hyper, build_user_data, read_synthetic_dir

    ds = load_lamp("LaMP-2", q)
    u = ds.users[0]
    syn = read_synthetic_dir(tmp_path / "a", u.id)
    assert [(r["input"], r["output"]) for r in syn] == a[u.id]
    data = build_user_data(task, u, [], syn, Hyper(synthetic_ratio=1.0))
    assert data.counts["synthetic"] == len(syn) and any(src == "synthetic" for _, _, src in data.train)

    # A finished run re-run is a no-op that reports the same outputs.
    again = run_augment(AugmentConfig(out=tmp_path / "a", **kw))
    assert again["kept_per_user"] == rep["kept_per_user"] and all(r.get("resumed") for r in again["per_user"].values())
