"""Many users end to end, resumable: augment -> train -> export -> check -> bench, per user.

- :mod:`.config`: the typed pipeline config (one dataclass per stage; training defaults from ``train.Hyper``)
- :mod:`.ledger`: SQLite, one record per (task, user, stage) keyed by a fingerprint of the stage's inputs
- :mod:`.stages`: the worker side, one function per stage over the verbs' library functions
- :mod:`.executors`: a bounded local process pool, or Ray tasks
- :mod:`.run`: the driver (plan, skip what is current, dispatch, record) and ``status``

``cdcda demo`` is this pipeline on the embedded default (the shipped sample, a random-weight tiny base).
"""

from .config import (AugmentSettings, BenchSettings, CheckSettings, ExportSettings, PipelineConfig, TaskRun,
                     TrainSettings, demo_config, load_pipeline_config)
from .report import print_status, print_summary
from .run import pipeline_status, run_pipeline

__all__ = ["PipelineConfig", "TaskRun", "AugmentSettings", "TrainSettings", "ExportSettings", "CheckSettings",
           "BenchSettings", "demo_config", "load_pipeline_config", "run_pipeline", "pipeline_status",
           "print_summary", "print_status"]
