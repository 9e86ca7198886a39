"""``aemt experiment`` and ``aemt explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from aemt.cli.app import app
from aemt.cli.data_commands import console


def print_summary(summary: dict, title: str) -> None:
    """Mean ± std (×100) per model, best per column in bold green."""
    from aemt.evaluation.report import summary_cells

    table = Table(title=title)
    table.add_column("model", no_wrap=True, min_width=max(map(len, summary)))  # labels whole, cells wrap
    for key in next(iter(summary.values())):
        table.add_column(key, justify="right", overflow="fold")  # Mult_acc_2 and _3 must stay apart
    for label, cells in summary_cells(summary).items():
        table.add_row(label, *(f"[bold green]{t}[/]" if is_best else t for t, is_best in cells))
    console.print(table)


@app.command("experiment")
def experiment_cmd(
    config: Path = typer.Argument(..., help="Experiment YAML (variants, seeds, sweeps, data)."),
    out: Path = typer.Option(..., help="Experiment folder (runs, results.csv, summary.md, plots)."),
    seeds: Optional[int] = typer.Option(None, help="Use only this many seeds (>= 1)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of both stages (>= 1), for a quick look."),
    jobs: int = typer.Option(1, help="Runs trained at once, each in its own process (GPUs taken in turn)."),
) -> None:
    """Run a grid of variants × seeds (× sweeps); finished cells are skipped on a rerun."""
    from aemt.evaluation.experiment import load_experiment, run_experiment, write_report
    from aemt.io_utils import require_folder_path

    exp = load_experiment(config, seeds=seeds, epochs=epochs)
    require_folder_path(out, "--out", "an experiment folder (new or to continue)")
    rows = run_experiment(exp, out, log=console.print, jobs=jobs)
    summary = write_report(exp, rows, out, log=console.print)
    n = len(exp.seeds)
    what = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    print_summary(summary, f"{exp.name}: test metrics, {what} (x100)")
    console.print(f"report: {out / 'summary.md'}, {out / 'results.csv'}, {out / 'plots'}")


@app.command("explain")
def explain_cmd(
    experiment: Path = typer.Option(..., help="An experiment folder."),
    n: int = typer.Option(4, help="Number of clips (>= 1; unused with --id)."),
    ids: Optional[list[str]] = typer.Option(None, "--id", help="Clip ids to show (repeatable)."),
) -> None:
    """Case study: chosen test clips with text, T/A/V labels and every model's prediction."""
    from aemt.evaluation.experiment import explain

    cases = explain(experiment, n=n, ids=ids)
    table = Table(title="case study (test clips; each model's first seed)")
    for key in cases[0]:
        table.add_column(key, overflow="fold", ratio=3 if key == "text" else None)
    for case in cases:
        table.add_row(*(str(v) for v in case.values()))
    console.print(table)
