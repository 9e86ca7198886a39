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
FLAGS = {f"--skip-{name}" for name in ORDER}


def save(out: Path, name: str, value) -> None:
    (out / f"{name}.json").write_text(json.dumps(value, indent=2))
    print(name, json.dumps(value), flush=True)


def log(message: str) -> None:
    print(message, flush=True)


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
                save(out, f"epochs_{name}", bench_epochs(load_config("sims2", RUNS[name]), log=log))
        except Exception:  # keep going: the next runs measure other things
            save(out, name if name == "rows" else f"epochs_{name}", {"error": traceback.format_exc()})
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        torch._dynamo.reset()  # compile caches and counts do not carry over to the next run


if __name__ == "__main__":
    main()
