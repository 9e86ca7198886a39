"""The GPU checks of issue 5 in one run, each result written as soon as it exists (for a lent GPU
machine with a time limit).

1. A one-second check that CUDA's fused memory-efficient SDPA kernel accepts aemt's masked
   attention with heads of 5 and 10 once padded (and whether it would without the padding).
2. Whole Lightning epochs at CH-SIMS v2 sizes:
   - ``cudagraphs``: one graph per stage replayed as CUDA graphs without code generation
     (``trainer.compile_backend: cudagraphs``; compiles in seconds);
   - ``eager``: no compilation, the baseline;
   - ``model``: one graph with inductor's code and CUDA graphs (``reduce-overhead``; minutes);
   - ``blocks``: each Transformer block compiled apart (``trainer.compile_scope: blocks``,
     default mode, no CUDA graphs).
3. The ``aemt bench`` rows.

They run quickest first (``ORDER``): cudagraphs, eager, the rows, model, blocks.

The ``cudagraphs`` and ``eager`` runs profile 20 training steps of their last epoch, which their
``epoch_s`` leaves out (each row lists every epoch's time in ``epochs_s``):
``profile_<run>.txt`` has the host and GPU time of those steps and the operators that took most.
Each ``epochs_<run>.json`` also has dynamo's graph count and graph-break reasons.

Every epoch's time is printed as it ends, so a run cut short still shows what it measured; a run
that fails is saved as its error and the next one starts.

    PYTHONPATH=src python3 bench/device_check.py OUT_DIR [--skip-cudagraphs] [--skip-eager] [--skip-model]
                                                         [--skip-blocks] [--skip-rows]
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch._dynamo.utils import counters
from torch.autograd import DeviceType

from aemt.config import load_config
from aemt.evaluation.bench import bench_epochs, run_bench
from aemt.models.layers.attention import _CUDA_HEAD_DIM_ALIGN, _sdpa

BASE = {"trainer.precision": "bf16-mixed", "trainer.accelerator": "gpu"}
RUNS = {
    "cudagraphs": {**BASE, "trainer.compile": True, "trainer.compile_backend": "cudagraphs"},
    "eager": BASE,
    "model": {**BASE, "trainer.compile": True, "trainer.compile_mode": "reduce-overhead"},
    "blocks": {**BASE, "trainer.compile": True, "trainer.compile_scope": "blocks"},
}
# a call cut short by the machine's time limit loses the slow ones: the two inductor runs take minutes each
ORDER = ("cudagraphs", "eager", "rows", "model", "blocks")
EPOCHS = {"cudagraphs": 5, "eager": 4}  # the last epoch is profiled; cudagraphs records graphs in its second
PROFILED = {"cudagraphs", "eager"}
PROFILE_STEPS = (10, 30)  # batch indices of the last epoch: profile from the first up to the second
FLAGS = {f"--skip-{name}" for name in ORDER}


def save(out: Path, name: str, value) -> None:
    (out / f"{name}.json").write_text(json.dumps(value, indent=2))
    print(name, json.dumps(value), flush=True)


def log(message: str) -> None:
    print(message, flush=True)


class StepProfiler(Callback):
    """torch.profiler over training steps ``PROFILE_STEPS`` of the last epoch; appends a summary
    (wall time, GPU kernel time, the top operators by host and by GPU time) to ``path``."""

    def __init__(self, path: Path, run: str, stage: str, epochs: int) -> None:
        self.path, self.title, self.last_epoch, self.profiler = path, f"{run} {stage}", epochs - 1, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.last_epoch and batch_idx == PROFILE_STEPS[0]:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or batch_idx + 1 != PROFILE_STEPS[1]:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.profiler.stop()
        events = self.profiler.key_averages()
        # kernels only, as the table's "Self CUDA time total": a user annotation (the optimiser
        # step's range) also carries device time, which would be counted twice
        gpu = sum(e.self_device_time_total for e in events
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
        steps = PROFILE_STEPS[1] - PROFILE_STEPS[0]
        with open(self.path, "a") as handle:
            handle.write(f"=== {self.title}: {steps} steps, wall {wall * 1e3 / steps:.2f} ms/step, "
                         f"GPU kernels {gpu * 1e3 / steps:.2f} ms/step (under the profiler)\n")
            for key in ("self_cpu_time_total", "self_device_time_total"):
                handle.write(events.table(sort_by=key, row_limit=30, max_name_column_width=60) + "\n")
        log(f"{self.title}: {wall * 1e3 / steps:.2f} ms/step wall, {gpu * 1e3 / steps:.2f} ms/step GPU kernels")
        self.profiler = None


def sdpa_check() -> dict[str, str]:
    """Which head dims the fused memory-efficient kernel takes, bf16, key mask, dropout 0.1."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    result = {}
    for head_dim in (5, 10):
        q, k, v = (torch.randn(64, 10, 50, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = (torch.arange(50, device="cuda")[None] < torch.randint(1, 51, (64, 1), device="cuda"))[:, None, None]
        for align in (1, _CUDA_HEAD_DIM_ALIGN):
            try:
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    _sdpa(q, k, v, mask, 0.1, align).sum().backward()
                result[f"head_dim {head_dim}, align {align}"] = "efficient kernel"
            except RuntimeError as error:
                result[f"head_dim {head_dim}, align {align}"] = f"refused: {str(error).splitlines()[0][:160]}"
    return result


def main() -> None:
    out, flags = Path(sys.argv[1]), set(sys.argv[2:])
    if flags - FLAGS:
        sys.exit(f"unknown options {sorted(flags - FLAGS)}; expected some of {sorted(FLAGS)}")
    out.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    try:
        save(out, "sdpa_backends", sdpa_check())
    except Exception:
        save(out, "sdpa_backends", {"error": traceback.format_exc()})
    for name in ORDER:
        if f"--skip-{name}" in flags:
            continue
        start = time.perf_counter()
        try:
            if name == "rows":
                save(out, "rows", run_bench(device="cuda", precision="bf16-mixed"))
            else:
                epochs = EPOCHS.get(name, 3)
                profile = ((lambda stage, name=name, epochs=epochs:
                            [StepProfiler(out / f"profile_{name}.txt", name, stage, epochs)])
                           if name in PROFILED else (lambda stage: []))
                counters.clear()
                rows = bench_epochs(load_config("sims2", RUNS[name]), epochs=epochs, log=log, callbacks=profile,
                                    profiled_last=name in PROFILED)
                # how many pieces dynamo made of the models, and why it broke them
                save(out, f"epochs_{name}", {"rows": rows, "dynamo_stats": dict(counters["stats"]),
                                             "graph_breaks": dict(counters["graph_break"])})
        except Exception:  # keep going: the next runs measure other things
            save(out, name if name == "rows" else f"epochs_{name}", {"error": traceback.format_exc()})
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        torch._dynamo.reset()  # compile caches and counts do not carry over to the next run


if __name__ == "__main__":
    main()
