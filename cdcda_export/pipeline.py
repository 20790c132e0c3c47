"""Many users end to end, resumable: augment -> train -> evaluate -> export -> check -> bench.

Every stage writes its outputs atomically and is skipped when they already exist with the same
inputs, so re-running a killed pipeline resumes where it stopped. ``cdcda demo`` is this pipeline
on the embedded default (the shipped synthetic sample data and a small random-weight base).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import apply_overrides, build, load_yaml, to_dict
from .errors import UserError


@dataclass
class TaskRun:
    task: str
    questions: str | None = None        # default: the shipped sample for this task
    outputs: str | None = None
    users: list[str] | None = None       # default: all users
    max_users: int | None = None


@dataclass
class TrainSettings:
    rank: int = 8
    alpha: int = 16
    epochs: int = 3
    max_steps: int = -1
    lr: float = 2e-3
    seed: int = 0
    synthetic_ratio: float = 1.0
    # auto: the base's chat template when it has one and is pretrained (train.format); chat | plain
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "plain")})


@dataclass
class AugmentSettings:
    enabled: bool = True
    teacher: str = field(default="offline", metadata={"choices": ("offline", "openai")})
    base_url: str | None = None
    model: str | None = None
    per_user: int = 8


@dataclass
class PipelineConfig:
    tasks: list[TaskRun]
    base: str | None = None              # an HF model dir; or build `base_arch` when None
    base_arch: str = "tiny"
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    recipes: list[str] = field(default_factory=lambda: ["xnnpack-fp32", "onnx-int4"])
    export_users: int = 1                # users per task that get exported artifacts
    check: bool = True
    bench: bool = True
    bench_runs: int = 3
    bench_prompt_len: int = 32
    bench_gen_len: int = 32

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")


def demo_config(quick: bool = False) -> PipelineConfig:
    return PipelineConfig(
        tasks=[TaskRun("LaMP-3", max_users=2 if quick else 3), TaskRun("LaMP-2", max_users=2 if quick else 3)],
        base_arch="tiny",
        augment=AugmentSettings(per_user=4 if quick else 8),
        train=TrainSettings(epochs=5, lr=2e-3, max_steps=20 if quick else -1),
        recipes=["xnnpack-fp32", "onnx-int4"] if quick else ["xnnpack-fp32", "xnnpack-8da4w", "onnx-int4"],
        bench_runs=2 if quick else 3,
    )


def load_pipeline_config(path: Path | None, overrides: list[str]) -> PipelineConfig:
    data = to_dict(demo_config()) if path is None else load_yaml(path)
    data = apply_overrides(data, overrides)
    if isinstance(data.get("tasks"), list):
        data["tasks"] = [{"task": t} if isinstance(t, str) else t for t in data["tasks"]]
    return build(PipelineConfig, data, source=str(path) if path else "<demo config>",
                 hint="see README 'cdcda pipeline' for the keys")


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]>>[/] {msg}")


def run_pipeline(cfg: PipelineConfig, out: Path) -> dict:
    from .data import load_lamp, sample_paths
    from .models import init_model
    from .utils import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *a):
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t
        return _T()

    if cfg.base:
        base = Path(cfg.base)
        if not (base / "config.json").is_file():
            raise UserError("not a Hugging Face model directory (no config.json)", file=str(base), field="base")
    else:
        base = out / f"base-{cfg.base_arch}"
        _log(f"base model: {cfg.base_arch} (random weights, real config) -> {base}")
        init_model(cfg.base_arch, base)

    summary: dict = {"base": str(base), "tasks": {}, "artifacts": []}
    for tr in cfg.tasks:
        q, o = (tr.questions, tr.outputs) if tr.questions else sample_paths(tr.task)
        ds = load_lamp(tr.task, q, o, require_all_golds=False)
        users = [u.id for u in ds.select(tr.users)]
        if tr.max_users:
            users = users[: tr.max_users]
        tdir = out / tr.task
        _log(f"{tr.task}: {len(users)} users ({', '.join(users)})")

        synthetic = None
        if cfg.augment.enabled:
            from .augment import AugmentConfig, run_augment

            synthetic = tdir / "synthetic"
            with timed("augment"):
                _log(f"{tr.task}: augment ({cfg.augment.teacher} teacher) -> {synthetic}")
                run_augment(AugmentConfig(task=tr.task, questions=Path(q), outputs=Path(o) if o else None, out=synthetic,
                                          teacher=cfg.augment.teacher, base_url=cfg.augment.base_url,
                                          model=cfg.augment.model, per_user=cfg.augment.per_user, users=users,
                                          seed=cfg.train.seed))

        from .train import evaluate, train_users

        adapters = tdir / "adapters"
        with timed("train"):
            _log(f"{tr.task}: per-user LoRA -> {adapters}")
            t = cfg.train
            train_users(base=base, task=tr.task, questions=Path(q), outputs=Path(o) if o else None, out=adapters,
                        users=users, synthetic=synthetic, synthetic_ratio=t.synthetic_ratio, rank=t.rank,
                        alpha=t.alpha, epochs=t.epochs, max_steps=t.max_steps, lr=t.lr, seed=t.seed,
                        prompt_format=t.prompt_format)
        with timed("eval"):
            ev_base = _cached_json(tdir / "eval_base.json", lambda: evaluate(
                base=base, task=tr.task, questions=Path(q), outputs=Path(o), adapter_root=None, users=users,
                prompt_format=cfg.train.prompt_format))
            ev_lora = _cached_json(tdir / "eval_lora.json", lambda: evaluate(
                base=base, task=tr.task, questions=Path(q), outputs=Path(o), adapter_root=adapters, users=users))
        summary["tasks"][tr.task] = {"users": users, "base": ev_base.get("overall"), "lora": ev_lora.get("overall"),
                                     "primary_metric": ds.task.primary_metric,
                                     "higher_is_better": ds.task.higher_is_better}

        if cfg.recipes:
            from .export.api import export

            for uid in users[: cfg.export_users]:
                for recipe in cfg.recipes:
                    art = tdir / "artifacts" / uid / recipe
                    with timed("export"):
                        _log(f"{tr.task}/{uid}: export {recipe} -> {art}")
                        export(base, adapters / uid, recipe, art, progress=False)
                    summary["artifacts"].append({"task": tr.task, "user": uid, "recipe": recipe, "path": str(art),
                                                 "questions": str(q), "outputs": str(o)})

    if cfg.check and summary["artifacts"]:
        from .check import CheckOptions, check_artifacts
        from .check import report as check_report

        with timed("check"):
            by_user: dict[tuple, list] = {}
            for a in summary["artifacts"]:
                by_user.setdefault((a["task"], a["user"], a["questions"], a["outputs"]), []).append(Path(a["path"]))
            fidelity = []
            for (task, uid, q, o), arts in by_user.items():
                rep_path = out / task / "artifacts" / uid / "fidelity.json"
                if rep_path.is_file():
                    fidelity.extend(check_report.iter_reports(json.loads(rep_path.read_text(encoding="utf-8"))))
                    continue
                _log(f"{task}/{uid}: fidelity check of {len(arts)} artifacts against one reference -> {rep_path}")
                reps = check_artifacts(arts, CheckOptions(task=task, questions=Path(q), outputs=Path(o)))
                check_report.write_json(rep_path, reps)
                check_report.write_markdown(rep_path.with_suffix(".md"), reps, None)
                fidelity.extend(reps)
            summary["fidelity"] = fidelity

    if cfg.bench and summary["artifacts"]:
        from device_harness.api import bench_artifact

        with timed("bench"):
            bench = []
            for a in summary["artifacts"]:
                res_path = Path(a["path"]).parent / f"bench-{a['recipe']}.json"
                _log(f"bench {a['recipe']} on host -> {res_path}")
                bench.append(_cached_json(res_path, lambda a=a: bench_artifact(
                    a["path"], device="host", prompt_len=cfg.bench_prompt_len, gen_len=cfg.bench_gen_len,
                    runs=cfg.bench_runs, warmup=1, threads=1)))
            summary["bench"] = bench

    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(out / "summary.json", summary)
    print_summary(summary)
    return summary


def _cached_json(path: Path, fn):
    from .utils import write_json_atomic

    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    res = fn()
    write_json_atomic(path, res)
    return res


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="Personalization: base vs per-user LoRA (held-out queries)")
    for c in ("task", "users", "metric", "base", "LoRA", "better"):
        t.add_column(c)
    for task, r in summary["tasks"].items():
        base, lora = r.get("base") or {}, r.get("lora") or {}
        for k in base:
            b, l_ = base.get(k), lora.get(k)
            if not isinstance(b, (int, float)) or not isinstance(l_, (int, float)):
                continue
            hib = r["higher_is_better"] if k == r["primary_metric"] else k not in ("MAE", "RMSE")
            better = "yes" if (l_ > b if hib else l_ < b) else ("=" if l_ == b else "no")
            t.add_row(task, str(len(r["users"])), k, f"{b:.3f}", f"{l_:.3f}", better)
    con.print(t)
    if summary.get("fidelity"):
        ft = Table(title="Fidelity vs the eager merged model (cdcda check)")
        for c in ("user", "artifact", "gate", "max|dlogit|", "KL", "top1", "greedy", "ppl x"):
            ft.add_column(c, no_wrap=c == "artifact")
        for r in summary["fidelity"]:
            a, m = r.get("artifact", {}), r.get("metrics") or {}
            gate = "skipped" if r.get("skipped") else ("pass" if r.get("passed") else "FAIL")
            ft.add_row(str(a.get("user_id", "-")), _short(a), gate,
                       *[_f(m.get(k)) for k in ("max_abs_logit_err", "mean_kl", "top1_agreement",
                                                "greedy_match_rate", "ppl_ratio")])
        con.print(ft)
    if summary.get("bench"):
        bt = Table(title="Host bench (cdcda bench --device host; medians)")
        for c in ("user", "artifact", "MB", "load ms", "TTFT ms", "decode tok/s", "RSS MB"):
            bt.add_column(c, no_wrap=c == "artifact")
        for b in summary["bench"]:
            a, m = b.get("artifact", {}), b.get("metrics", {})
            bt.add_row(str(a.get("user_id", "-")), _short(a),
                       *[_f((m.get(k) or {}).get("median")) for k in
                         ("artifact_mb", "load_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb")])
        con.print(bt)
    con.print(f"timings (s): {summary.get('timings_s')}  total {summary.get('total_s')} s")


def _short(artifact: dict) -> str:
    ext = {"executorch": "pte", "onnx": "onnx", "coreml": "mlpackage"}.get(artifact.get("format"), artifact.get("format"))
    return f"{ext}/{artifact.get('recipe') or artifact.get('name')}"


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
