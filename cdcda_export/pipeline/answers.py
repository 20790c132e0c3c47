"""Real answers for the demo's summary: the shipped artifact answering a user's held-out queries, as the
base package alone and with that user's adapter package (one loaded base, the user switched on and off)."""

from __future__ import annotations

from pathlib import Path


def artifact_answers(summary: dict, questions: dict[str, str], outputs: dict[str, str | None], *,
                     max_users: int = 2, max_prompts: int = 2) -> list[dict]:
    """Rows ``{task, user, recipe, kind, prompt, gold, base, personalized}`` for up to ``max_users`` users with an
    adapter-package deliverable; ``questions``/``outputs``: the LaMP files per task."""
    from transformers import AutoTokenizer

    from .. import runtime
    from ..check.core import _read_manifest
    from ..check.prompts import user_prompts
    from ..data import get_task
    from ..train.format import encode_prompt

    rows: list[dict] = []
    runners: dict[str, object] = {}
    done = 0
    for entry in summary.get("per_user", []):
        if done >= max_users:
            break
        pkgs = [(name, d["path"]) for name, d in (entry.get("deliverables") or {}).items()
                if d.get("delivery") in ("package", "adapter-package")]
        if not pkgs:
            continue
        recipe, pkg = pkgs[0]
        pkg = Path(pkg)
        manifest = _read_manifest(pkg)            # the base package's, with this user's adapter
        base_pkg = Path(manifest["_base_package"])
        adapter_dir = Path(manifest["adapter"]["source"])
        prompts, task = user_prompts(manifest, entry["task"], questions[entry["task"]], outputs.get(entry["task"]),
                                     adapter_dir, pkg, max_heldout=max_prompts - 1)
        spec = get_task(task)
        if str(base_pkg) not in runners:
            runners[str(base_pkg)] = (runtime.load(base_pkg), AutoTokenizer.from_pretrained(str(base_pkg)))
        runner, tok = runners[str(base_pkg)]
        eos = list((manifest.get("io") or {}).get("eos_token_ids") or [])
        for p in prompts[-max_prompts:]:
            ids = encode_prompt(tok, p.text, max(8, runner.max_seq_len - spec.max_new_tokens))
            texts = {}
            for who, adapter in (("base", None), ("personalized", pkg)):
                runner.set_adapter(adapter)
                out = runtime.greedy_generate(runner, ids, spec.max_new_tokens, eos_ids=eos).tokens
                texts[who] = tok.decode(out, skip_special_tokens=True).strip()
            rows.append({"task": entry["task"], "user": entry["user"], "recipe": recipe, "kind": p.kind,
                         "prompt": " ".join(p.text.split())[-160:], "gold": p.gold, **texts,
                         "base_parsed": spec.parse(texts["base"]),
                         "personalized_parsed": spec.parse(texts["personalized"])})
        done += 1
    return rows


def print_answers(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    t = Table(title="Answers of the shipped artifact to held-out queries: base package alone vs with the user's "
                    "adapter package", show_lines=True)
    for c, kw in (("user", {"no_wrap": True}), ("query (end)", {"ratio": 3}), ("gold", {}), ("base", {"ratio": 1}),
                  ("personalized", {"ratio": 1})):
        t.add_column(c, overflow="fold", **kw)
    for r in rows:
        t.add_row(f"{r['task']}/{r['user']}", r["prompt"][-90:], str(r["gold"]), r["base"][:60], r["personalized"][:60])
    Console().print(t)


__all__ = ["artifact_answers", "print_answers"]
