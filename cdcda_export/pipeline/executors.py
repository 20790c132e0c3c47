"""Where jobs run: a bounded local process pool, or Ray tasks on a local or remote cluster.

Both take a :class:`~.stages.Job` and return a ``concurrent.futures.Future`` of :func:`~.stages.run_job`'s
dict, so the driver's scheduler and the ledger are the same for both (a run started locally can be
finished on Ray and the other way round).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .stages import Job, TransientError, run_job

GIB = 1 << 30
# what one worker holds besides the model: torch + transformers + onnxruntime/executorch imported, eager
# reference and runtime buffers (measured ~1.1 GiB peak RSS on the tiny shapes); the model term is
# weights x 6 (base, the deep copy LoRA trains on, merged reference, exported copy, grads/optimizer slack)
WORKER_OVERHEAD = int(1.5 * GIB)
MODEL_FACTOR = 6
ENV_PASSTHROUGH = ("CDCDA_CACHE", "CDCDA_PIPELINE_FAULTS", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                   "TOKENIZERS_PARALLELISM")


def model_bytes(base: str | Path) -> int:
    b = Path(base)
    if b.is_file():
        return b.stat().st_size
    return sum(p.stat().st_size for p in b.glob("*.safetensors")) + sum(p.stat().st_size for p in b.glob("*.bin"))


def worker_memory(base: str | Path) -> int:
    """Memory one worker is expected to need for this base (bytes): the declared Ray memory and the unit
    the local pool divides the available memory by."""
    return WORKER_OVERHEAD + MODEL_FACTOR * model_bytes(base)


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return 4 * GIB


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass
class PoolSize:
    workers: int
    threads: int
    why: str


def local_pool_size(base: str | Path, requested: int | None = None) -> PoolSize:
    """Workers = min(cores, available memory / per-worker memory, ``requested``), at least 1; torch threads
    per worker = cores / workers."""
    cores = cpu_count()
    per = worker_memory(base)
    by_mem = max(1, int(available_memory() * 0.8) // per)
    n = max(1, min(cores, by_mem, requested or cores))
    why = (f"{n} workers: {cores} cores, {available_memory() / GIB:.1f} GiB available / "
           f"{per / GIB:.2f} GiB per worker = {by_mem}" + (f", --workers {requested}" if requested else ""))
    return PoolSize(n, max(1, cores // n), why)


def _worker_init(threads: int) -> None:
    """Pool worker start: die with the driver (a SIGKILLed driver leaves no worker writing behind it)
    and use ``threads`` torch intra-op threads."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() == 1:   # the driver died before prctl took effect
            os._exit(1)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


class LocalExecutor:
    """A bounded process pool (spawned workers, reused across jobs). A worker that dies (out of memory,
    segfault) breaks the pool: :meth:`restart` builds a new one and the driver resubmits what was in flight."""

    name = "local"
    driver_retries = True     # the driver retries transient failures itself

    def __init__(self, size: PoolSize):
        self.size = size
        self._pool = self._new()

    def _new(self):
        import multiprocessing as mp

        return cf.ProcessPoolExecutor(max_workers=self.size.workers, mp_context=mp.get_context("spawn"),
                                      initializer=_worker_init, initargs=(self.size.threads,))

    def submit(self, job: Job) -> cf.Future:
        return self._pool.submit(run_job, job)

    def restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new()

    def describe(self) -> str:
        return f"local process pool: {self.size.why}; {self.size.threads} torch thread(s) each"

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_run_job(job: Job) -> dict:
    return run_job(job, raise_transient=True)


class RayExecutor:
    """Each job is a Ray task declaring ``num_cpus`` and ``memory`` (training tasks also ``num_gpus``, see
    :func:`train_num_gpus`), with ``max_retries`` (worker or node
    died) and ``retry_exceptions=[TransientError]`` (errors worth retrying; the rest come back as values).
    ``address``: ``auto`` (a running cluster), ``local`` (start one on this machine), ``ray://host:10001``
    (Ray client). An already initialised Ray (``ray.init`` by the caller) is used as it is. Workers must see
    the same paths as the driver (a shared filesystem for ``--out``, the base and the data)."""

    name = "ray"
    driver_retries = False    # Ray retries

    def __init__(self, address: str, *, memory: int, max_retries: int, num_cpus: float = 1.0,
                 threads: int = 1, train_device: str = "auto", gpus_per_task: float = 0.25):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray, which is not installed", field="--executor",
                            hint="pip install 'cdcda-export[ray]'   (or use --executor local)") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}
            env["OMP_NUM_THREADS"] = str(threads)
            kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
            if address == "local":
                kwargs.update(include_dashboard=False)
            ray.init(address=address, **kwargs)
            self._started = True
        self.memory, self.max_retries, self.num_cpus = int(memory), int(max_retries), num_cpus
        opts = dict(num_cpus=num_cpus, memory=self.memory, max_retries=self.max_retries,
                    retry_exceptions=[TransientError])
        self._remote = ray.remote(_ray_run_job).options(**opts)
        self.train_gpus = train_num_gpus(train_device, gpus_per_task, ray.cluster_resources().get("GPU", 0))
        # Ray hides the GPUs from a task that declares none (CUDA_VISIBLE_DEVICES=""): only training asks
        self._remote_train = (ray.remote(_ray_run_job).options(**opts, num_gpus=self.train_gpus)
                              if self.train_gpus else self._remote)

    def submit(self, job: Job) -> cf.Future:
        return (self._remote_train if job.stage == "train" else self._remote).remote(job).future()

    def restart(self) -> None:   # Ray replaces dead workers itself
        pass

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        return (f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, {res.get('memory', 0) / GIB:.1f} GiB "
                f"in the cluster; each task num_cpus={self.num_cpus:g}, memory={self.memory / GIB:.2f} GiB, "
                f"max_retries={self.max_retries}; training tasks num_gpus={self.train_gpus:g}")

    def shutdown(self) -> None:
        if self._started:
            self.ray.shutdown()


def train_num_gpus(device: str, gpus_per_task: float, cluster_gpus: float) -> float:
    """``num_gpus`` a Ray training task declares: ``gpus_per_task`` when ``train.device`` is cuda, or auto on a
    cluster that has GPUs; else 0 (cpu, mps, or auto on a CPU-only cluster). cuda on a cluster without GPUs
    is a UserError here rather than tasks Ray can never schedule."""
    if device == "cuda":
        if cluster_gpus <= 0:
            raise UserError("train.device cuda, but the Ray cluster has no GPUs", field="train.device",
                            expected="a cluster with GPU nodes, or train.device auto | cpu")
        return float(gpus_per_task)
    if device == "auto" and cluster_gpus > 0:
        return float(gpus_per_task)
    return 0.0


def make_executor(kind: str, *, base: str | Path, address: str | None = None, workers: int | None = None,
                  max_retries: int = 2, train=None):
    """``train``: the pipeline's TrainSettings (device, gpus_per_task), for the Ray training tasks' ``num_gpus``."""
    if kind == "local":
        return LocalExecutor(local_pool_size(base, workers))
    if kind == "ray":
        return RayExecutor(address or "auto", memory=worker_memory(base), max_retries=max_retries,
                           train_device=getattr(train, "device", "auto"),
                           gpus_per_task=getattr(train, "gpus_per_task", 0.25))
    raise UserError(f"executor {kind!r}", field="--executor", expected="local or ray")
