"""``aemt bench``: its JSON and epoch timing, at a tiny size (the speed itself is measured in bench/)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aemt.cli import app
from aemt.config import load_config
from aemt.errors import ConfigError
from aemt.evaluation.bench import bench_epochs, run_bench


def test_bench_json_has_a_row_per_model_and_the_load_rows():
    result = CliRunner().invoke(app, ["bench", "--quick", "--json", "--batch", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["matmul_gflops"] > 0 and set(report["ratios"]) == {"finetune_vs_same_arch_mult_b2"}
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"mult_train", "mult_same_arch_train", "aemt_pretrain_train", "aemt_finetune_train",
                         "aemt_infer", "load_pool", "load_pool_cached"}
    for row in rows.values():
        assert row["clips_per_s"] > 0 and row["peak_mem_mb"] > 0
    for name in ("mult_train", "mult_same_arch_train", "aemt_pretrain_train", "aemt_finetune_train", "aemt_infer"):
        assert rows[name]["batch"] == 2 and rows[name]["gflop_per_clip"] > 0 and rows[name]["achieved_gflops"] > 0
    # AE-MT fine-tuning is the same architecture plus the strong-positive pass: more FLOPs per clip
    assert rows["aemt_finetune_train"]["gflop_per_clip"] > rows["mult_same_arch_train"]["gflop_per_clip"]
    assert rows["load_pool"]["batch"] == rows["load_pool_cached"]["batch"] == 400


def test_bench_epochs_logs_each_epoch_and_reports_both_stages():
    logs: list[str] = []
    cfg = load_config("sims2", {"trainer.accelerator": "cpu", "pretrain.batch_size": 4, "finetune.batch_size": 4})
    rows = bench_epochs(cfg, n_pretrain=8, n_finetune=8, n_valid=4, epochs=3, log=logs.append, profiled_last=True)
    assert [r["name"] for r in rows] == ["pretrain_epoch", "finetune_epoch"]
    assert all(r["clips"] == 8 and r["batch"] == 4 and r["epoch_s"] > 0 for r in rows)
    for r in rows:  # the first (warm-up) and the last (profiled) epochs are left out of epoch_s
        assert len(r["epochs_s"]) == 3 and r["epoch_s"] == r["epochs_s"][1] and r["last_epoch_s"] == r["epochs_s"][2]
    for stage in ("pretrain_epoch", "finetune_epoch"):
        epochs = [m.split(":")[0] for m in logs if m.startswith(f"{stage} epoch")]
        assert epochs == [f"{stage} epoch 1", f"{stage} epoch 2", f"{stage} epoch 3"]


def test_bench_table_shows_every_row_name_whole_at_80_columns(monkeypatch):
    import aemt.evaluation.bench as bench

    names = ["mult_train", "mult_same_arch_train", "aemt_pretrain_train", "aemt_finetune_train", "aemt_infer"]
    rows = [{"name": n, "batch": 64, "clips_per_s": 151.6, "ms_per_step": 422.0, "peak_mem_mb": 1269.0,
             "gflop_per_clip": 0.422, "achieved_gflops": 64.0} for n in names]
    rows.append({"name": "load_pool_cached", "batch": 400, "clips_per_s": 3952.0, "seconds": 0.101,
                 "peak_mem_mb": 828.0})
    report = {"device": "cpu (2 threads)", "torch": "2.13.0+cpu", "matmul_gflops": 181.7, "results": rows,
              "ratios": {"finetune_vs_same_arch_mult_b64": 1.32}}
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: report)
    from aemt.cli.data_commands import console

    monkeypatch.setattr(console, "_width", 80)  # what rich uses on an 80-column terminal
    result = CliRunner().invoke(app, ["bench", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for name in names + ["load_pool_cached"]:
        assert f" {name} " in result.stdout
    load_line = next(line for line in result.stdout.splitlines() if "load_pool_cached" in line)
    assert "nan" not in load_line and "101.0" in load_line


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device: 'cuda' is not available (no CUDA here); expected one of: cpu"),
    (["--device", "tpu"], "--device: expected one of: cpu, got 'tpu'"),
    (["--device", "cpu", "--batch", "0"], "--batch: expected batch sizes of at least 1, got 0"),
    (["--device", "cpu", "--batch", "8", "--batch", "-3"], "--batch: expected batch sizes of at least 1, got -3"),
])
def test_bench_refuses_bad_options_before_running(monkeypatch, args, message):
    import torch

    import aemt.evaluation.bench as bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: pytest.fail("ran the benchmark"))
    result = CliRunner().invoke(app, ["bench", "--quick", *args])
    assert isinstance(result.exception, ConfigError) and str(result.exception).startswith(message), result.exception


def test_bench_names_the_cuda_devices_there_are(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^device: 'cuda:2' is not available .*expected one of: cpu, cuda, "
                                          r"cuda:0, cuda:1"):
        run_bench(device="cuda:2")
    with pytest.raises(ConfigError, match=r"^batches: expected batch sizes of at least 1, got 0"):
        run_bench(device="cpu", batches=[0])
