"""``aemt bench``."""

from __future__ import annotations

import math
from typing import Optional

import typer
from rich import box
from rich.table import Table

from aemt.cli.app import app
from aemt.cli.data_commands import console
from aemt.io_utils import json_text


@app.command("bench")
def bench_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quick: bool = typer.Option(False, help="Short version (about a minute on 2 CPU cores)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    batch: Optional[list[int]] = typer.Option(None, help="Batch sizes (default 16 and 64; repeatable)."),
    precision: Optional[str] = typer.Option(None, help="GPU precision: bf16-mixed (default on GPU) or 32-true."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the models."),
    compile_mode: str = typer.Option("default", help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)."),
    compile_scope: str = typer.Option("model", help="model (one graph) or blocks (each Transformer block apart)."),
    compile_backend: str = typer.Option("inductor", help="inductor, or cudagraphs (CUDA graphs, no code generation)."),
    epochs: bool = typer.Option(False, "--epochs", help="Also time whole Lightning epochs at CH-SIMS v2 sizes."),
) -> None:
    """Throughput, FLOPs and memory at CH-SIMS v2 shapes, for MulT and AE-MT."""
    from aemt.evaluation.bench import bench_device, check_batches, run_bench

    dev = bench_device(device, "--device")  # before any work: one clear error, not torch's traceback
    check_batches(batch, "--batch")
    if precision is None and dev.type == "cuda":
        precision = "bf16-mixed"
    compiling = {"trainer.compile": compile_model, "trainer.compile_mode": compile_mode,
                 "trainer.compile_scope": compile_scope, "trainer.compile_backend": compile_backend}
    log = (lambda m: None) if as_json else (lambda m: console.print(f"[dim]{m}[/]"))
    result = run_bench(quick=quick, device=device, batches=batch, precision=precision, overrides=compiling, log=log)
    if epochs:
        from aemt.config import load_config
        from aemt.evaluation.bench import bench_epochs

        overrides = {**compiling, **({"trainer.precision": precision} if precision else {})}
        if device:
            overrides["trainer.accelerator"] = "gpu" if dev.type == "cuda" else dev.type
        result["epochs"] = bench_epochs(load_config("sims2", overrides), log=log)
    if as_json:
        typer.echo(json_text(result, indent=2))
        return
    table = Table(title=f"aemt bench on {result['device']}, torch {result['torch']}, "
                        f"matmul {result['matmul_gflops']} GFLOP/s", box=box.SIMPLE_HEAD)
    # row names are the keys of --json: never cut them to fit the terminal
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in result["results"]))
    for col in ("batch", "clips/s", "ms/step", "peak\nMB", "GFLOP\n/clip", "GFLOP/s"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(r["name"], str(r["batch"]), f"{r['clips_per_s']:.1f}",
                      f"{r.get('ms_per_step', r.get('seconds', 0) * 1000):.1f}", f"{r['peak_mem_mb']:.0f}",
                      _number(r.get("gflop_per_clip"), 3), _number(r.get("achieved_gflops"), 1))
    console.print(table)
    for key, value in result["ratios"].items():
        console.print(f"{key}: {value}x")
    for r in result.get("epochs", []):
        console.print(f"{r['name']}: {r['clips']} clips, batch {r['batch']}: {r['epoch_s']} s per epoch "
                      f"(first epoch {r['first_epoch_s']} s)")


def _number(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, or a dash for a row that has none (the load rows)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
