"""aemt's metrics vs MMSA 2.2.1's ``MetricsTop`` on random predictions and labels (not a benchmark:
a parity check). Labels on a 0.1 grid (SIMS) and a 1/3 grid (MOSEI) put many values on the bin
edges, where float32 and float64 comparisons differ. Runs in the environment of
``bench/compare_mmsa.py`` (see its docstring)::

    /work/mmsa-venv/bin/python bench/metrics_vs_mmsa.py [--trials 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # aemt from this checkout

from aemt.evaluation.metrics import compute_metrics  # noqa: E402


def draws(rng: np.random.Generator, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (predictions, labels): labels on the data set's grid, predictions partly on it too."""
    if kind == "sims":
        true = rng.integers(-10, 11, n) / 10
        pred = np.where(rng.random(n) < 0.3, rng.integers(-10, 11, n) / 10, rng.uniform(-1.2, 1.2, n))
    else:
        true = rng.integers(-9, 10, n) / 3
        pred = np.where(rng.random(n) < 0.3, rng.integers(-6, 7, n) / 2, rng.uniform(-3.5, 3.5, n))
    return pred.astype(np.float32), true.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--clips", type=int, default=50)
    a = p.parse_args(argv)
    from MMSA.utils.metricsTop import MetricsTop

    rng, failed = np.random.default_rng(0), 0
    for kind, dataset in (("sims", "SIMS"), ("mosei", "MOSEI")):
        mmsa = MetricsTop("regression").getMetics(dataset)
        differ: dict[str, int] = {}
        for _ in range(a.trials):
            pred, true = draws(rng, kind, a.clips)
            ref, ours = mmsa(torch.from_numpy(pred), torch.from_numpy(true)), compute_metrics(pred, true, kind)
            for key in ours:
                if abs(round(float(ref[key]), 4) - ours[key]) > 1e-9:
                    differ[key] = differ.get(key, 0) + 1
        print(f"{kind}: {a.trials} trials of {a.clips} clips; trials where a metric differs from MMSA: "
              f"{differ or 'none'}")
        failed += bool(differ)
    return int(failed > 0)


if __name__ == "__main__":
    raise SystemExit(main())
