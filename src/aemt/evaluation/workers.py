"""An experiment's training runs, one after another or several at a time (``aemt experiment --jobs N``).

At these model sizes one run uses a GPU (or a CPU) only partly: a GPU step is mostly host work,
and on a CPU the small matrices scale to only a few threads. A grid of variants × seeds × sweeps
is many independent runs, so ``jobs > 1`` trains that many at once, each in a process of its own:

* on GPUs, the processes take the visible GPUs in turn (``CUDA_VISIBLE_DEVICES`` of one GPU
  each; more jobs than GPUs share them), every run on one device;
* on the CPU, the threads are split among them (``torch.get_num_threads() // jobs``, at least 1).

Each data file is pooled into the cache once, before the first process starts. Processes show
no progress bars; each run is logged as it ends. A run that fails stops the experiment: no new
run starts, the running ones end, and the error names the run. A worker that crashed, Ctrl-C or
SIGTERM stops the running ones (within 30 s), and workers end with a parent that is killed; a
rerun resumes their runs from their last epoch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from aemt.config import Config
from aemt.errors import AEMTError, ConfigError, RunError
from aemt.io_utils import one_line_warning


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
        from aemt.training.resume import last_checkpoint

        resume = last_checkpoint(self.run_dir).is_file()
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
    from aemt.training.common import uses_gpu

    check_jobs([task.config for task in tasks], jobs)
    if jobs == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks, start=1):
            log(f"[{i}/{len(tasks)}] {task.stage} {task.label}")
            try:
                task.run()
            except RunError as exc:  # e.g. training diverged: say which run, as the workers' reports do
                raise RunError(_failed(task, f"RunError: {exc}")) from exc
        return
    _pool_data_once(tasks)
    workers = min(jobs, len(tasks))
    gpus = _visible_gpus()[:workers] if any(uses_gpu(task.config) for task in tasks) else []
    threads = max(1, torch.get_num_threads() // workers)
    log(f"{len(tasks)} {tasks[0].stage} runs, {workers} at a time "
        f"({'GPUs ' + ', '.join(gpus) if gpus else f'CPU, {threads} thread(s) each'})")
    _WorkerPool(workers, gpus, threads, log).run(tasks)


class _WorkerPool:
    """Start one spawned process per run, at most ``workers`` at a time, and collect their ends.

    Each worker reports on a pipe of its own (no shared queue, lock or feeder thread), and the
    parent waits on those pipes and on the processes' sentinels together: a worker that dies
    without a report (killed, out of memory) is seen at once, as is a report cut short.
    """

    def __init__(self, workers: int, gpus: list[str], threads: int, log: Callable[[str], None]) -> None:
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked processes
        self.free_slots, self.gpus, self.threads, self.log = list(range(workers)), gpus, threads, log
        self.running: dict[int, tuple[Any, Connection, int]] = {}  # task index: (process, its pipe, slot)

    def run(self, tasks: Sequence[RunTask]) -> None:
        todo, finished, failure = list(range(len(tasks))), 0, None
        try:
            with _sigterm_raises():
                while todo or self.running:
                    while todo and self.free_slots and failure is None:
                        self._start(todo.pop(0), tasks)
                    if not self.running:
                        break
                    index, seconds, error = self._next_end()
                    task = tasks[index]
                    if error is None:
                        finished += 1
                        self.log(f"[{finished}/{len(tasks)}] {task.stage} {task.label}: {seconds:.0f} s")
                        continue
                    crashed = error[0] == "crash"  # a worker died: the others may be about to as well
                    self.log(f"{task.stage} {task.label} failed" + ("" if not self.running or failure else
                             "; stopping the others" if crashed else "; the runs already started end first"))
                    failure = failure or (task, error)
                    if crashed:
                        self._stop_all()
        except BaseException:  # Ctrl-C, SIGTERM or an error here: no worker outlives the experiment
            self._stop_all()
            raise
        if failure is not None:
            _raise_failure(*failure, self.log)

    def _start(self, index: int, tasks: Sequence[RunTask]) -> None:
        slot = self.free_slots.pop(0)
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        task = replace(tasks[index], config=_quiet(tasks[index].config))
        receive, send = self.context.Pipe(duplex=False)
        one_line = warnings.formatwarning is one_line_warning  # the CLI's format: the workers print it too
        process = self.context.Process(target=_worker_main, args=(task, gpu, self.threads, send, one_line),
                                       name=f"aemt-run-{index}")  # not a daemon: it may start processes
        with _sigint_deferred():  # a Ctrl-C now would leave a started worker untracked
            process.start()
            self.running[index] = (process, receive, slot)
        send.close()  # the worker's end: a worker that dies then gives EOF, not a silent hang

    def _next_end(self) -> tuple[int, float, tuple[str, str, str] | None]:
        """The next run to end: its report, or a made-up one for a worker that ended without one."""
        handles = {h: i for i, (p, conn, _) in self.running.items() for h in (conn, p.sentinel)}
        index = handles[wait(list(handles))[0]]
        process, conn, slot = self.running[index]
        try:
            seconds, error = conn.recv()
            reported = True
        except (EOFError, OSError):  # it ended without a (whole) report
            reported = False
        process.join(60)
        if process.is_alive():  # does not exit: don't wait on it
            process.kill()
            process.join(5)
        if not reported:
            seconds, error = 0.0, ("crash", f"its process ended with exit code {process.exitcode} (a negative "
                                            "code is the signal that killed it, e.g. -9 when out of memory)", "")
        del self.running[index]
        conn.close()
        self.free_slots.append(slot)
        return index, seconds, error

    def _stop_all(self) -> None:
        """Stop every running worker: SIGTERM (Lightning ends a run at its next batch), then after
        30 s in all, SIGKILL. Their runs resume from their last epoch on a rerun."""
        if not self.running:
            return
        self.log(f"stopping {len(self.running)} running run(s)")
        try:
            for process, _, _ in self.running.values():
                process.terminate()
            deadline = time.monotonic() + 30
            for process, conn, _ in self.running.values():
                while process.is_alive() and time.monotonic() < deadline:
                    if conn.poll(0.2):  # a report it sends while stopping: read it so it can exit
                        try:
                            conn.recv()
                        except (EOFError, OSError):
                            pass
        finally:
            for process, conn, _ in self.running.values():
                if process.is_alive():
                    process.kill()
                process.join(5)
                conn.close()
            self.running.clear()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (delivered when the block ends) while a worker starts and is recorded."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While workers run, SIGTERM to the parent (a scheduler, ``kill``, ``timeout``) raises
    ``SystemExit`` so that the workers are stopped too, as with Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failed(task: RunTask, message: str) -> str:
    """What a failed run's error says: the stage, the run folder, the cell and why."""
    return f"{task.stage} run '{task.run_dir}' ({task.label}) failed: {message}"


def _raise_failure(task: RunTask, error: tuple[str, str, str], log: Callable[[str], None]) -> None:
    """A failed run's error: aemt's own errors (bad input) as one line, anything else with the
    worker's traceback logged first."""
    kind, message, trace = error
    where = _failed(task, message)
    if kind == "aemt":
        raise RunError(where)
    if trace:
        log(trace)
    raise RuntimeError(where + (" (the worker's traceback is above)" if trace else ""))


def _pool_data_once(tasks: Sequence[RunTask]) -> None:
    """Fill the pooled-data cache (and the standardised splits) here, once per file and setting,
    before the workers start: they then memory-map it rather than each reading and pooling the raw
    file at the same time (with ``data.cache_dir: off`` each still pools its own). A bad file fails
    here, with the loader's message."""
    from aemt.data.dataset import warm_cache

    settings = {(task.data, "unlabeled" if task.stage == "pretrain" else "labeled", task.config.data.seq_len,
                 task.config.data.text_input, task.config.data.cache_dir, task.config.data.standardize) for task in tasks}
    for path, kind, seq_len, text_input, cache_dir, standardize in settings:
        warm_cache(path, kind, seq_len=seq_len, text_input=text_input, cache_dir=cache_dir, standardize=standardize)


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


def _worker_main(task: RunTask, gpu: str | None, threads: int, report: Connection,
                 one_line_warnings: bool = False) -> None:
    """A worker process: one run on its GPU (or ``threads`` CPU threads), its end sent on ``report``.
    ``one_line_warnings``: print warnings as the CLI does (``warning: ...``), as the parent does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    if one_line_warnings:  # a spawned process starts with Python's two-line format
        warnings.formatwarning = one_line_warning
    parent = multiprocessing.parent_process()
    if parent is not None:  # a parent killed outright (SIGKILL, out of memory) takes its workers with it
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    if gpu is not None:  # before this process first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    torch.set_num_threads(threads)
    start, error = time.perf_counter(), None
    try:
        task.run()
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        kind = "aemt" if isinstance(exc, AEMTError) else "other"
        error = (kind, f"{type(exc).__name__}: {exc}", "" if kind == "aemt" else traceback.format_exc())
    report.send((time.perf_counter() - start, error))
    report.close()
