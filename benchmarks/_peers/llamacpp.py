"""llama.cpp peer: llama-cpp-python built from PyPI's source package in its own venv, GGUF files made
with the converter vendored in that source package, quantized with ``llama_model_quantize``.

Everything is cached under ``benchmarks/`` (the venv in ``.venv-llamacpp``, the unpacked source
and the GGUF files in ``.cache/``); re-running reuses them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
VENV = BENCH / ".venv-llamacpp"
CACHE = BENCH / ".cache"
PY = VENV / "bin" / "python"
# Tools, examples, tests and the multimodal library are not needed: only libllama + ggml.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON")
FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def sdist() -> Path | None:
    found = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    return found[-1] if found else None


def source_dir() -> Path:
    """The unpacked source package (holds vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py)."""
    sd = sdist()
    if sd is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        _ensure_venv_python()
        subprocess.run([str(PY), "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:",
                        "--no-deps", "-d", str(CACHE)], check=True)
        sd = sdist()
    out = CACHE / sd.name[: -len(".tar.gz")]
    if not (out / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        subprocess.run(["tar", "xzf", str(sd), "-C", str(CACHE)], check=True)
    return out


def llama_dir() -> Path:
    return source_dir() / "vendor" / "llama.cpp"


def _ensure_venv_python() -> None:
    if not PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)


def installed() -> bool:
    return PY.exists() and subprocess.run([str(PY), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def ensure_venv(log: Path) -> None:
    """Build llama-cpp-python from the source package (about 30-60 min on 2 busy cores)."""
    if installed():
        return
    _ensure_venv_python()
    source_dir()
    sd = sdist()
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with open(log, "ab") as f:
        subprocess.run([str(PY), "-m", "pip", "install", "--no-binary", "llama-cpp-python", "--no-cache-dir", "-v",
                        str(sd)], check=True, env=env, stdout=f, stderr=subprocess.STDOUT)


def convert(hf_dir: Path, out_dir: Path, log: Path) -> Path:
    """HF dir -> F16 GGUF with the vendored converter (run by this interpreter: it needs torch)."""
    out = out_dir / "model-F16.gguf"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(log, "ab") as f:
        subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(llama_dir()),
                        str(hf_dir), str(tmp), "f16"], check=True, stdout=f, stderr=subprocess.STDOUT)
    tmp.rename(out)
    return out


def quantize(f16: Path, qtype: str, log: Path) -> Path:
    out = f16.with_name(f"model-{qtype}.gguf")
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    code = (
        "import ctypes, sys, llama_cpp as L\n"
        "p = L.llama_model_quantize_default_params()\n"
        f"p.ftype = L.{FTYPES[qtype]}\n"
        f"p.nthread = {os.cpu_count() or 2}\n"
        "rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))\n"
        "sys.exit(rc)\n")
    with open(log, "ab") as f:
        subprocess.run([str(PY), "-c", code, str(f16), str(tmp)], check=True, stdout=f, stderr=subprocess.STDOUT)
    tmp.rename(out)
    return out


def prepare(hf_dir: Path, work: Path, log: Path) -> dict[str, Path]:
    """{'F16': path, 'Q8_0': path, 'Q4_0': path}; raises with the reason when something fails."""
    ensure_venv(log)
    f16 = convert(hf_dir, work, log)
    out = {"F16": f16}
    for q in ("Q8_0", "Q4_0"):
        out[q] = quantize(f16, q, log)
    return out


def worker_cmd(gguf: Path, prompt_file: Path, gen_len: int, threads: int, extra_bufts: bool = False) -> list[str]:
    return [str(PY), str(Path(__file__).with_name("llamacpp_worker.py")), "--model", str(gguf),
            "--prompt-file", str(prompt_file), "--gen-len", str(gen_len), "--threads", str(threads),
            "--extra-bufts", "1" if extra_bufts else "0"]


def version() -> str | None:
    if not installed():
        return None
    return subprocess.run([str(PY), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True).stdout.strip()
