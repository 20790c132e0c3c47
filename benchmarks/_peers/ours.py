"""Our own recipes, only through the product's CLI: ``cdcda export`` then ``cdcda bench --device host``."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .measure import run_child

CDCDA = str(Path(sys.executable).with_name("cdcda"))


def bench_recipes() -> list[str]:
    """ExecuTorch and ONNX recipes that run on this host (Core ML needs macOS to run)."""
    from cdcda_export.export.registry import list_recipes

    return [e.key for e in list_recipes() if e.recipe.format in ("executorch", "onnx") and e.recipe.runs_on_this_host()]


def recipe_info(key: str) -> dict:
    from cdcda_export.config import to_dict
    from cdcda_export.export.registry import resolve_recipe

    try:
        return to_dict(resolve_recipe(key)[0])
    except Exception:  # noqa: BLE001 - informative only
        return {}


def export(base: Path, key: str, out: Path, log: Path, *, force: bool = False, timeout: float = 1800) -> dict:
    """Export ``key`` to ``out`` in a child process; wall seconds and the child's peak RSS.

    A finished artifact is reused (its cost from the sidecar written when it was made).
    """
    side = out.with_name(out.name + ".export.json")
    stale = _stale_reason(out, key)
    if stale:
        print(f"[peers] re-exporting {key}: the cached artifact is stale ({stale})", file=sys.stderr)
        force = True
    if not force and (out / "manifest.json").exists():
        if side.exists():
            return {**json.loads(side.read_text()), "cached": True}
        m = json.loads((out / "manifest.json").read_text())      # made elsewhere: cost from its manifest
        return {"recipe": key, "ok": True, "cached": True, "manifest_export": m.get("export"),
                "seconds": (m.get("export") or {}).get("seconds"), "peak_rss_mb": None,
                "artifact_mb": sum(v["bytes"] for v in m["files"].values()) / 1e6}
    if force and out.exists():
        shutil.rmtree(out)
    cmd = [CDCDA, "export", "--base", str(base), "--recipe", key, "--out", str(out), "--quiet"]
    if out.exists():
        cmd.append("--force")
    t = time.perf_counter()
    rc, stdout, maxrss_kb, hwm_kb = run_child(cmd, log=log, timeout=timeout)
    secs = time.perf_counter() - t
    res = {"recipe": key, "seconds": secs, "peak_rss_mb": (hwm_kb or maxrss_kb) / 1024, "exit": rc,
           "stdout": stdout.strip()[-500:], "ok": rc == 0 and (out / "manifest.json").exists()}
    if res["ok"]:
        m = json.loads((out / "manifest.json").read_text())
        res["artifact_mb"] = sum(v["bytes"] for v in m["files"].values()) / 1e6
        res["manifest_export"] = m.get("export")
        res["exporter_sha"] = exporter_fingerprint()
        side.write_text(json.dumps(res, indent=2))
    return res


def _stale_reason(out: Path, key: str) -> str | None:
    """Why a cached artifact no longer matches the recipe or the toolchain (None: it matches).

    The benchmark must measure what ``cdcda export`` makes today: a recipe key changed since
    (e.g. a new option with its default) or another library version means a re-export.
    """
    mf = out / "manifest.json"
    if not mf.exists():
        return None
    m = json.loads(mf.read_text())
    old = (m.get("recipe") or {}).get("resolved") or {}
    cur = recipe_info(key)
    if cur and old != cur:
        keys = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
        return f"recipe differs in {', '.join(keys)}"
    from cdcda_export.utils import versions

    now, was = versions(), m.get("versions") or {}
    changed = sorted(k for k in now if was.get(k) != now[k])
    if changed:
        return f"library versions differ: {', '.join(changed)}"
    side = out.with_name(out.name + ".export.json")
    made_by = json.loads(side.read_text()).get("exporter_sha") if side.exists() else None
    if made_by and made_by != exporter_fingerprint():
        return "the exporter code changed since (cdcda_export/export/*.py)"
    return None


def exporter_fingerprint() -> str:
    """sha256 of the exporter sources (cdcda_export/export/*.py), recorded with each cached export."""
    import hashlib

    import cdcda_export.export as pkg

    h = hashlib.sha256()
    for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def bench(art: Path, out_json: Path, log: Path, *, prompt_len: int, gen_len: int, runs: int, warmup: int,
          threads: int, engine: str = "", timeout: float = 1800) -> dict:
    cmd = [CDCDA, "bench", str(art), "--device", "host", "--prompt-len", str(prompt_len), "--gen-len", str(gen_len),
           "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads), "--json", str(out_json)]
    if engine:
        cmd += ["--engine", engine]
    out_json.unlink(missing_ok=True)
    rc, stdout, _, _ = run_child(cmd, log=log, timeout=timeout)
    if rc != 0 or not out_json.exists():
        raise RuntimeError(f"cdcda bench exited {rc}: {stdout[-800:]} (stderr in {log})")
    return json.loads(out_json.read_text())
