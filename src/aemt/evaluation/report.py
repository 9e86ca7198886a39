"""Experiment reports: tidy CSV, mean ± std summary (×100, best marked), plots, case study,
missing-modality table. Everything is written atomically into the experiment folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aemt.errors import RunError
from aemt.evaluation.metrics import LOWER_IS_BETTER, METRIC_KEYS
from aemt.io_utils import atomic_open, atomic_write_text

DROP_SETS: tuple[tuple[str, ...], ...] = (
    (), ("text",), ("audio",), ("vision",), ("audio", "vision"), ("text", "vision"), ("text", "audio"))
Summary = dict[str, dict[str, tuple[float, float | None, int]]]  # label -> metric -> (mean, std, seeds), x100


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The MMSA metric columns present in ``rows``, in MMSA's order."""
    for keys in METRIC_KEYS.values():
        if keys[0] in rows[0]:
            return list(keys)
    raise ValueError("rows hold no MMSA metrics")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A tidy CSV, one row per dict, columns in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path, columns: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV aemt wrote, as dicts of strings; a missing or unreadable file, or one without
    ``columns`` (or rows), is one :class:`RunError` naming it."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunError(f"'{path}' is missing or not a readable CSV ({exc})") from None
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise RunError(f"'{path}': expected rows with columns {list(columns)}, "
                       + (f"the columns {missing} are missing" if rows else "got no rows"))
    return rows


def float_text(value: float, decimals: int | None = None) -> str:
    """``value`` as a plain decimal without float32 noise: the shortest that reads back as the same
    float32 (``decimals=None``: -0.2, not -0.20000000298023224), or rounded to ``decimals``; never -0."""
    text = (np.format_float_positional(np.float32(value), unique=True, trim="-") if decimals is None
            else f"{float(value):.{decimals}f}")
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def mean_x100(values: Sequence[float]) -> float:
    """The mean of fractions as a percentage, computed one way for every table (so that a mean
    halfway between two shown values rounds alike everywhere)."""
    return float(np.mean(np.array(values, dtype=np.float64) * 100))


def summarize(rows: Sequence[dict[str, Any]]) -> Summary:
    """``{label: {metric: (mean, std, n)}}`` over seeds, ×100; std is the sample std (ddof=1), ``None``
    for one seed (where it is undefined)."""
    keys = metric_keys(rows)
    out: Summary = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        out[label] = {}
        for key in keys:
            values = [float(r[key]) for r in group]
            std = float(np.std(np.array(values) * 100, ddof=1)) if len(values) > 1 else None
            out[label][key] = (mean_x100(values), std, len(values))
    return out


def _shown(value: float) -> float:
    """A mean as the tables show it (2 decimals), to compare what the reader compares."""
    return float(f"{value:.2f}")


def best_labels(summary: Summary) -> dict[str, set[str]]:
    """For each metric, every label whose mean, at the shown precision, is the best (lowest for
    MAE): ties are all best. A metric that is NaN for every label has none."""
    best: dict[str, set[str]] = {}
    for key in next(iter(summary.values())):
        shown = {label: _shown(values[key][0]) for label, values in summary.items()}
        finite = [v for v in shown.values() if np.isfinite(v)]
        target = (min if key in LOWER_IS_BETTER else max)(finite) if finite else None
        best[key] = {label for label, v in shown.items() if v == target}
    return best


def summary_cells(summary: Summary) -> dict[str, list[tuple[str, bool]]]:
    """``{label: [("mean ± std", is_best), ...]}`` in metric order, for tables (just "mean" for one seed)."""
    best = best_labels(summary)
    return {label: [(f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}", label in best[k])
                    for k, (mean, std, _) in values.items()]
            for label, values in summary.items()}


def summary_markdown(summary: Summary, title: str) -> str:
    """Markdown table: mean ± std (×100) per label and metric, best per column (ties too) in bold."""
    keys = list(next(iter(summary.values())))
    seeds = {values[keys[0]][2] for values in summary.values()}
    what = ("Mean over one seed (a std needs two or more)" if seeds == {1} else
            "Mean ± sample std over seeds (the mean alone for one seed)" if 1 in seeds else
            "Mean ± sample std over seeds")
    lines = [f"## {title}", "", f"{what}, ×100 (MMSA scale); best per column in bold.", "",
             "| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label, cells in summary_cells(summary).items():
        text = [f"**{t}**" if is_best else t for t, is_best in cells]
        lines.append(f"| {label} | {summary[label][keys[0]][2]} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_sensitivity(rows: Sequence[dict[str, Any]], sweeps: dict[str, list[Any]], sweep_variant: str,
                     out: Path) -> list[Path]:
    """The paper's Fig. 4: metric vs each swept value, mean with ± std over seeds."""
    plt = _plt()
    keys = metric_keys(rows)
    shown = [k for k in keys if "F1" in k][:1] + [k for k in keys if "acc_2" in k][:1]
    paths = []
    for key, values in sweeps.items():
        fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.4))
        for ax, metric in zip(np.atleast_1d(axes), shown):
            xs, means, stds = [], [], []
            for value in values:
                group = [float(r[metric]) * 100 for r in rows if r["label"] == f"{sweep_variant} {key}={value}"]
                if group:
                    xs.append(float(value)), means.append(np.mean(group)), stds.append(np.std(group, ddof=1) if len(group) > 1 else 0)
            means, stds = np.array(means), np.array(stds)
            ax.plot(xs, means, "o-", color="tab:blue")
            ax.fill_between(xs, means - stds, means + stds, alpha=0.25, color="tab:blue")
            ax.set_xlabel(key), ax.set_ylabel(f"{metric} (x100)"), ax.grid(alpha=0.3)
        fig.suptitle(f"sensitivity to {key} ({sweep_variant}; mean ± std over seeds)")
        path = out / f"sensitivity_{key.replace('.', '_')}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def plot_curves(run_dir: Path, out: Path, title: str) -> Path | None:
    """Training and validation loss per epoch of one run (from its metrics.csv)."""
    if not (run_dir / "metrics.csv").is_file():
        return None
    plt = _plt()
    rows = read_csv(run_dir / "metrics.csv")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key in ("train_loss", "val_loss", "train_senti", "train_con"):
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=key)
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_title(title, fontsize=9), ax.legend(), ax.grid(alpha=0.3)
    _save(fig, out)
    return out


def plot_scatter(predictions: dict[str, Path], out: Path) -> Path:
    """Predicted vs true sentiment, one panel per model (first seed)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.4 * len(predictions), 3.4), squeeze=False)
    for ax, (label, path) in zip(axes[0], predictions.items()):
        rows = read_csv(path, ("label", "prediction"))
        y, p = np.array([float(r["label"]) for r in rows]), np.array([float(r["prediction"]) for r in rows])
        lim = max(1.0, float(np.abs(y).max()))
        ax.scatter(y, p, s=6, alpha=0.5)
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set_title(label, fontsize=9), ax.set_xlabel("true"), ax.set_ylabel("predicted")
    _save(fig, out)
    return out


def case_study(predictions: dict[str, Path], n: int = 4, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The paper's Fig. 5: chosen test clips with text, unimodal labels and each model's prediction.

    Without ``ids``: the most negative clip, a weakly positive clip (0.1 < M <= 0.4), then the
    clips on which the models disagree most."""
    tables = {label: {r["id"]: r for r in read_csv(path, ("id", "label", "prediction"))}
              for label, path in predictions.items()}
    first = next(iter(tables.values()))
    unknown = [clip for clip in ids or () if clip not in first]
    if unknown:
        raise RunError(f"clip ids {unknown} are not among the {len(first)} test clips of "
                       f"'{next(iter(predictions.values()))}' (ids look like {list(first)[:3]})")
    if not ids:
        chosen = [min(first, key=lambda i: float(first[i]["label"]))]
        weak = [i for i in first if 0.1 < float(first[i]["label"]) <= 0.4]
        chosen += weak[:1]
        spread = sorted(first, key=lambda i: -np.ptp([float(t[i]["prediction"]) for t in tables.values()]))
        chosen += [i for i in spread if i not in chosen][: max(0, n - len(chosen))]
        ids = chosen[:n]
    out = []
    for clip in ids:
        row = first[clip]
        out.append({"id": clip, **{name: _label_text(row.get(column, "")) for name, column in
                                   (("label", "label"), ("T", "label_T"), ("A", "label_A"), ("V", "label_V"))},
                    **{label: float_text(float(t[clip]["prediction"]), 3) for label, t in tables.items()}})
    return out


def _label_text(text: str) -> str:
    """A label cell of a predictions CSV without float32 noise ("" stays "")."""
    return float_text(float(text)) if text.strip() else ""


def case_study_markdown(cases: list[dict[str, Any]], texts: dict[str, str], seeds: dict[str, Any]) -> str:
    """Markdown for the case study, with each clip's raw text; ``seeds``: the seed of each model's predictions."""
    keys = [k for k in cases[0] if k != "id"]
    which = (f"seed {next(iter(seeds.values()))}" if len(set(seeds.values())) == 1
             else ", ".join(f"{label}: seed {seed}" for label, seed in seeds.items()))
    lines = ["## Case study (test clips)", "", f"Predictions of each model's first seed ({which}).", "",
             "| id | text | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for c in cases:
        lines.append(f"| {c['id']} | {texts.get(c['id'], '')} | " + " | ".join(str(c[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def missing_modality_rows(run_dir: Path, labeled: Path, label: str, seed: int) -> list[dict[str, Any]]:
    """Test metrics of one run with each set of modalities removed, and the drop vs all present."""
    from aemt.evaluation.predict import evaluate_drops

    results = evaluate_drops(run_dir, labeled, DROP_SETS)
    full = results[()]
    main = next(k for k in full if "F1" in k)
    return [{"label": label, "seed": seed, "removed": "+".join(drop) or "none", **metrics,
             f"{main}_drop": round(full[main] - metrics[main], 4)} for drop, metrics in results.items()]


def missing_modality_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Mean F1 (×100) per model and removed modalities, and its drop vs all present."""
    main = next(k for k in rows[0] if k.endswith("_drop"))
    metric = main.removesuffix("_drop")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    removed = list(dict.fromkeys(r["removed"] for r in rows))
    lines = ["## Missing modalities at test time", "",
             f"{metric} ×100 (change vs all modalities), mean over seeds. Removed modalities are zeroed and "
             "reduced to one frame.", "", "| model | " + " | ".join(removed) + " |", "|---|" + "---|" * len(removed)]
    for label in labels:
        cells = []
        for rem in removed:
            group = [r for r in rows if r["label"] == label and r["removed"] == rem]
            value, drop = (mean_x100([float(r[key]) for r in group]) for key in (metric, main))
            cells.append(f"{value:.2f}" if rem == "none" else f"{value:.2f} ({-drop:+.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

