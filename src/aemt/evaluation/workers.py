"""An experiment's training runs, one after another or several at a time (``aemt experiment --jobs N``).

At these model sizes one run uses a GPU (or a CPU) only partly: a GPU step is mostly host work,
and on a CPU the small matrices scale to only a few threads. A grid of variants × seeds × sweeps
is many independent runs, so ``jobs > 1`` trains that many at once, each in a process of its own:

* on GPUs, the processes take the visible GPUs in turn (``CUDA_VISIBLE_DEVICES`` of one GPU
  each; more jobs than GPUs share them), every run on one device;
* on the CPU, the threads are split among them (``torch.get_num_threads() // jobs``, at least 1).

Each data file is pooled into the cache once, before the first process starts. Processes show
no progress bars; each run is logged as it ends. A run that fails stops the experiment: no new
run starts, the running ones end, and the error names the run (a worker that crashed, or Ctrl-C,
stops the running ones at once; a rerun resumes them from their last epoch).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from aemt.config import Config
from aemt.errors import AEMTError, ConfigError, RunError

_POLL_SECONDS = 1.0  # how often the parent looks for workers that died without a word


@dataclass(frozen=True)
class RunTask:
    """One training run of an experiment: a pre-training or a fine-tuning run, resumed if killed."""

    stage: Literal["pretrain", "finetune"]
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
    gpus = _visible_gpus()[:workers] if any(_uses_gpu(task.config) for task in tasks) else []
    threads = max(1, torch.get_num_threads() // workers)
    log(f"{len(tasks)} {tasks[0].stage} runs, {workers} at a time "
        f"({'GPUs ' + ', '.join(gpus) if gpus else f'CPU, {threads} thread(s) each'})")
    _WorkerPool(workers, gpus, threads, log).run(tasks)


class _WorkerPool:
    """Start one spawned process per run, at most ``workers`` at a time, and collect their ends."""

    def __init__(self, workers: int, gpus: list[str], threads: int, log: Callable[[str], None]) -> None:
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked processes
        self.results = self.context.Queue()  # (task index, seconds, error or None) from each worker
        self.free_slots, self.gpus, self.threads, self.log = list(range(workers)), gpus, threads, log
        self.running: dict[int, tuple[Any, int]] = {}  # task index: (process, slot)

    def run(self, tasks: Sequence[RunTask]) -> None:
        todo, finished, failure = list(range(len(tasks))), 0, None
        try:
            while todo or self.running:
                while todo and self.free_slots and failure is None:
                    self._start(todo.pop(0), tasks)
                if not self.running:
                    break
                index, seconds, error = self._next_end()
                if error is None:
                    finished += 1
                    self.log(f"[{finished}/{len(tasks)}] {tasks[index].stage} {tasks[index].label}: {seconds:.0f} s")
                    continue
                self.log(f"{tasks[index].stage} {tasks[index].label} failed"
                         + ("; the runs already started end first" if self.running and failure is None else ""))
                failure = failure or (tasks[index], error)
                if error[0] == "crash":  # a worker died: the others may be about to as well
                    self._stop_all()
        except BaseException:  # Ctrl-C or an error here: no worker outlives the experiment
            self._stop_all()
            raise
        if failure is not None:
            _raise_failure(*failure, self.log)

    def _start(self, index: int, tasks: Sequence[RunTask]) -> None:
        slot = self.free_slots.pop(0)
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        task = replace(tasks[index], config=_quiet(tasks[index].config))
        process = self.context.Process(target=_worker_main, args=(index, task, gpu, self.threads, self.results),
                                       name=f"aemt-run-{index}")  # not a daemon: it may start processes
        process.start()
        self.running[index] = (process, slot)

    def _next_end(self) -> tuple[int, float, tuple[str, str, str] | None]:
        """The next run to end: its report, or a made-up one for a worker that died without one."""
        while True:
            try:
                index, seconds, error = self.results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = [i for i, (p, _) in self.running.items() if not p.is_alive() and p.exitcode != 0]
                if not dead:
                    continue
                index, seconds = dead[0], 0.0
                error = ("crash", f"its process ended with exit code {self.running[index][0].exitcode} "
                                  "(a negative code is the signal that killed it, e.g. -9 when out of memory)", "")
            if index not in self.running:  # the report of a worker already counted as crashed
                continue
            process, slot = self.running.pop(index)
            process.join()
            self.free_slots.append(slot)
            return index, seconds, error

    def _stop_all(self) -> None:
        for process, _ in self.running.values():
            process.terminate()
        for process, _ in self.running.values():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        self.running.clear()


def _raise_failure(task: RunTask, error: tuple[str, str, str], log: Callable[[str], None]) -> None:
    """A failed run's error: aemt's own errors (bad input) as one line, anything else with the
    worker's traceback logged first."""
    kind, message, trace = error
    where = f"{task.stage} run '{task.run_dir}' ({task.label}) failed: {message}"
    if kind == "aemt":
        raise RunError(where)
    if trace:
        log(trace)
    raise RuntimeError(where + (" (the worker's traceback is above)" if trace else ""))


def _pool_data_once(tasks: Sequence[RunTask]) -> None:
    """Fill the pooled-data cache here, once per file and setting, before the workers start: they
    then memory-map it rather than each reading and pooling the raw file at the same time (with
    ``data.cache_dir: off`` each still pools its own). A bad file fails here, with the loader's message."""
    from aemt.data.dataset import warm_cache

    settings = {(task.data, "unlabeled" if task.stage == "pretrain" else "labeled", task.config.data.seq_len,
                 task.config.data.text_input, task.config.data.cache_dir) for task in tasks}
    for path, kind, seq_len, text_input, cache_dir in settings:
        warm_cache(path, kind, seq_len=seq_len, text_input=text_input, cache_dir=cache_dir)


def _uses_gpu(cfg: Config) -> bool:
    """Whether ``cfg`` trains on a GPU of this machine."""
    from aemt.training.common import uses_gpu

    return uses_gpu(cfg)


def _visible_gpus() -> list[str]:
    """This process's GPUs as the ids a child's ``CUDA_VISIBLE_DEVICES`` names them by."""
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def _quiet(cfg: Config) -> Config:
    """The config without progress bars (several processes share one terminal)."""
    return replace(cfg, trainer=replace(cfg.trainer, progress=False))


def _worker_main(index: int, task: RunTask, gpu: str | None, threads: int, results: Any) -> None:
    """A worker process: one run on its GPU (or ``threads`` CPU threads), its end reported on ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    if gpu is not None:  # before this process first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    torch.set_num_threads(threads)
    start, error = time.perf_counter(), None
    try:
        task.run()
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        kind = "aemt" if isinstance(exc, AEMTError) else "other"
        error = (kind, f"{type(exc).__name__}: {exc}", "" if kind == "aemt" else traceback.format_exc())
    results.put((index, time.perf_counter() - start, error))
