"""optimum-executorch peer, in its own venv with its own pins (it pins transformers==5.0.0rc1,
which the product's transformers 5.23 cannot share). XNNPACK recipe, 8da4w linears (group 32),
4-bit embeddings (group 32), custom SDPA + custom KV cache -- its fastest documented CPU setting.
If it fails to install or export, the reason goes into the results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .measure import timed_export

BENCH = Path(__file__).resolve().parents[1]
VENV = BENCH / ".venv-optimum-et"
PY = VENV / "bin" / "python"
PINS = ["optimum-executorch==1.1.0", "executorch==1.5.1", "torch==2.13.0", "numpy<2.4"]


def ensure_venv(log: Path) -> None:
    ok = PY.exists() and subprocess.run([str(PY), "-c", "import optimum.executorch"], capture_output=True).returncode == 0
    if ok:
        return
    if not PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    with open(log, "ab") as f:
        subprocess.run([str(PY), "-m", "pip", "install", *PINS], check=True, stdout=f, stderr=subprocess.STDOUT)


def export(hf_dir: Path, out: Path, log: Path, *, max_seq_len: int = 512, force: bool = False) -> dict:
    if (out / "model.pte").exists() and not force:
        return {"ok": True, "cached": True}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(VENV / "bin" / "optimum-cli"), "export", "executorch", "--model", str(hf_dir),
           "--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
           "--qlinear", "8da4w", "--qlinear_group_size", "32", "--qembedding", "4w",
           "--qembedding_group_size", "32", "--max_seq_len", str(max_seq_len), "--output_dir", str(tmp)]
    res = timed_export(cmd, tmp, log, "optimum-cli export executorch")
    if not res["ok"]:
        return res
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return res


def worker_cmd(out: Path, prompt_file: Path, gen_len: int, threads: int) -> list[str]:
    return [str(PY), str(Path(__file__).with_name("optimum_et_worker.py")), "--model", str(out / "model.pte"),
            "--prompt-file", str(prompt_file), "--gen-len", str(gen_len), "--threads", str(threads)]
