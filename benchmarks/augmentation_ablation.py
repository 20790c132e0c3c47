"""Augmentation ablation on the LaMP sample data: does synthetic data help per-user LoRA?

Per task, four rows (the last only with ``--teacher-url``):

* ``base``                      -- the base model, no adapter
* ``lora real``                 -- LoRA on the user's real profile pairs only
* ``lora real+offline``         -- plus ``cdcda augment --teacher offline`` (EDA / recombination)
* ``lora real+teacher``         -- plus ``cdcda augment --teacher openai --base-url URL``

Metrics: the task's primary metric on each user's held-out profile pairs (mean over users) and on
the users' LaMP queries (pooled), from ``cdcda_export.train.train_users`` (its ``training.json``).
**No leakage**: the augmenter only sees the profile items the trainer trains on -- the held-out
items are computed with the trainer's own split (``build_user_data``) and removed from the copy of
the questions file the augmenter reads.

With the default random-weight ``tiny`` base the numbers measure the pipeline, not quality; pass
``--base DIR`` with a real small model for a quality read.

    python benchmarks/augmentation_ablation.py                       # all sample tasks, offline only
    python benchmarks/augmentation_ablation.py --tasks LaMP-3 --teacher-url http://127.0.0.1:8000/v1 \\
        --teacher-model NAME                                         # + teacher row
    python scripts/make_sample_data.py --users 12 --out /tmp/lamp12 && \\
        python benchmarks/augmentation_ablation.py --sample /tmp/lamp12 ...     # more users per task

Writes ``benchmarks/results/augmentation_ablation.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def heldout_items(task, users, seed: int, holdout: float) -> dict[str, set[int]]:
    """Profile indices the trainer holds out per user (mirrors ``train.build_user_data``, checked)."""
    from cdcda_export.train.train import Hyper, build_user_data, n_heldout, negatives_pool

    hp = Hyper(seed=seed, holdout=holdout)
    flat = [(o.id, item) for o in users for item in o.profile]
    out = {}
    for u in users:
        others = negatives_pool(flat, u.id, hp.seed)
        rng = random.Random(f"{hp.seed}:{u.id}")
        pairs = task.profile_pairs(u.profile, rng, others=others)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        held = sorted(order[: n_heldout(len(pairs), hp.holdout)])
        out[u.id] = {pairs[i][2] for i in held}
        data = build_user_data(task, u, others, [], hp)
        if isinstance(data, str):
            continue
        # The trainer's own held-out set must be exactly ours (golds, and questions where rebuildable).
        assert [a for _, a in data.heldout] == [pairs[i][1] for i in held], f"split mismatch for {u.id}"
        if task.name != "LaMP-1":  # LaMP-1 questions hold a random negative; golds checked above
            assert all(pairs[i][0] in p for i, (p, _) in zip(held, data.heldout)), f"split mismatch for {u.id}"
    return out


def train_only_questions(questions: Path, held: dict[str, set[int]], dest: Path) -> Path:
    rows = json.loads(questions.read_text(encoding="utf-8"))
    for r in rows:
        drop = held.get(str(r["id"]), set())
        r["profile"] = [it for i, it in enumerate(r["profile"]) if i not in drop]
    dest.write_text(json.dumps(rows), encoding="utf-8")
    return dest


def summarize(task, users, results, adapters: Path) -> dict:
    """Held-out metric (mean over users) and query metric (pooled), before and after training."""
    per_before, per_after, q_pred_before, q_pred_after, q_gold = [], [], [], [], []
    gold = {u.id: u.gold for u in users}
    synthetic, train_s = 0, 0.0
    for r in results:
        if r.status not in ("trained", "exists"):
            continue
        meta = json.loads((adapters / r.user_id / "training.json").read_text())
        ev = meta["eval"]
        synthetic += meta["data"].get("synthetic", 0)
        train_s += float(meta.get("duration_s") or 0.0)   # from training.json: right on resumed runs too
        if r.metric_before is not None:
            per_before.append(r.metric_before)
            per_after.append(r.metric_after)
        if ev["query"] and gold.get(r.user_id) is not None:
            q_pred_before.append(ev["before"]["query_prediction"])
            q_pred_after.append(ev["after"]["query_prediction"])
            q_gold.append(gold[r.user_id])
    m = task.primary_metric
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {
        "heldout_before": mean(per_before), "heldout_after": mean(per_after),
        "query_before": task.metrics(q_pred_before, q_gold).get(m) if q_gold else None,
        "query_after": task.metrics(q_pred_after, q_gold).get(m) if q_gold else None,
        "users": len(per_after), "queries": len(q_gold), "synthetic_used": synthetic, "train_s": round(train_s, 1),
    }


def run_task(name: str, base: Path, work: Path, args) -> list[dict]:
    from cdcda_export.augment import AugmentConfig, FilterSettings, resolve_api_key, run_augment
    from cdcda_export.data import get_task, load_lamp, sample_paths
    from cdcda_export.train import train_users

    task = get_task(name)
    if args.sample:   # a larger sample from scripts/make_sample_data.py --users N --out DIR
        q, o = args.sample / name / "questions.json", args.sample / name / "outputs.json"
        for f in (q, o):
            if not f.is_file():
                sys.exit(f"error: {f} does not exist (--sample expects DIR/{name}/questions.json and outputs.json); "
                         f"write one with: python scripts/make_sample_data.py --users 12 --out {args.sample}")
    else:
        q, o = (Path(p) for p in sample_paths(name))
    ds = load_lamp(name, q, o)
    held = heldout_items(task, ds.users, args.seed, args.holdout)
    # a --sample run gets its own folder, keyed by the file's content: its user ids (1000, 1001, ...) repeat the
    # shipped sample's, and train_users would otherwise resume another sample's adapters as if they were these
    tdir = work / name if not args.sample else work / f"{name}-{hashlib.sha256(q.read_bytes()).hexdigest()[:12]}"
    tdir.mkdir(parents=True, exist_ok=True)
    q_train = train_only_questions(q, held, tdir / "questions_train_only.json")
    common = dict(epochs=args.epochs, seed=args.seed, holdout=args.holdout, progress=False, rank=args.rank,
                  lr=args.lr)

    configs = [("lora real", None)]
    aug_reports = {}
    filt = FilterSettings(min_relevance=None if args.no_relevance else args.min_relevance)
    t0 = time.time()
    rep = run_augment(AugmentConfig(task=name, questions=q_train, out=tdir / "syn_offline", teacher="offline",
                                    per_user=args.per_user, seed=args.seed, filters=filt))
    aug_reports["lora real+offline"] = {"kept": rep["kept_total"], "filters": rep["filters"],
                                        "seconds": round(time.time() - t0, 1)}
    configs.append(("lora real+offline", tdir / "syn_offline"))
    if args.teacher_url:
        t0 = time.time()
        key = resolve_api_key(args.api_key_env, explicit=args.api_key_env != "OPENAI_API_KEY")
        rep = run_augment(AugmentConfig(task=name, questions=q_train, out=tdir / "syn_teacher", teacher="openai",
                                        base_url=args.teacher_url, model=args.teacher_model, per_user=args.per_user,
                                        seed=args.seed, concurrency=args.concurrency, max_tokens=args.teacher_max_tokens,
                                        timeout=args.teacher_timeout,
                                        filters=filt), api_key=key)
        aug_reports["lora real+teacher"] = {"kept": rep["kept_total"], "filters": rep["filters"],
                                            "replies": rep["teacher_replies"], "tokens": rep["tokens"],
                                            "malformed": rep["malformed_replies"], "candidates": rep["candidates"],
                                            "requests": rep["requests"], "reasks": rep["this_run"].get("reasks", 0),
                                            "reasks_after_cut": rep["this_run"].get("reasks_after_cut", 0),
                                            "status": rep["status"], "seconds": round(time.time() - t0, 1)}
        configs.append(("lora real+teacher", tdir / "syn_teacher"))

    rows = []
    base_row = None
    for label, syn in configs:
        adapters = tdir / f"adapters_{label.split()[-1].replace('+', '_')}"
        res = train_users(base, name, q, o, adapters, synthetic=syn, synthetic_ratio=args.synthetic_ratio, **common)
        s = summarize(task, ds.users, res, adapters)
        if base_row is None:
            base_row = {"task": name, "config": "base", "metric": task.primary_metric,
                        "higher_is_better": task.higher_is_better, "heldout": s["heldout_before"],
                        "query": s["query_before"], "users": s["users"], "synthetic_used": 0, "train_s": 0.0}
            rows.append(base_row)
        rows.append({"task": name, "config": label, "metric": task.primary_metric,
                     "higher_is_better": task.higher_is_better, "heldout": s["heldout_after"],
                     "query": s["query_after"], "users": s["users"], "synthetic_used": s["synthetic_used"],
                     "train_s": s["train_s"], "augment": aug_reports.get(label)})
    return rows


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    from cdcda_export.data import SAMPLE_TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(SAMPLE_TASKS))
    ap.add_argument("--base", type=Path, help="HF base model dir [default: random-weight --arch]")
    ap.add_argument("--sample", type=Path, help="a LaMP-format sample dir (DIR/LaMP-N/{questions,outputs}.json, "
                    "e.g. from scripts/make_sample_data.py --users 12) [default: the shipped 4-user sample]")
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "augmentation_ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "augmentation_ablation")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--per-user", type=int, default=8)
    ap.add_argument("--synthetic-ratio", type=float, default=1.0)
    ap.add_argument("--min-relevance", type=float, default=0.15)
    ap.add_argument("--no-relevance", action="store_true", help="skip the MiniLM relevance filter")
    ap.add_argument("--teacher-url")
    ap.add_argument("--teacher-model")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--teacher-max-tokens", type=int, default=1024)
    ap.add_argument("--teacher-timeout", type=float, default=60.0,
                    help="seconds per teacher request in total (a local CPU teacher needs more than a cloud one)")
    ap.add_argument("--note", default="", help="free text added under the title (e.g. what the teacher is)")
    args = ap.parse_args()
    if args.teacher_url and not args.teacher_model:
        ap.error("--teacher-model is required with --teacher-url")

    from cdcda_export.models import init_model
    from cdcda_export.utils import now_iso, versions

    args.work.mkdir(parents=True, exist_ok=True)
    base = args.base or init_model(args.arch, args.work / f"base-{args.arch}", seed=args.seed)
    rows = []
    for name in args.tasks:
        t0 = time.time()
        rows += run_task(name, Path(base), args.work, args)
        print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)

    sample = f"`{args.sample}`" if args.sample else "the shipped sample"
    lines = [f"# Augmentation ablation (LaMP-format sample data: {sample})", "",
             f"Base: `{base}` ({'random weights, ' + args.arch if not args.base else 'given'}); "
             f"epochs {args.epochs}, rank {args.rank}, lr {args.lr}, seed {args.seed}, holdout {args.holdout}, "
             f"synthetic ratio {args.synthetic_ratio}, per-user {args.per_user}. "
             f"Teacher: {args.teacher_model + ' @ ' + args.teacher_url if args.teacher_url else 'none (offline only)'}.",
             "held-out = mean over users of the metric on held-out profile pairs; query = the users' LaMP queries "
             "pooled. Created " + now_iso() + ".", *([args.note] if args.note else []), "",
             "| task | config | metric | held-out | query | users | synthetic used | kept by filters | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        kept = r.get("augment", {}).get("kept") if r.get("augment") else "-"
        lines.append(f"| {r['task']} | {r['config']} | {r['metric']} {arrow} | {fmt(r['heldout'])} | {fmt(r['query'])} "
                     f"| {r['users']} | {r['synthetic_used']} | {kept} | {r['train_s']} |")
    lines += ["", "Augmentation per task and teacher (filter counts are rejections):", ""]
    for r in rows:
        a = r.get("augment")
        if a:
            extra = (f", teacher replies {a['replies']} ({a['malformed']} malformed), "
                     f"re-asks {a.get('reasks', '-')} ({a.get('reasks_after_cut', '-')} after a reply cut at max_tokens) "
                     f"over {a.get('requests', '-')} HTTP requests, "
                     f"candidates {a.get('candidates', '-')}, tokens {a['tokens']['total_tokens']}") if "replies" in a else ""
            rejected = ", ".join(f"{k} {v}" for k, v in a["filters"].items() if v)
            lines.append(f"- {r['task']} {r['config'].split()[-1]}: kept {a['kept']}{extra}; rejected: "
                         f"{rejected or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(f"{args.out}.json").write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                                    "versions": versions(), "created_at": now_iso()}, indent=2),
                                        encoding="utf-8")
    print("\n".join(lines))
    if args.teacher_url and not args.base:
        print("note: a random-weight teacher writes no usable JSON; its row equals `lora real`.")


if __name__ == "__main__":
    main()
