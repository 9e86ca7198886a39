"""Two DDP processes (gloo, CPU) fine-tune a few steps, end with identical weights, and return
only once rank 0 has written the run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from aemt.data.synthetic import write_synthetic


def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    labeled, _ = write_synthetic(tmp_path / "data", n_train=48, n_valid=16, n_test=20, n_unlabeled=8, seed=1)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(worker), str(tmp_path), str(labeled)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # the ranks did train
    # rank 0 returns the test metrics; rank 1 returns nothing, but only after rank 0 wrote the run
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"returned_metrics": True, "run_files_exist": True}
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"returned_metrics": False, "run_files_exist": True}
