"""Training devices: `cdcda train --device/--precision`, CPU results unchanged, clear errors for a device this
host lacks, the auto rules, autocast really applied, and the Ray GPU declaration of the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdcda_export.data import sample_paths
from cdcda_export.errors import UserError
from cdcda_export.train import device as D
from cdcda_export.train import train_users

TASK = "LaMP-3"


def _cdcda(*args):
    return subprocess.run([sys.executable, "-c", "from cdcda_export.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _lora_deltas(t: dict) -> dict:
    """Per adapted module: B @ A (the weight change the adapter makes, before scaling)."""
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            out[k.replace(".lora_A.", ".")] = t[k.replace(".lora_A.", ".lora_B.")] @ a
    return out


def _cosine(x: dict, y: dict) -> float:
    import torch

    a = torch.cat([x[k].flatten() for k in sorted(x)]).double()
    b = torch.cat([y[k].flatten() for k in sorted(y)]).double()
    return float(a @ b / (a.norm() * b.norm()))


def test_cli_default_device_and_explicit_cpu_train_identical_adapters(tiny_model_dir, tmp_path):
    import torch

    assert not torch.cuda.is_available()   # on this host the default must resolve to the CPU
    base = tiny_model_dir("tiny")
    q, o = sample_paths(TASK)
    common = ["train", "--base", base, "--task", TASK, "--questions", q, "--outputs", o, "--users", "3000",
              "--max-steps", 6, "--lr", 2e-3]
    r1 = _cdcda(*common, "--out", tmp_path / "default")
    r2 = _cdcda(*common, "--out", tmp_path / "cpu", "--device", "cpu", "--precision", "fp32")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = _tensors(tmp_path / "default" / "3000"), _tensors(tmp_path / "cpu" / "3000")
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert a[k].dtype == torch.float32 and a[k].device.type == "cpu", k
        assert torch.equal(a[k], b[k]), f"{k} differs between the default device and --device cpu"
    meta = json.loads((tmp_path / "default" / "3000" / "training.json").read_text())
    dev = meta["device"]
    assert dev["requested"] == {"device": "auto", "precision": "auto"}
    assert (dev["device"], dev["precision"], dev["autocast"], dev["grad_scaler"]) == ("cpu", "fp32", None, False)
    assert dev["torch"] == torch.__version__ and dev["cuda"] == torch.version.cuda
    meta2 = json.loads((tmp_path / "cpu" / "3000" / "training.json").read_text())
    assert meta2["device"]["requested"] == {"device": "cpu", "precision": "fp32"}
    assert meta2["loss_curve"] == meta["loss_curve"]


def test_cli_unavailable_device_is_a_user_error_naming_the_flag_and_what_is_available(tmp_path, tiny_base):
    q, o = sample_paths(TASK)
    r = _cdcda("train", "--base", tiny_base, "--task", TASK, "--questions", q, "--outputs", o,
               "--out", tmp_path / "ad", "--device", "cuda")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stdout + r.stderr
    assert "Traceback" not in err
    assert "--device cuda is not available" in err and "cpu" in err.split("--device cuda is not available")[1]
    assert "available here: cpu" in err
    assert not (tmp_path / "ad").exists() or not any((tmp_path / "ad").iterdir())


def test_library_refuses_bad_devices_and_precisions(tiny_base, tmp_path):
    q, o = sample_paths(TASK)
    cases = {("mps", "auto"): "--device mps is not available", ("tpu", "auto"): "--device tpu",
             ("cpu", "fp16"): "--precision fp16 is for GPUs", ("auto", "int8"): "--precision int8"}
    for (dev, prec), words in cases.items():
        with pytest.raises(UserError) as e:
            train_users(tiny_base, TASK, q, o, tmp_path / "x", users=["3000"], max_steps=1, progress=False,
                        device=dev, precision=prec)
        assert words in str(e.value), (dev, prec, str(e.value))


def test_auto_rules(monkeypatch):
    import torch

    p = D.resolve_placement()
    assert (p.device, p.precision, p.autocast_dtype, p.scaler()) == ("cpu", "fp32", None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = D.resolve_placement("auto", "auto")
    assert (p.device, p.precision, p.autocast_dtype, p.uses_scaler) == ("cuda", "bf16", torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = D.resolve_placement("auto", "auto")
    assert (p.device, p.precision, p.autocast_dtype, p.uses_scaler) == ("cuda", "fp16", torch.float16, True)
    assert D.resolve_placement("cpu", "auto").precision == "fp32"   # an explicit cpu stays fp32 next to a GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    with pytest.raises(UserError, match="does not support bfloat16"):
        D.resolve_placement("cuda", "bf16")


def test_bf16_autocast_on_cpu_changes_the_adapter_within_tolerance(tiny_base, tmp_path):
    """The autocast path is really taken (bf16 on the CPU gives other bytes), and stays close to fp32: the
    LoRA deltas' cosine similarity is above the README's 0.99 bound for a reduced-precision run."""
    import torch

    q, o = sample_paths(TASK)
    kw = dict(users=["3001"], max_steps=6, lr=2e-3, progress=False)
    train_users(tiny_base, TASK, q, o, tmp_path / "fp32", device="cpu", precision="fp32", **kw)
    train_users(tiny_base, TASK, q, o, tmp_path / "bf16", device="cpu", precision="bf16", **kw)
    a, b = _tensors(tmp_path / "fp32" / "3001"), _tensors(tmp_path / "bf16" / "3001")
    assert all(t.dtype == torch.float32 for t in b.values())   # saved fp32 whatever the autocast
    assert any(not torch.equal(a[k], b[k]) for k in a), "bf16 autocast changed nothing: not applied"
    cos = _cosine(_lora_deltas(a), _lora_deltas(b))
    assert cos > 0.99, cos
    meta = json.loads((tmp_path / "bf16" / "3001" / "training.json").read_text())
    assert (meta["device"]["precision"], meta["device"]["autocast"]) == ("bf16", "bfloat16")
    la = json.loads((tmp_path / "fp32" / "3001" / "training.json").read_text())["loss_curve"]
    assert abs(meta["loss_curve"][-1] - la[-1]) < 0.05 * abs(la[-1])


def test_pipeline_train_settings_take_device_defaults_from_hyper_and_check_gpus():
    from cdcda_export.config import build
    from cdcda_export.errors import ValidationErrors
    from cdcda_export.pipeline.config import TrainSettings
    from cdcda_export.train import Hyper

    t = TrainSettings()
    assert (t.device, t.precision) == (Hyper.device, Hyper.precision) == ("auto", "auto")
    assert build(TrainSettings, {"device": "cuda", "gpus_per_task": 0.25}).gpus_per_task == 0.25
    for bad in ({"device": "tpu"}, {"precision": "fp8"}, {"gpus_per_task": 0}, {"gpus_per_task": 1.5}):
        with pytest.raises((ValidationErrors, UserError)):
            build(TrainSettings, bad)


def test_ray_training_tasks_declare_fractional_gpus():
    from cdcda_export.pipeline.executors import train_num_gpus

    assert train_num_gpus("cuda", 0.25, cluster_gpus=2) == 0.25
    assert train_num_gpus("auto", 0.5, cluster_gpus=1) == 0.5
    assert train_num_gpus("auto", 0.25, cluster_gpus=0) == 0.0
    assert train_num_gpus("cpu", 0.25, cluster_gpus=4) == 0.0
    with pytest.raises(UserError, match="no GPUs"):
        train_num_gpus("cuda", 0.25, cluster_gpus=0)


def test_train_fingerprint_follows_device_and_precision_not_gpus_per_task(tmp_path):
    """Moving training to another device or precision reruns it (results differ within tolerance);
    changing how many users share a GPU is scheduling only and reruns nothing."""
    from cdcda_export.config import build
    from cdcda_export.pipeline.config import PipelineConfig
    from cdcda_export.pipeline.run import Planner, plan_users

    def fp(**train) -> str:
        cfg = build(PipelineConfig, {"tasks": [{"task": TASK, "users": ["3000"]}], "base": str(tmp_path),
                                     "augment": {"enabled": False}, "train": {"max_steps": 2, **train}})
        planner = Planner(cfg, tmp_path / "out", None, tmp_path, "0" * 64)
        return planner.job(plan_users(cfg, tmp_path / "out")[0], "train", {})[0].fingerprint

    ref = fp()
    assert fp(gpus_per_task=1) == fp(gpus_per_task=0.5) == ref
    assert fp(device="cuda") != ref and fp(precision="bf16") != ref and fp(device="cpu") != ref
