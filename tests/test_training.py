"""Training recipes on tiny synthetic data: the CLI end to end, losses go down, resume, predict."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_compat import _old_layout
from typer.testing import CliRunner

from aemt.cli import app
from aemt.config import load_config
from aemt.data.batches import make_loader
from aemt.data.dataset import load_labeled, load_unlabeled
from aemt.data.safe_pickle import safe_load_pickle
from aemt.data.synthetic import write_synthetic
from aemt.errors import RunError, TrainingInterrupted
from aemt.training import finetune as finetune_mod
from aemt.training.finetune import FinetuneModule, finetune, load_pretrained
from aemt.training.pretrain import PretrainModule, pretrain

TINY = {
    "data": {"seq_len": 8},
    "model": {"d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "cross_layers": 1,
              "self_layers": 1, "conv_kernels": [3, 1, 1], "dropout": 0.0, "attn_dropout": 0.0},
    "pretrain": {"epochs": 2, "batch_size": 16, "lr": 0.003, "patience": 50},
    "finetune": {"epochs": 2, "batch_size": 16, "lr": 0.003, "patience": 50},
    "trainer": {"accelerator": "cpu", "progress": False, "seed": 7},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    labeled, unlabeled = write_synthetic(root / "data", n_train=48, n_valid=16, n_test=20, n_unlabeled=64, seed=1)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", **TINY}))
    return root, config, labeled, unlabeled


def test_cli_pretrain_finetune_evaluate_predict(tiny, tmp_path, monkeypatch):
    root, config, labeled, unlabeled = tiny
    runner = CliRunner()
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    result = runner.invoke(app, ["pretrain", "-c", str(config), "--data", str(unlabeled), "--out", str(pre)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", "-c", str(config), "--data", str(labeled), "--out", str(ft),
                                 "--pretrained", str(pre), "--epochs", "3", "--set", "finetune.lambda2=0.5"])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "test_metrics.json", "predictions.csv", "metrics.csv", "model.pt",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (ft / name).is_file(), name
    saved = load_config(ft / "config.yaml")
    assert saved.finetune.epochs == 3 and saved.finetune.lambda2 == 0.5
    with open(ft / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3]
    with open(ft / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and list(rows[0]) == ["id", "label", "label_T", "label_A", "label_V", "prediction"]
    test_metrics = json.loads((ft / "test_metrics.json").read_text())
    result = runner.invoke(app, ["evaluate", "--run", str(ft), "--data", str(labeled), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == test_metrics  # same model, same data, same numbers
    score = runner.invoke(app, ["score", str(ft / "predictions.csv"), "--metrics", "sims", "--json"])
    assert json.loads(score.output) == test_metrics
    from aemt.data import mmsa
    unpickled = []
    monkeypatch.setattr(mmsa, "safe_load_pickle", lambda path: unpickled.append(path) or safe_load_pickle(path))
    out_csv, again_csv = tmp_path / "unlabeled_predictions.csv", tmp_path / "again.csv"
    for out in (out_csv, again_csv):
        result = runner.invoke(app, ["predict", "--run", str(ft), "--data", str(unlabeled), "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert unpickled == [unlabeled]  # read once, then from the pooled-array cache
    assert again_csv.read_text() == out_csv.read_text()
    with open(out_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 64 and list(rows[0]) == ["id", "split", "prediction"]  # one row per clip, no labels
    from aemt.data.mmsa import read_unlabeled
    file_order = [(s.name, i) for s in read_unlabeled(unlabeled).values() for i in s.ids]
    assert [(r["split"], r["id"]) for r in rows] == file_order
    result = runner.invoke(app, ["predict", "--run", str(ft), "--data", str(unlabeled), "--out", str(again_csv),
                                 "--split", "valid"])
    assert result.exit_code == 0, result.output
    with open(again_csv) as handle:
        valid = list(csv.DictReader(handle))
    whole = [r for r in rows if r["split"] == "valid"]
    assert [r["id"] for r in valid] == [r["id"] for r in whole] and valid  # the same rows
    assert [float(r["prediction"]) for r in valid] == pytest.approx([float(r["prediction"]) for r in whole], abs=1e-5)


def test_finetune_init_copies_pretrained_encoders(tiny, tmp_path):
    root, config, labeled, unlabeled = tiny
    cfg = load_config(config)
    pre = pretrain(cfg, unlabeled, tmp_path / "pre")
    pre_weights = torch.load(pre / "model.pt", weights_only=True)
    dims = load_labeled(labeled, seq_len=8).dims
    module = FinetuneModule(dims, cfg)
    loaded = load_pretrained(module.model, cfg, pre, dims)
    assert loaded
    for name, tensor in module.model.encoders.state_dict().items():
        assert torch.equal(tensor, pre_weights[f"encoders.{name}"]), name
    for key, value in (("model.d_model", 8), ("model.position_embeddings", False)):
        other = load_config(config, {key: value})
        with pytest.raises(Exception, match=rf"'{key}': the pre-training run used"):
            load_pretrained(FinetuneModule(dims, other).model, other, pre, dims)
    # a pre-training run of an older aemt (one autoencoder per modality) still initialises the encoders
    torch.save(_old_layout(pre_weights, "pretrain", "transformer"), pre / "model.pt")
    fresh = FinetuneModule(dims, cfg)
    assert sorted(load_pretrained(fresh.model, cfg, pre, dims)) == sorted(loaded)
    assert all(torch.equal(v, pre_weights[f"encoders.{k}"]) for k, v in fresh.model.encoders.state_dict().items())
    torch.save({"encoders.bogus": torch.zeros(1)}, pre / "model.pt")
    with pytest.raises(RunError, match="model.pt does not hold this model's encoders"):
        load_pretrained(fresh.model, cfg, pre, dims)


def _steps(module, batch, n=25):
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.log_epoch_means = lambda *a, **k: None
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_few_steps_reduce_each_loss(tiny):
    root, config, labeled, unlabeled = tiny
    torch.manual_seed(0)
    cfg = load_config(config, {"pretrain.p_tamper": 0.5})
    data = load_unlabeled(unlabeled, seq_len=8)
    batch = next(iter(make_loader(data["train"], 32, shuffle=False)))
    module = PretrainModule(data.dims, cfg)
    from aemt.data.tampering import tamper_batch
    from aemt.training.losses import consistency_loss, reconstruction_loss
    from aemt.data.batches import masks_from_lengths

    def parts():
        x = {m: batch[m] for m in ("text", "audio", "vision")}
        xt, mt, y, _, _ = tamper_batch(x, masks_from_lengths(batch), 0.5, torch.Generator().manual_seed(3))
        out = module.model(xt, mt)
        return reconstruction_loss(out.recon, xt, mt).item(), consistency_loss(out.tamper_logit, y).item()
    before = parts()
    module.training_step = lambda b, i: PretrainModule._step(module, b, 0, "train", torch.Generator().manual_seed(3))
    _steps(module, batch, 40)
    after = parts()
    assert after[0] < before[0] and after[1] < before[1]

    labeled_data = load_labeled(labeled, seq_len=8)
    batch = next(iter(make_loader(labeled_data["train"], 32, shuffle=False)))
    ft = FinetuneModule(labeled_data.dims, load_config(config, {"finetune.lambda2": 1.0, "finetune.sp_dropout": 0.0}))
    logged = {}
    losses = _steps(ft, batch, 30)
    ft.log_epoch_means = lambda stage, values, *a: logged.update({f"{stage}_{k}": float(v.detach()) for k, v in values.items()})
    ft.training_step(batch, 0)
    assert losses[-1] < losses[0]
    assert logged["train_senti"] < 0.5 * losses[0] or logged["train_senti"] < 0.05


def test_interrupted_run_resumes_from_saved_epoch(tiny, tmp_path, monkeypatch):
    root, config, labeled, unlabeled = tiny
    # a learning rate too small to move any weight: validation never improves after epoch 0, so
    # "best" stays at epoch 0 while "last" must follow every epoch
    cfg = load_config(config, {"finetune.epochs": 4, "finetune.lr": 1e-30})
    from lightning.pytorch.callbacks import Callback

    class Interrupt(Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 2:  # before epoch 2's checkpoint is written
                raise KeyboardInterrupt

    original = finetune_mod.build_trainer
    monkeypatch.setattr(finetune_mod, "build_trainer",
                        lambda *a, **k: original(*a, **k, extra_callbacks=[Interrupt()]))
    pre = pretrain(load_config(config, {"pretrain.epochs": 1}), unlabeled, tmp_path / "pre")
    with pytest.raises(TrainingInterrupted, match=r"interrupted in epoch 3; its last finished epoch .* --resume"):
        finetune(cfg, labeled, tmp_path / "ft", pretrained_dir=pre)
    assert not (tmp_path / "ft" / "test_metrics.json").exists()
    saved = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1  # epochs 0 and 1 completed
    assert torch.load(tmp_path / "ft" / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0
    class Record(Callback):
        started = []

        def on_train_epoch_start(self, trainer, module):
            self.started.append(trainer.current_epoch)

    monkeypatch.setattr(finetune_mod, "build_trainer",
                        lambda *a, **k: original(*a, **k, extra_callbacks=[Record()]))
    with pytest.raises(Exception, match="--resume"):
        finetune(cfg, labeled, tmp_path / "ft")  # refuses to overwrite
    metrics = finetune(cfg, labeled, tmp_path / "ft", resume=True)
    assert Record.started == [2, 3]  # continues after the last saved epoch
    assert "Corr" in metrics
    with open(tmp_path / "ft" / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4]
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["epochs_run"] == 4
    # resumed without --pretrained: run.json still names the pre-training run the encoders came from
    assert info["pretrained"] == str(Path(pre).resolve()) and info["pretrained_tensors"] > 0


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tiny, tmp_path, stage):
    """The checkpoint keeps the random state (shuffling, tampering, strong-positive masks): 2 epochs
    then a resume to 3 give the metrics and weights of 3 epochs in one go."""
    root, config, labeled, unlabeled = tiny
    run = pretrain if stage == "pretrain" else finetune
    data = unlabeled if stage == "pretrain" else labeled
    extra = {} if stage == "pretrain" else {"finetune.pretrained": "none"}
    run(load_config(config, {f"{stage}.epochs": 3, **extra}), data, tmp_path / "straight")
    run(load_config(config, {f"{stage}.epochs": 2, **extra}), data, tmp_path / "resumed")
    run(load_config(config, {f"{stage}.epochs": 3, **extra}), data, tmp_path / "resumed", resume=True)
    rows = {}
    for name in ("straight", "resumed"):
        with open(tmp_path / name / "metrics.csv") as handle:
            rows[name] = [{k: v for k, v in r.items() if "time" not in k} for r in csv.DictReader(handle)]
    assert len(rows["straight"]) == 3 and rows["straight"] == rows["resumed"]
    weights = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("straight", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_resumed_run_keeps_its_new_patience(tmp_path):
    """The early-stopping state comes from the checkpoint, the patience from the resumed run."""
    from aemt.training.common import ResumableEarlyStopping, build_trainer

    trainer = build_trainer(load_config("synthetic"), tmp_path, 10, patience=3)
    (stopping,) = [c for c in trainer.callbacks if isinstance(c, ResumableEarlyStopping)]
    saved = build_trainer(load_config("synthetic"), tmp_path, 10, patience=1)
    (old,) = [c for c in saved.callbacks if isinstance(c, ResumableEarlyStopping)]
    old.wait_count, old.best_score = 1, torch.tensor(0.4)
    stopping.load_state_dict(old.state_dict())
    assert stopping.patience == 3 and stopping.wait_count == 1 and float(stopping.best_score) == pytest.approx(0.4)


def test_early_stopping_state_of_older_checkpoints_still_loads(tmp_path):
    """Lightning files callback state by class name: ours must use EarlyStopping's key."""
    from lightning.pytorch.callbacks import EarlyStopping

    from aemt.training.common import ResumableEarlyStopping, build_trainer

    (ours,) = [c for c in build_trainer(load_config("synthetic"), tmp_path, 3, patience=2).callbacks
               if isinstance(c, ResumableEarlyStopping)]
    assert ours.state_key == EarlyStopping(monitor="val_loss", mode="min", patience=2).state_key


def test_metrics_csv_of_a_run_started_with_epochs_from_zero_is_renumbered(tmp_path):
    from types import SimpleNamespace

    from aemt.training.common import EpochCSV

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,lr,val_loss\n0,0.1,0.5\n1,0.1,0.4\n")  # two epochs, numbered as before
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, current_epoch=2,
                              optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])],
                              callback_metrics={"val_loss": torch.tensor(0.3)})
    EpochCSV(path).on_train_epoch_end(trainer, None)
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [float(r["val_loss"]) for r in rows] == pytest.approx([0.5, 0.4, 0.3])


def test_the_progress_bar_counts_epochs_from_one(tiny, tmp_path, capsys):
    root, config, labeled, unlabeled = tiny
    cfg = load_config(config, {"pretrain.epochs": 2, "trainer.progress": True})
    pretrain(cfg, unlabeled, tmp_path / "pre")
    shown = "".join(capsys.readouterr())
    assert "Epoch 1/2:" in shown and "Epoch 2/2: 100%" in shown and "Epoch 3" not in shown


def test_resume_refuses_other_settings_and_leaves_the_run_intact(tiny, tmp_path):
    root, config, labeled, unlabeled = tiny
    runner, pre = CliRunner(), tmp_path / "pre"
    args = ["pretrain", "-c", str(config), "--data", str(unlabeled), "--out", str(pre)]
    assert runner.invoke(app, [*args, "--epochs", "1"]).exit_code == 0
    before = (pre / "config.yaml").read_text(), (pre / "run.json").read_text()
    result = runner.invoke(app, [*args, "--resume", "--set", "model.d_model=8"])
    assert isinstance(result.exception, RunError)
    assert "model.d_model: 16 -> 8" in str(result.exception) and "another --out" in str(result.exception)
    assert ((pre / "config.yaml").read_text(), (pre / "run.json").read_text()) == before
    _, other = write_synthetic(tmp_path / "other", n_train=48, n_valid=16, n_test=20, n_unlabeled=64, seed=2)
    moved = [*args[:4], str(other), *args[5:]]  # another file of the same shape
    result = runner.invoke(app, [*moved, "--resume", "--epochs", "2"])
    assert isinstance(result.exception, RunError)
    assert re.search(r"data: '.*/unlabeled.pkl' -> '.*/other/unlabeled.pkl' \(other clips", str(result.exception))
    assert ((pre / "config.yaml").read_text(), (pre / "run.json").read_text()) == before
    result = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output  # training longer on the same data is a resume
    with open(pre / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2]
    before = (pre / "config.yaml").read_text(), (pre / "run.json").read_text()
    result = runner.invoke(app, [*args, "--resume", "--epochs", "1"])
    assert isinstance(result.exception, RunError)
    assert "has already finished 2 epochs, more than the 1 asked for" in str(result.exception)
    assert ((pre / "config.yaml").read_text(), (pre / "run.json").read_text()) == before


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_diverging_run_stops_with_one_error_at_the_first_non_finite_epoch(tiny, tmp_path, stage):
    root, config, labeled, unlabeled = tiny
    cfg = load_config(config, {f"{stage}.lr": 1e30, f"{stage}.epochs": 6, "trainer.grad_clip": 0.0})
    run = pretrain if stage == "pretrain" else finetune
    expected = rf"{stage} diverged in epoch 1: \w+_loss = (nan|inf).*{stage}.lr, now 1e\+30"
    with pytest.raises(RunError, match=expected):
        run(cfg, unlabeled if stage == "pretrain" else labeled, tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()  # no model of NaN weights is left behind


def test_pretrained_and_training_from_scratch_together_are_refused(tiny, tmp_path):
    from aemt.errors import ConfigError

    root, config, labeled, unlabeled = tiny
    with pytest.raises(ConfigError, match=r"--pretrained '.*pre' was given, but finetune.pretrained is 'none'"):
        finetune(load_config(config, {"finetune.pretrained": "none"}), labeled, tmp_path / "ft",
                 pretrained_dir=tmp_path / "pre")
    assert not (tmp_path / "ft").exists()


def test_demo_refuses_a_folder_made_with_other_settings(tmp_path):
    from aemt.config import save_config
    from aemt.evaluation.demo import run_demo

    (tmp_path / "pretrain").mkdir()
    save_config(load_config("synthetic", {"pretrain.epochs": 1}), tmp_path / "pretrain" / "config.yaml")
    with pytest.raises(RunError, match=r"trainer.seed: 1111 -> 7\); choose another --out"):
        run_demo(tmp_path, seed=7, pretrain_epochs=1)
    with pytest.raises(RunError, match=r"pretrain.epochs: 1 -> 2"):
        run_demo(tmp_path, pretrain_epochs=2)
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_demo_refuses_zero_epochs(tmp_path):
    from aemt.errors import ConfigError
    from aemt.evaluation.demo import run_demo

    for key in ("pretrain_epochs", "finetune_epochs"):
        with pytest.raises(ConfigError, match=rf"'{key.replace('_epochs', '')}.epochs': expected >= 1, got 0"):
            run_demo(tmp_path, **{key: 0})


def test_a_demo_rerun_keeps_the_step_times(tmp_path):
    from aemt.evaluation.demo import run_demo

    first = run_demo(tmp_path, pretrain_epochs=1, finetune_epochs=1, log=lambda m: None)
    seconds = json.loads((tmp_path / "summary.json").read_text())["seconds"]
    assert set(seconds) == {"pretrain_s", "aemt_s", "mult_s"} and all(v > 0 for v in seconds.values())
    assert run_demo(tmp_path, pretrain_epochs=1, finetune_epochs=1, log=lambda m: None) == first  # every step skipped
    assert json.loads((tmp_path / "summary.json").read_text())["seconds"] == seconds


def test_device_settings_this_machine_cannot_run_are_refused_before_anything_is_written(tiny, tmp_path, monkeypatch):
    from aemt.errors import ConfigError

    root, config, labeled, unlabeled = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'gpu' asks for a CUDA GPU, but torch .* sees none"):
        pretrain(load_config(config, {"trainer.accelerator": "gpu"}), unlabeled, tmp_path / "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="trainer.devices: 2 GPUs asked for, 1 visible"):
        finetune(load_config(config, {"trainer.accelerator": "gpu", "trainer.devices": 2}), labeled, tmp_path / "two")
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "two").exists()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="Lightning refused the trainer settings .*strategy 'no-such-strategy'"):
        pretrain(load_config(config, {"trainer.strategy": "no-such-strategy"}), unlabeled, tmp_path / "strategy")


def test_epoch_means_equal_lightnings_epoch_logging(tiny, tmp_path):
    """log_epoch_means logs what self.log(on_epoch=True) would: the clip-weighted epoch mean
    (48 training clips in batches of 16, 16, 16; 16 validation clips in batches of 5, 5, 5, 1)."""
    import lightning as L

    from aemt.training.common import build_trainer

    root, config, labeled, unlabeled = tiny
    cfg = load_config(config)
    data = load_labeled(labeled, seq_len=8)
    calls = []

    class Both(FinetuneModule):
        def log_epoch_means(self, stage, values, batch_size, batch_idx):
            calls.append((stage, batch_idx))
            super().log_epoch_means(stage, values, batch_size, batch_idx)
            self.log_dict({f"lightning_{stage}_{k}": v for k, v in values.items()}, on_step=False, on_epoch=True,
                          batch_size=batch_size, sync_dist=stage == "val")

    trainer = build_trainer(cfg, tmp_path, 1, patience=5)
    L.seed_everything(0, verbose=False)
    trainer.fit(Both(data.dims, cfg), make_loader(data["train"], 16, shuffle=True, seed=0),
                make_loader(data["valid"], 5, shuffle=False))
    metrics = trainer.callback_metrics
    names = ["train_loss", "train_senti", "train_con", "val_loss", "val_mae"]
    assert all(name in metrics for name in names)
    for name in names:
        assert torch.allclose(metrics[name], metrics[f"lightning_{name}"], rtol=1e-6, atol=0), name
    assert calls == [("train", i) for i in range(3)] + [("val", i) for i in range(4)]
    with open(tmp_path / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["train_loss"]) == pytest.approx(float(metrics["train_loss"]))


@pytest.mark.parametrize("model_dropout", [False, True])
def test_strong_positive_pass_model_dropout(tiny, model_dropout):
    """The no-grad strong-positive pass runs in eval mode unless finetune.sp_model_dropout."""
    root, config, labeled, unlabeled = tiny
    data = load_labeled(labeled, seq_len=8)
    batch = next(iter(make_loader(data["train"], 8, shuffle=False)))
    ft = FinetuneModule(data.dims, load_config(config, {"finetune.lambda2": 1.0,
                                                        "finetune.sp_model_dropout": model_dropout}))
    ft.log_epoch_means = lambda *a, **k: None
    modes, model = [], ft.forward_fn
    ft.__dict__["forward_fn"] = lambda x, m: (modes.append((model.training, torch.is_grad_enabled())), model(x, m))[1]
    ft.train()
    ft.training_step(batch, 0).backward()
    assert modes == [(True, True), (model_dropout, False)]
    assert ft.model.training  # restored


def test_adam_is_fused_on_cpu_and_matches_plain_adam():
    from aemt.training.optim import adam

    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    fused, plain = adam(a.parameters(), lr=1e-2, weight_decay=1e-3), torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-3)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x, start = torch.randn(8, 6), a.weight.detach().clone()
    for _ in range(5):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.allclose(a.weight, start)  # it did train


def test_bf16_mixed_precision_keeps_fused_adam_and_clips_its_gradients(tiny, tmp_path):
    """Lightning refuses to clip a fused optimiser's gradients under any mixed precision (fp16's
    loss scaler leaves them scaled); bf16 has no scaler, so aemt keeps the fused Adam and clips:
    after each step the gradients' global norm is at most trainer.grad_clip."""
    import lightning as L

    from aemt.training.common import build_trainer

    root, config, labeled, unlabeled = tiny
    cfg = load_config(config, {"trainer.precision": "bf16-mixed", "trainer.grad_clip": 1e-3})
    data = load_labeled(labeled, seq_len=8)
    seen = []

    def grad_norm(module):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters()
                                                           if p.grad is not None])))

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):  # runs before the clipping
            seen.append([grad_norm(module)])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after clip and step
            seen[-1] += [grad_norm(module), trainer.optimizers[0].param_groups[0]["fused"]]

    trainer = build_trainer(cfg, tmp_path, 1, patience=5, extra_callbacks=[Record()])
    trainer.fit(FinetuneModule(data.dims, cfg), make_loader(data["train"], 16, shuffle=True, seed=0),
                make_loader(data["valid"], 16, shuffle=False))
    assert len(seen) == 3
    for before, after, fused in seen:
        assert fused and before > 1e-2 and 0 < after <= 1e-3 * (1 + 1e-4)


def test_fp16_loss_scaling_with_clipping_gets_the_unfused_adam(tiny):
    """With a loss scaler the gradients are still scaled when Lightning clips, so a fused Adam
    (which unscales inside its step) must not be used; clipping is left to Lightning, which
    refuses a fused optimiser there."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    from aemt.training.optim import adam

    root, config, labeled, unlabeled = tiny
    dims = load_labeled(labeled, seq_len=8).dims
    kinds = {}
    for precision in ("16-mixed", "bf16-mixed"):
        module = FinetuneModule(dims, load_config(config, {"trainer.grad_clip": 0.8}))
        module.trainer = SimpleNamespace(precision_plugin=MixedPrecision(precision, "cpu"))
        kinds[precision] = module.configure_optimizers()["optimizer"].defaults["fused"]
    assert kinds == {"16-mixed": None, "bf16-mixed": True}
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        module.trainer = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu"), gradient_clip_val=0.8,
                                         gradient_clip_algorithm=None)
        module.configure_gradient_clipping(adam(module.parameters(), lr=1e-3), 0.8, None)


def test_mixed_precision_with_gradient_clipping_trains(tiny, tmp_path):
    """The whole recipe under bf16 autocast with gradient clipping (bf16 runs on the CPU too)."""
    root, config, labeled, unlabeled = tiny
    cfg = load_config(config, {"finetune.epochs": 1, "trainer.precision": "bf16-mixed", "trainer.grad_clip": 0.8})
    metrics = finetune(cfg, labeled, tmp_path / "ft")
    assert "Corr" in metrics


def test_a_second_run_into_a_finished_folder_says_how_to_resume_from_the_cli_and_from_python(tmp_path):
    from aemt.training.resume import last_checkpoint, resume_checkpoint

    assert resume_checkpoint(tmp_path, resume=False) is None
    last_checkpoint(tmp_path).parent.mkdir(parents=True)
    last_checkpoint(tmp_path).write_bytes(b"")
    with pytest.raises(RunError, match=r"already holds a run; pass --resume \(from Python: resume=True\)"):
        resume_checkpoint(tmp_path, resume=False)
    assert resume_checkpoint(tmp_path, resume=True) == str(last_checkpoint(tmp_path))
