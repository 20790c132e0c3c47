"""``check_artifacts``: run artifacts through their runners and compare them with the eager merged model.

Per artifact (one reference per (base, adapter) pair, built once for all artifacts that share it):

1. integrity: the manifest's files hash as recorded; the artifact's tokenizer is the base's;
2. reference: base + adapter rebuilt from the manifest, hashes verified (``reference.py``);
3. for every prompt: the reference's greedy continuation of N tokens, then the artifact through its
   runner's **prefill + step-by-step decode** (teacher-forced on that continuation, so a KV cache that
   is not updated shows up in the decode positions), then the artifact free-running with
   ``runtime.greedy_generate``;
4. metrics (``metrics.py``), the LaMP task metric on the user's prompts with golds (reference and
   artifact answers, parsed and scored by the task), gates (``thresholds.py``);
5. when a numeric gate fails, the first divergent layer (``localise.py``).

Core ML artifacts on hosts that cannot run them are ``skipped`` with the reason; their structural
checks (I/O and state signature, compressed weight ops) still run and gate.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..runtime.base import teacher_forced_logits
from .metrics import Aggregate, compare_prompt
from .prompts import Prompt, generic_prompts, load_prompts_file, user_prompts
from .thresholds import evaluate_gates, resolve_thresholds, scheme_of

SCHEMA = "cdcda.fidelity/1"


@dataclass
class CheckOptions:
    task: str | None = None
    questions: Path | None = None
    outputs: Path | None = None
    prompts_file: Path | None = None
    generic: bool = True                 # include the shipped generic prompts (unless prompts_file)
    max_new_tokens: int = 16             # N of the greedy match rates
    max_prompt_tokens: int = 96          # fidelity prompts are cut from the left to this
    max_heldout: int | None = 8          # held-out user pairs used (None: all)
    thresholds: dict = field(default_factory=dict)   # command-line overrides
    base: Path | None = None             # moved copies of the base / adapter (hashes must match)
    adapter: Path | None = None
    threads: int = 1                     # runtime threads (1: deterministic and comparable)
    seed: int = 0                        # picks the held-out subset when there are more than max_heldout
    localise: str = "on-fail"            # on-fail | always | never
    task_metric: bool = True
    log: Callable[[str], None] = lambda msg: None


def _read_manifest(art: Path) -> dict:
    mp = art / "manifest.json"
    if not art.is_dir():
        raise UserError("artifact directory not found", file=str(art), hint="export one with `cdcda export ...`")
    if not mp.is_file():
        raise UserError("no manifest.json: not a complete artifact (an interrupted export leaves none)",
                        file=str(art), hint="re-run `cdcda export ...` for this artifact")
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg} at line {e.lineno}", file=str(mp),
                        hint="re-run `cdcda export ...` for this artifact") from None
    if m.get("delivery") == "adapter-package":
        return _adapter_package_manifest(art, m)
    return m


def _adapter_package_manifest(pkg: Path, m: dict) -> dict:
    """An adapter package checks as its base package with the adapter active: the base package's manifest
    with the adapter package's ``adapter`` (source, sha256: the reference merges that peft adapter),
    ``user_id`` and ``task``; ``_base_package`` / ``_adapter_package`` tell the runner what to load."""
    from ..runtime.adapters import read_adapter_package, read_json

    src = Path((m.get("base_package") or {}).get("source") or "")
    if not (src / "manifest.json").is_file():
        raise UserError(f"the base package of this adapter package is not on disk at {str(src)!r}",
                        file=str(pkg / "manifest.json"), field="base_package.source",
                        hint="rebuild the base package (`cdcda export --base-package ...`) and rewrite the adapter "
                             "package for it (`cdcda export --adapter-only ...`)")
    base = read_json(src / "manifest.json", "a base package")   # a damaged one is a UserError naming it
    read_adapter_package(pkg, base)   # files and the base package's hash, before any work
    merged = dict(base)
    merged.update({"adapter": {"source": m["adapter"]["source"], "sha256": m["adapter"]["sha256"]},
                   "user_id": m.get("user_id"), "task": m.get("task"),
                   "_base_package": str(src), "_adapter_package": str(pkg)})
    return merged


def _artifact_summary(art: Path, manifest: dict) -> dict:
    rec = manifest.get("recipe") or {}
    io = manifest.get("io") or {}
    return {"path": str(art), "format": manifest.get("format"), "recipe": rec.get("name"),
            "scheme": scheme_of(manifest), "user_id": manifest.get("user_id"), "task": manifest.get("task"),
            "model_type": io.get("model_type") or io.get("family"), "max_seq_len": io.get("max_seq_len"),
            "files_bytes": sum(int(v.get("bytes", 0)) for v in (manifest.get("files") or {}).values()),
            "created_at": manifest.get("created_at")}


def _integrity_checks(art: Path, manifest: dict, ref_tokenizer_sha: str | None) -> dict:
    from ..export.manifest import verify
    from ..utils import sha256_file

    checks = {}
    problems = verify(art)
    checks["files_match_manifest"] = {"passed": not problems, "problems": problems}
    if ref_tokenizer_sha is not None and (art / "tokenizer.json").is_file():
        got = sha256_file(art / "tokenizer.json")
        checks["tokenizer_matches_base"] = {
            "passed": got == ref_tokenizer_sha,
            "problems": [] if got == ref_tokenizer_sha else
            [f"tokenizer.json {got[:12]}... differs from the base model's {ref_tokenizer_sha[:12]}..."]}
    return checks


def _coreml_structure(art: Path) -> dict:
    try:
        from ..export.coreml import coreml_structural_check
    except ImportError as e:  # pragma: no cover - depends on the checkout
        return {"passed": False, "problems": [f"structural check unavailable: {e}"]}
    try:
        res = coreml_structural_check(art)
    except Exception as e:  # noqa: BLE001 - a broken package is a failed check, reported with its reason
        return {"passed": False, "problems": [f"{type(e).__name__}: {e}"]}
    return res


@dataclass
class _PromptRun:
    prompt: Prompt
    ids: list[int]
    cont: list[int]
    ref_logits: np.ndarray
    art_logits: np.ndarray | None = None
    free: list[int] | None = None


def _task_scores(ref, runner, task_name: str, prompts: list[Prompt], eos_ids: list[int], max_len: int) -> dict:
    from ..data import get_task
    from ..runtime import greedy_generate

    spec = get_task(task_name)
    items = [p for p in prompts if p.gold is not None]
    if not items:
        return {}
    n_new = spec.max_new_tokens
    ref_preds, art_preds, golds = [], [], []
    for p in items:
        ids = ref.encode(p.text, max(1, max_len - n_new))
        r = ref.greedy(ids, n_new, eos_ids)
        a = greedy_generate(runner, ids, n_new, eos_ids=eos_ids).tokens
        ref_preds.append(spec.parse(ref.decode_text(r)))
        art_preds.append(spec.parse(ref.decode_text(a)))
        golds.append(p.gold)
    m_ref = spec.metrics(ref_preds, golds)
    m_art = spec.metrics(art_preds, golds)
    name = spec.primary_metric
    drop = (m_ref[name] - m_art[name]) if spec.higher_is_better else (m_art[name] - m_ref[name])
    return {"task": spec.name, "name": name, "higher_is_better": spec.higher_is_better, "n": len(items),
            "ref": m_ref, "artifact": m_art, "same_answers": sum(a == b for a, b in zip(ref_preds, art_preds)),
            "drop": drop}


def check_group(arts: list[tuple[Path, dict]], opts: CheckOptions) -> list[dict]:
    """Check artifacts that share one reference (same base + adapter hashes)."""
    from ..runtime import RuntimeUnavailable, greedy_generate
    from ..runtime import load as load_runner
    from .reference import get_reference, verify_sources

    reports: list[dict] = []
    art0, man0 = arts[0]
    base_dir, adapter_dir, _ = verify_sources(art0, man0, opts.base, opts.adapter)
    ref = None

    # Prompts (shared by the group): user prompts first (personalized fidelity), then generic / file.
    prompts: list[Prompt] = []
    task_name = None
    if opts.task:
        if not opts.questions:
            raise UserError("--task needs --questions (and --outputs for the task metric)", field="--questions",
                            hint="pass --questions train_questions.json --outputs train_outputs.json")
        up, task_name = user_prompts(man0, opts.task, opts.questions, opts.outputs, adapter_dir, art0,
                                     max_heldout=opts.max_heldout, seed=opts.seed)
        prompts += up
    if opts.prompts_file:
        prompts += load_prompts_file(opts.prompts_file)
    elif opts.generic:
        prompts += generic_prompts()
    if not prompts:
        raise UserError("no prompts to check with", field="--prompts", hint="drop --no-generic or pass --prompts FILE")

    for art, manifest in arts:
        opts.log(f"checking {art} ({manifest.get('format')}/{(manifest.get('recipe') or {}).get('name')})")
        thresholds, sources = resolve_thresholds(manifest, opts.thresholds)
        report: dict = {"schema": SCHEMA, "artifact": _artifact_summary(art, manifest)}
        skipped = None
        runner = None
        model_dir = Path(manifest.get("_base_package") or art)   # an adapter package runs on its base package
        try:
            runner = load_runner(model_dir, threads=opts.threads, adapter=manifest.get("_adapter_package"))
        except RuntimeUnavailable as e:
            skipped = {"reason": str(e), "host": sys.platform}
        if ref is None and skipped is None:
            ref = get_reference(art, manifest, opts.base, opts.adapter)
        checks = _integrity_checks(model_dir, manifest, ref.tokenizer_sha256 if ref else None)
        if manifest.get("_adapter_package"):
            report["artifact"]["delivery"] = "adapter-package"
            report["artifact"]["base_package"] = str(model_dir)
        if manifest.get("format") == "coreml":
            checks["coreml_structure"] = _coreml_structure(art)
        report["reference"] = ref.describe() if ref else {
            "base_model": {"source": str(base_dir), "sha256": (manifest.get("base_model") or {}).get("sha256"),
                           "verified": True},
            "adapter": ({"source": str(adapter_dir), "sha256": manifest["adapter"].get("sha256"), "verified": True}
                        if manifest.get("adapter") else None)}
        if skipped is not None:
            report.update({"prompts": {"count": 0, "items": []}, "metrics": {}, "thresholds": thresholds,
                           "threshold_sources": sources, "gates": [], "checks": checks, "skipped": skipped,
                           "passed": all(c.get("passed") for c in checks.values())})
            reports.append(report)
            continue

        n_new = opts.max_new_tokens
        max_prompt = max(2, min(opts.max_prompt_tokens, runner.max_seq_len - n_new))
        # Generation stops at the end-of-sequence token, as every runtime's generate does (ORT GenAI, the
        # ExecuTorch runner, llama.cpp, ours): positions after it are never computed by an app. They were
        # compared before, and dominated max |dlogit| on a LaMP-3 adapter trained to answer "N<eos>": the
        # reference then continued "<|im_end|> ... <|im_end|><|im_end|> system" and ExecuTorch int8 differed
        # by 3.14 logits there against <= 0.43 up to the EOS (user 3000, 2026-11-27).
        eos = list((manifest.get("io") or {}).get("eos_token_ids") or ref.eos_ids)
        agg = Aggregate()
        runs: list[_PromptRun] = []
        described = []
        err_thr = thresholds.get("max_abs_logit_err")
        for p in prompts:
            ids = ref.encode(p.text, max_prompt)
            cont = ref.greedy(ids, n_new, eos)
            seq = ids + cont
            ref_logits = ref.logits(seq[:-1])
            art_logits = teacher_forced_logits(runner, ids, cont)
            free = greedy_generate(runner, ids, n_new, eos_ids=eos).tokens
            res = compare_prompt(p.id, p.kind, len(ids), ref_logits, art_logits, cont, free, seq, err_thr)
            agg.results.append(res)
            runs.append(_PromptRun(p, ids, cont, ref_logits, art_logits, free))
            described.append(p.describe(len(ids)))
        metrics = agg.metrics()
        task_info = {}
        if opts.task_metric and task_name:
            task_info = _task_scores(ref, runner, task_name, prompts, eos, runner.max_seq_len)
            if task_info:
                metrics["task_metric"] = task_info["name"]
                metrics["task_metric_ref"] = task_info["ref"][task_info["name"]]
                metrics["task_metric_artifact"] = task_info["artifact"][task_info["name"]]
                metrics["task_metric_drop"] = task_info["drop"]
        gates = evaluate_gates(metrics, thresholds, sources)
        numeric_ok = all(g.passed for g in gates)
        checks_ok = all(c.get("passed") for c in checks.values())
        report.update({
            "prompts": {"count": len(prompts), "user": sum(p.kind.startswith("user") for p in prompts),
                        "generic": sum(p.kind in ("generic", "file") for p in prompts),
                        "max_new_tokens": n_new, "stop_at_eos": eos, "max_prompt_tokens": max_prompt, "seed": opts.seed,
                        "task": task_name, "items": described},
            "metrics": metrics,
            "task_eval": task_info or None,
            "thresholds": thresholds,
            "threshold_sources": sources,
            "gates": [g.to_dict() for g in gates],
            "checks": checks,
            "per_prompt": [r.to_row() for r in agg.results],
            "skipped": None,
            "passed": bool(numeric_ok and checks_ok),
        })
        if manifest.get("_adapter_package"):
            report["divergence"] = None   # the per-layer mirror does not feed LoRA inputs (not localised yet)
        elif opts.localise == "always" or (opts.localise == "on-fail" and not numeric_ok):
            from .localise import localise

            worst = max(range(len(agg.results)), key=lambda i: agg.results[i].max_abs_err)
            run = runs[worst]
            report["divergence"] = localise(art, manifest, ref, run.ids, run.cont, thresholds, opts)
            report["divergence"]["prompt_id"] = run.prompt.id
        else:
            report["divergence"] = None
        reports.append(report)
        del runner
    return reports


def check_artifacts(artifacts: list[str | Path], opts: CheckOptions | None = None) -> list[dict]:
    """Check each artifact; artifacts of the same (base, adapter) share one reference and one prompt set."""
    import torch

    opts = opts or CheckOptions()
    # The reference runs tiny matmuls; extra intra-op threads only add synchronisation (on a busy
    # 2-core host a [4,70,16] matmul took 33 ms with 2 threads and 0.04 ms with 1).
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(opts.threads)))
    try:
        return _check_all(artifacts, opts)
    finally:
        torch.set_num_threads(prev_threads)


def _check_all(artifacts: list[str | Path], opts: CheckOptions) -> list[dict]:
    if not artifacts:
        raise UserError("no artifact given", hint="cdcda check ART [ART ...] --report R.json")
    loaded = [(Path(a), _read_manifest(Path(a))) for a in artifacts]
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for art, m in loaded:
        key = ((m.get("base_model") or {}).get("sha256"), (m.get("adapter") or {}).get("sha256"))
        groups.setdefault(key, []).append((art, m))
    order = {str(a): i for i, (a, _) in enumerate(loaded)}
    reports: list[dict] = []
    for members in groups.values():
        reports += check_group(members, opts)
    reports.sort(key=lambda r: order[r["artifact"]["path"]])
    return reports
