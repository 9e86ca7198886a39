"""The GPU checks of issue 5 in one run, each result written as soon as it exists (for a lent GPU
machine with a time limit): whole Lightning epochs at CH-SIMS v2 sizes (eager), the ``aemt bench``
rows, then the epochs again with ``torch.compile`` in CUDA-graph mode.

    PYTHONPATH=src python3 bench/device_check.py OUT_DIR [--skip-rows] [--skip-compiled]
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


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    base = {"trainer.precision": "bf16-mixed", "trainer.accelerator": "gpu"}
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    t = time.perf_counter()
    save(out, "epochs_eager", bench_epochs(load_config("sims2", base)))
    print(f"{time.perf_counter() - t:.0f} s", flush=True)
    if "--skip-rows" not in sys.argv:
        save(out, "rows", run_bench(device="cuda", precision="bf16-mixed"))
    if "--skip-compiled" not in sys.argv:
        t = time.perf_counter()
        compiled = {**base, "trainer.compile": True, "trainer.compile_mode": "reduce-overhead"}
        save(out, "epochs_compiled", bench_epochs(load_config("sims2", compiled)))
        print(f"{time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
