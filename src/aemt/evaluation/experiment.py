"""``aemt experiment``: a declared grid of variants × seeds (× sweeps) on one data set.

An experiment file (YAML) names a base config, the data, the seeds, the variants and sweeps:

    base: synthetic                  # preset or YAML (relative to this file)
    data: {labeled: l.pkl, unlabeled: u.pkl}   # files relative to this file; unlabeled defaults to
                                     # labeled; or {synthetic: {preset: sims2, scale: small}} (the
                                     # arguments of aemt.data.synthetic.write_synthetic)
    seeds: 5                         # N (1111, 1112, ...) or a list of distinct integers
    variants: [mult, aemt, aemt-no-cl, aemt-no-mcd, aemt-lstm, {my-variant: {finetune.tau: 0.1}}]
    overrides: {finetune.epochs: 30} # applied to every run
    sweeps: {pretrain.lambda1: [0, 0.2, 0.4, 0.8, 1.2]}   # one-key sweeps of `sweep_variant`
    sweep_variant: aemt              # a built-in variant or one of `variants`
    missing_modality: true

Each key is checked when the file is loaded (:mod:`aemt.evaluation.experiment_file`): a bad
value is one ConfigError naming the file, the key, the expected and the actual value (a data
file not found: a DataError).

Every cell is one fine-tuning run. Cells with the same effective config and seed share a run,
and fine-tuning runs with the same pre-training config and seed share one pre-training run.
A finished run (``test_metrics.json`` / ``model.pt``) is never rerun; a killed one resumes.
``jobs > 1`` trains that many runs at once (:mod:`aemt.evaluation.workers`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from aemt.config import Config, apply_overrides, load_config, read_yaml, save_config
from aemt.errors import ConfigError, DataError, RunError
from aemt.evaluation.experiment_file import ExperimentFile, check_count

# built-in variants: overrides, and whether they use a pre-training run
VARIANTS: dict[str, dict[str, Any]] = {
    "mult": {"finetune.pretrained": "none", "finetune.lambda2": 0.0, "model.encoder_layers": 0},  # MulT proper
    "aemt": {},
    "aemt-no-cl": {"finetune.lambda2": 0.0},
    "aemt-no-mcd": {"pretrain.lambda1": 0.0},
    "aemt-lstm": {"model.autoencoder": "lstm"},
}
DEFAULT_SEEDS = 5
FIRST_SEED = 1111


@dataclass
class Cell:
    """One row of the results: a labelled config and a seed."""

    label: str  # e.g. "aemt" or "aemt pretrain.lambda1=0.2"
    variant: str
    overrides: dict[str, Any]  # the cell's own overrides (variant + sweep), not the global ones
    seed: int
    config: Config = field(repr=False)

    @property
    def uses_pretraining(self) -> bool:
        return self.config.finetune.pretrained != "none"

    def finetune_key(self, data_tag: str = "") -> str:
        """Identity of the fine-tuning run: the whole config (and the data files' digests)."""
        return _digest([self.config.to_dict(), data_tag])

    def pretrain_key(self, data_tag: str = "") -> str:
        """Identity of the pre-training run: the config sections it depends on, the seed, the data."""
        c = self.config.to_dict()
        return _digest([{"data": c["data"], "model": c["model"], "pretrain": c["pretrain"], "seed": self.seed}, data_tag])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    source: Path
    base: Config
    data: dict[str, Any]
    seeds: list[int]
    variants: dict[str, dict[str, Any]]
    overrides: dict[str, Any]
    sweeps: dict[str, list[Any]]
    sweep_variant: str
    missing_modality: bool

    def cells(self) -> list[Cell]:
        """Expand the grid: variants × seeds, then each sweep value × seeds."""
        specs: list[tuple[str, str, dict[str, Any]]] = [(name, name, dict(o)) for name, o in self.variants.items()]
        base_overrides = self.variants.get(self.sweep_variant, VARIANTS.get(self.sweep_variant, {}))
        for key, values in self.sweeps.items():
            for value in values:
                specs.append((f"{self.sweep_variant} {key}={value}", self.sweep_variant, {**base_overrides, key: value}))
        cells = []
        for label, variant, own in specs:
            for seed in self.seeds:
                try:
                    cfg = apply_overrides(self.base, {**self.overrides, **own, "trainer.seed": seed})
                except ConfigError as exc:
                    raise ConfigError(f"cell '{label}': {exc}") from None
                cells.append(Cell(label, variant, own, seed, cfg))
        return cells


def load_experiment(path: str | Path, seeds: int | None = None, epochs: int | None = None) -> Experiment:
    """Read and check an experiment file (:mod:`aemt.evaluation.experiment_file`): a bad value is
    one ConfigError (DataError: a data file not found). ``seeds``/``epochs`` (``--seeds``/``--epochs``,
    each >= 1) shorten it for a quick look."""
    check_count("--seeds", seeds)
    check_count("--epochs", epochs)
    path = Path(path)
    file = ExperimentFile(path, read_yaml(path))
    base_name = file.get("base", "synthetic", str)
    local = path.parent / base_name
    base = file.config("base", lambda: load_config(local if local.suffix in (".yaml", ".yml") and local.is_file()
                                                   else base_name))
    sweeps = file.sweeps()
    variants = file.variants(VARIANTS, bool(sweeps))
    overrides = file.mapping("overrides", file.spec.get("overrides"))
    file.config("overrides", lambda: apply_overrides(base, overrides))
    if epochs is not None:
        overrides.update({"pretrain.epochs": epochs, "finetune.epochs": epochs})
    exp = Experiment(file.get("name", path.stem, str), path, base, file.data(),
                     file.seeds(seeds, DEFAULT_SEEDS, FIRST_SEED), variants, overrides, sweeps,
                     file.sweep_variant({**VARIANTS, **variants}), file.get("missing_modality", True, bool))
    cells = file.config("", exp.cells)  # checks every cell's overrides now, before any training
    idle = [key for key in sweeps if key.startswith("pretrain.")]
    if idle and not any(c.uses_pretraining for c in cells if c.variant == exp.sweep_variant):
        raise file.error("sweeps", f"keys that change the sweep variant '{exp.sweep_variant}'; it does not pre-train "
                         "(finetune.pretrained: none), so every value would train the same run (set "
                         "sweep_variant to a variant that pre-trains, e.g. aemt)", idle)
    return exp


def _data_paths(exp: Experiment, out: Path) -> tuple[Path, Path]:
    """The labeled and unlabeled files (``exp.data``'s, absolute), or synthetic ones
    written to ``out/data`` (once per set of generator arguments)."""
    labeled, unlabeled = exp.data.get("labeled"), exp.data.get("unlabeled")
    if labeled:
        return Path(labeled), Path(unlabeled or labeled)
    from aemt.data.synthetic import write_synthetic
    from aemt.io_utils import atomic_write_text

    synth = {"preset": "sims2", "scale": "small", "seed": 0, **(exp.data.get("synthetic") or {})}
    folder = out / "data"
    marker = folder / "synthetic.json"  # the generator's arguments: other arguments, new data
    made = marker.is_file() and json.loads(marker.read_text()) == synth
    if not (made and (folder / "labeled.pkl").is_file() and (folder / "unlabeled.pkl").is_file()):
        try:
            write_synthetic(folder, **synth)
        except DataError as exc:  # a bad argument: name the experiment file and key
            raise DataError(str(exc), file=str(exp.source), key="data.synthetic") from None
        atomic_write_text(marker, json.dumps(synth))
    return folder / "labeled.pkl", folder / "unlabeled.pkl"


def run_experiment(exp: Experiment, out: str | Path, log: Callable[[str], None] = print,
                   jobs: int = 1) -> list[dict[str, Any]]:
    """Run every run not yet finished (the pre-training runs, then the fine-tuning runs, ``jobs``
    at a time: see :mod:`aemt.evaluation.workers`), then return one result row per cell."""
    from aemt.data.cache import cached_digest
    from aemt.evaluation.workers import RunTask, check_jobs, run_tasks

    cells = exp.cells()
    check_jobs([cell.config for cell in cells], jobs)
    out = Path(out)
    labeled, unlabeled = _data_paths(exp, out)
    cache_root = out / ".digests"
    tag = _digest([cached_digest(labeled, cache_root), cached_digest(unlabeled, cache_root)])  # other data: other runs
    dirs = [(out / "runs" / f"{cell.variant}-{cell.finetune_key(tag)}-s{cell.seed}",
             out / "pretrain" / f"{cell.pretrain_key(tag)}-s{cell.seed}" if cell.uses_pretraining else None)
            for cell in cells]
    pretraining: dict[Path, RunTask] = {}
    finetuning: dict[Path, RunTask] = {}
    for cell, (run_dir, pre_dir) in zip(cells, dirs):
        name = f"{cell.label}, seed {cell.seed}"
        if pre_dir is not None and not (pre_dir / "model.pt").is_file():
            pretraining.setdefault(pre_dir, RunTask("pretrain", name, cell.config, unlabeled, pre_dir))
        if not (run_dir / "test_metrics.json").is_file():
            finetuning.setdefault(run_dir, RunTask("finetune", name, cell.config, labeled, run_dir, pre_dir))
    log(f"experiment '{exp.name}': {len(cells)} cells, {len({d for d, _ in dirs})} fine-tuning runs "
        f"({len(finetuning)} to train), {len(pretraining)} pre-training runs to train")
    run_tasks(list(pretraining.values()), jobs, log)
    run_tasks(list(finetuning.values()), jobs, log)
    rows = [_result_row(cell, run_dir, pre_dir, out) for cell, (run_dir, pre_dir) in zip(cells, dirs)]
    configs = {out / "configs" / "base.yaml": exp.base,
               **{out / "configs" / f"{run_dir.name}.yaml": cell.config for cell, (run_dir, _) in zip(cells, dirs)}}
    for path, config in configs.items():
        save_config(config, path)
    _remove_others(out / "configs", list(configs), r".+-[0-9a-f]{10}-s\d+\.yaml")
    return rows


def _remove_others(folder: Path, kept: list[Path], name_pattern: str) -> None:
    """Delete the files of ``folder`` that are named like a run's (``name_pattern``, a regex) and not
    ``kept``: what an earlier grid (other epochs, seeds or variants) wrote there, which would read as
    part of this one. Files named otherwise (the user's own) are left alone."""
    if not folder.is_dir():
        return
    stale = {path for path in folder.iterdir() if re.fullmatch(name_pattern, path.name)} - {Path(k) for k in kept}
    for path in stale:
        path.unlink(missing_ok=True)


def _result_row(cell: Cell, run_dir: Path, pre_dir: Path | None, out: Path) -> dict[str, Any]:
    """One row of results.csv; its run folders are relative to the experiment folder ``out``."""
    from aemt.training.run_files import read_json, read_test_metrics

    metrics = read_test_metrics(run_dir / "test_metrics.json")
    ft_info = read_json(run_dir / "run.json")
    pre_seconds = read_json(pre_dir / "run.json").get("fit_seconds", 0.0) if pre_dir else 0.0
    return {"label": cell.label, "variant": cell.variant, "overrides": json.dumps(cell.overrides, sort_keys=True),
            "seed": cell.seed, "run_dir": str(run_dir.relative_to(out)),
            "pretrain_dir": str(pre_dir.relative_to(out)) if pre_dir else "",
            **metrics, "pretrain_seconds": pre_seconds, "finetune_seconds": ft_info.get("fit_seconds", 0.0),
            "wall_seconds": round(pre_seconds + ft_info.get("fit_seconds", 0.0), 2),
            "epochs_run": ft_info.get("epochs_run", 0)}


def run_path(out: Path, recorded: str) -> Path:
    """A run folder as results.csv records it: relative to the experiment folder ``out`` (files
    written before aemt recorded it so: relative to the working directory they were made in)."""
    path = Path(out) / recorded
    return path if path.exists() or not Path(recorded).exists() else Path(recorded)


def _first_runs(rows: list[dict], out: Path) -> dict[str, Path]:
    """Each label's first run folder in ``rows`` of ``results.csv`` (the first seed's), in order."""
    first: dict[str, Path] = {}
    for r in rows:
        first.setdefault(r["label"], run_path(out, r["run_dir"]))
    return first


def clip_texts(labeled: Path, data: Any) -> dict[str, str]:
    """Clip id -> raw text of every split of a labeled file (``data``: the runs' data config)."""
    from aemt.data.dataset import load_labeled

    texts: dict[str, str] = {}
    for split in load_labeled(labeled, seq_len=data.seq_len, text_input=data.text_input, metrics=data.metrics,
                              standardize_features=False, cache_dir=data.cache_dir).splits.values():
        texts.update(zip(split.ids, split.raw_text))
    return texts


def explain(out: str | Path, n: int = 4, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The case study of an experiment folder (the paper's Fig. 5): chosen test clips with their
    text, T/A/V labels and each model's prediction from its first seed's run (see
    :func:`aemt.evaluation.report.case_study`)."""
    from aemt.evaluation import report
    from aemt.training.run_files import read_json

    out = Path(out)
    if n < 1 and not ids:
        raise ConfigError(f"--n: expected an integer >= 1, got {n}")
    if not (out / "results.csv").is_file():
        raise RunError(f"'{out}' is not a finished experiment folder (no results.csv)")
    first = _first_runs(report.read_csv(out / "results.csv", ("label", "run_dir")), out)
    cases = report.case_study({label: run / "predictions.csv" for label, run in first.items()}, n=n, ids=ids)
    run = next(iter(first.values()))
    recorded = Path(read_json(run / "run.json")["data"])
    found = [p for p in (recorded, out / "data" / recorded.name) if p.is_file()]  # a moved folder of synthetic data
    texts = clip_texts(found[0], load_config(run / "config.yaml").data) if found else {}
    return [{"id": c["id"], "text": texts.get(c["id"], "(data file not found)"), **c} for c in cases]


def write_report(exp: Experiment, rows: list[dict[str, Any]], out: str | Path,
                 log: Callable[[str], None] = print) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """Write results.csv, summary.md, plots, the case study and the missing-modality table."""
    from aemt.evaluation import report

    out = Path(out)
    report.write_csv(out / "results.csv", rows)
    summary = report.summarize(rows)
    parts = [f"# Experiment `{exp.name}`\n\nFrom `{exp.source}`; {len(rows)} cells, seeds {exp.seeds}. "
             "Every run's resolved config is in `configs/`, its files in `runs/`.\n",
             report.summary_markdown(summary, "Test metrics")]
    first_seed = _first_runs(rows, out)
    main_labels = [label for label in first_seed if label in exp.variants]
    predictions = {label: first_seed[label] / "predictions.csv" for label in main_labels or list(first_seed)[:4]}
    figures = report.plot_sensitivity(rows, exp.sweeps, exp.sweep_variant, out / "plots")
    figures.append(report.plot_scatter(predictions, out / "plots" / "scatter.png"))
    curves = {run_path(out, r["run_dir"]): f"{r['label']} (seed {r['seed']})" for r in rows}
    curves.update({run_path(out, r["pretrain_dir"]): f"pre-training (seed {r['seed']})" for r in rows if r["pretrain_dir"]})
    curve_files = [out / "plots" / "curves" / f"{run.parent.name}-{run.name}.png" for run in curves]
    for (run, title), path in zip(curves.items(), curve_files):
        figures.append(report.plot_curves(run, path, title))
    _remove_others(out / "plots" / "curves", curve_files, r"(runs-.+|pretrain)-[0-9a-f]{10}-s\d+\.png")
    labeled, _ = _data_paths(exp, out)
    cases = report.case_study(predictions)
    seeds = {label: next(r["seed"] for r in rows if r["label"] == label) for label in predictions}
    parts.append(report.case_study_markdown(cases, clip_texts(labeled, exp.base.data), seeds))
    if exp.missing_modality and main_labels:
        log("missing-modality evaluation")
        missing = [m for r in rows if r["label"] in main_labels
                   for m in report.missing_modality_rows(run_path(out, r["run_dir"]), labeled, r["label"], r["seed"])]
        report.write_csv(out / "missing_modality.csv", missing)
        parts.append(report.missing_modality_markdown(missing))
    shown = [f for f in figures if f is not None]
    parts.append("## Plots\n\n" + "\n".join(f"- `{f.relative_to(out)}`" for f in shown) + "\n")
    from aemt.io_utils import atomic_write_text

    atomic_write_text(out / "summary.md", "\n".join(parts))
    return summary
