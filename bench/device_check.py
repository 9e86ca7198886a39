"""The GPU checks of issue 5 in one run, each result written as soon as it exists (for a lent GPU
machine with a time limit): whole Lightning epochs at CH-SIMS v2 sizes with ``torch.compile`` in
CUDA-graph mode (``trainer.compile_scope`` ``blocks``, then ``model``), the same epochs eager, then
the ``aemt bench`` rows. Every epoch's time is printed as it ends, so a run cut short still shows
what it measured.

    PYTHONPATH=src python3 bench/device_check.py OUT_DIR [--skip-blocks] [--skip-model] [--skip-eager] [--skip-rows]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from aemt.config import load_config
from aemt.evaluation.bench import bench_epochs, run_bench


def save(out: Path, name: str, value) -> None:
    (out / f"{name}.json").write_text(json.dumps(value, indent=2))
    print(name, json.dumps(value), flush=True)


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    base = {"trainer.precision": "bf16-mixed", "trainer.accelerator": "gpu"}
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    compiled = {**base, "trainer.compile": True, "trainer.compile_mode": "reduce-overhead"}
    runs = {"blocks": {**compiled, "trainer.compile_scope": "blocks"},  # fastest to compile: first
            "model": {**compiled, "trainer.compile_scope": "model"},
            "eager": base}
    for name, overrides in runs.items():
        if f"--skip-{name}" in sys.argv:
            continue
        start = time.perf_counter()
        save(out, f"epochs_{name}", bench_epochs(load_config("sims2", overrides), log=log))
        print(f"epochs_{name}: {time.perf_counter() - start:.0f} s", flush=True)
    if "--skip-rows" not in sys.argv:
        save(out, "rows", run_bench(device="cuda", precision="bf16-mixed"))


if __name__ == "__main__":
    main()
