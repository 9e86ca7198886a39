"""An experiment's training runs, one after another or several at a time (``aemt experiment --jobs N``).

At these model sizes one run uses a GPU (or a CPU) only partly: a GPU step is mostly host work,
and on a CPU the small matrices scale to only a few threads. A grid of variants × seeds × sweeps
is many independent runs, so ``jobs > 1`` trains that many at once, each in a process of its own:

* on GPUs, the worker processes take the visible GPUs in turn (``CUDA_VISIBLE_DEVICES`` of one
  GPU each; more jobs than GPUs share them), every run on one device;
* on the CPU, the threads are split among them (``torch.get_num_threads() // jobs``, at least 1).

Each file is pooled into the cache once, before the workers start. Workers show no progress
bars; the parent logs each run as it ends. A run that fails stops the
experiment with an error naming it; what finished stays finished, and a rerun resumes the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from aemt.config import Config
from aemt.errors import ConfigError, RunError


@dataclass(frozen=True)
class RunTask:
    """One training run of an experiment: a pre-training or a fine-tuning run, resumed if killed."""

    stage: str  # "pretrain" or "finetune"
    label: str  # what the logs call it, e.g. "aemt, seed 1112"
    config: Config
    data: Path
    run_dir: Path
    pretrained_dir: Path | None = None

    def run(self) -> None:
        """Train (or resume) this run in the current process."""
        from aemt.training.finetune import finetune
        from aemt.training.pretrain import pretrain

        resume = (self.run_dir / "checkpoints" / "last.ckpt").is_file()
        if self.stage == "pretrain":
            pretrain(self.config, self.data, self.run_dir, resume=resume)
        else:
            finetune(self.config, self.data, self.run_dir, pretrained_dir=self.pretrained_dir, resume=resume)


def check_jobs(configs: Sequence[Config], jobs: int) -> None:
    """Refuse ``jobs`` below 1, and several jobs for runs that each want several devices."""
    if jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1, got {jobs}")
    for cfg in configs if jobs > 1 else ():
        t = cfg.trainer
        if t.devices != 1 or t.num_nodes != 1:
            raise ConfigError(f"--jobs {jobs} trains each run on one device: expected trainer.devices 1 and "
                              f"trainer.num_nodes 1, got {t.devices} and {t.num_nodes} (use --jobs 1 for DDP runs)")


def run_tasks(tasks: Sequence[RunTask], jobs: int, log: Callable[[str], None] = print) -> None:
    """Run ``tasks`` (independent runs), ``jobs`` at a time."""
    check_jobs([task.config for task in tasks], jobs)
    if jobs == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks, start=1):
            log(f"[{i}/{len(tasks)}] {task.stage} {task.label}")
            task.run()
        return
    _pool_data_once(tasks)
    workers = min(jobs, len(tasks))
    gpus = _visible_gpus() if any(_uses_gpu(task.config) for task in tasks) else []
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked processes
    slots = context.Queue()
    for w in range(workers):
        slots.put(gpus[w % len(gpus)] if gpus else None)
    where = f"GPUs {', '.join(gpus)}" if gpus else f"CPU, {threads} thread(s) each"
    log(f"{len(tasks)} {tasks[0].stage} runs, {workers} at a time ({where})")
    failed: tuple[RunTask, BaseException] | None = None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(slots, threads)) as pool:
        pending = {pool.submit(_run_in_worker, replace(task, config=_quiet(task.config))): task for task in tasks}
        finished = 0
        while pending and failed is None:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                task, error = pending.pop(future), future.exception()
                if error is not None:
                    failed = failed or (task, error)
                    continue
                finished += 1
                log(f"[{finished}/{len(tasks)}] {task.stage} {task.label}: {future.result():.0f} s")
        if failed is not None:
            for future in pending:
                future.cancel()
            log(f"{failed[0].stage} {failed[0].label} failed; letting the runs already started end")
    if failed is not None:
        task, error = failed
        raise RunError(f"{task.stage} run '{task.run_dir}' ({task.label}) failed: "
                       f"{type(error).__name__}: {error}") from error


def _pool_data_once(tasks: Sequence[RunTask]) -> None:
    """Fill the pooled-data cache here, once per file and setting, before the workers start: they
    then memory-map it rather than each reading and pooling the raw file at the same time. A bad
    file fails here, with the loader's own message."""
    from aemt.data.dataset import warm_cache

    settings = {(task.data, "unlabeled" if task.stage == "pretrain" else "labeled", task.config.data.seq_len,
                 task.config.data.text_input, task.config.data.cache_dir) for task in tasks}
    for path, kind, seq_len, text_input, cache_dir in settings:
        warm_cache(path, kind, seq_len=seq_len, text_input=text_input, cache_dir=cache_dir)


def _uses_gpu(cfg: Config) -> bool:
    from aemt.training.common import uses_gpu

    return uses_gpu(cfg)


def _visible_gpus() -> list[str]:
    """This process's GPUs as the ids a child's ``CUDA_VISIBLE_DEVICES`` names them by."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _quiet(cfg: Config) -> Config:
    """The config without progress bars (several processes share one terminal)."""
    return replace(cfg, trainer=replace(cfg.trainer, progress=False))


def _start_worker(slots, threads: int) -> None:  # noqa: ANN001 (a multiprocessing queue)
    gpu = slots.get()
    if gpu is not None:  # before this process first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    torch.set_num_threads(threads)


def _run_in_worker(task: RunTask) -> float:
    start = time.perf_counter()
    task.run()
    return time.perf_counter() - start
