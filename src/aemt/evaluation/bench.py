"""``aemt bench``: throughput, FLOPs and memory at CH-SIMS v2 shapes.

Rows (``name``, ``batch``, ``clips_per_s``, ``ms_per_step``, ``peak_mem_mb``, ``gflop_per_clip``,
``achieved_gflops``):

* ``mult_train``: plain MulT at MMSA's CH-SIMS hyperparameters (width 50, 10 heads, 2 cross-modal
  levels, 3-layer memory transformers, conv kernels 5/1/1), no encoders, no pre-training, no CL;
* ``mult_same_arch_train``: the AE-MT architecture (sims2 preset) trained as plain MulT
  (λ2 = 0), the "same width and lengths" reference for the cost of contrastive learning;
* ``aemt_pretrain_train``: one pre-training step (tampering, reconstruction, consistency);
* ``aemt_finetune_train``: one fine-tuning step with contrastive learning;
* ``aemt_infer``: fine-tuned model forward pass without gradients;
* ``load_pool``: reading, validating and pooling a CH-SIMS-v2-shaped labeled file (first load),
  and ``load_pool_cached`` the second load of the same file (memory-mapped cache).

All model rows use inputs pooled to length 50 from text 50×768, audio 925×25, vision 232×177.
Steps alternate within each timing round (shared machines). Peak memory is the process's peak
RSS during the row's steps on CPU (reset through
``/proc/self/clear_refs``) and ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from aemt.config import Config, load_config
from aemt.errors import ConfigError
from aemt.training.optim import adam

SIMS2_DIMS = {"text": 768, "audio": 25, "vision": 177}
# MMSA 2.2.1's MulT for SIMS (config_regression.json): res/relu/embed/out dropouts 0.2/0/0.1/0.1,
# attention dropout 0.2 (text target and memory), 0.1 (audio target), 0 (vision target), text
# dropout 0.3, attn_mask true (the future mask). aemt's input stage (padded conv, positions), not
# MMSA's (model.conv_padding: valid, model.position_embeddings: false; see bench/compare_mmsa.py)
MMSA_MULT = {"d_model": 50, "num_heads": 10, "encoder_layers": 0, "cross_layers": 2, "self_layers": 3,
             "conv_kernels": (5, 1, 1), "dropout": 0.2, "ffn_dropout": 0.0, "embed_dropout": 0.1,
             "out_dropout": 0.1, "attn_dropout": 0.2, "cross_attn_dropout": (0.2, 0.1, 0.0),
             "text_dropout": 0.3, "causal_attention": True}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        import gc

        from aemt.training.allocator import release_freed_memory

        gc.collect()
        release_freed_memory()  # else memory kept from earlier rows counts in every later peak
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul throughput (float32 on CPU, bf16 on GPU), in GFLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else size
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _batch(batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m, dim in SIMS2_DIMS.items():
        out[m] = torch.randn(batch, seq_len, dim, device=device)
        out[f"{m}_len"] = torch.randint(seq_len // 2, seq_len + 1, (batch,), device=device)
    values = torch.round(torch.rand(batch, 4, device=device) * 10 - 5) / 5  # SIMS-like grid in [-1, 1]
    out["label"], out["index"] = values, torch.arange(batch, device=device)
    return out


def _time_interleaved(steps: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                      repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds and peak memory (MB) of each step; the steps alternate within every round,
    so that load from other processes hits them alike (the machines here are shared)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    peaks: dict[str, float] = {}
    for name, step in steps.items():  # apart from the timing: the CPU reset hands memory back
        _reset_peak(device)
        step()
        _sync(device)
        peaks[name] = _peak_mb(device)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def _flops(step: Callable[[], Any]) -> float:
    """FLOPs of one call of ``step``: the model's, i.e. with the true head dims where CUDA's
    attention would zero-pad them."""
    from torch.utils.flop_counter import FlopCounterMode

    from aemt.models.layers.attention import unpadded_heads

    with FlopCounterMode(display=False) as counter, unpadded_heads():
        step()
    return float(counter.get_total_flops())


def _training_step(module, batch, optimizer, autocast: bool) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
    return step


def _modules(cfg: Config, device: torch.device):
    from aemt.training.finetune import FinetuneModule
    from aemt.training.pretrain import PretrainModule

    def quiet(module):
        module.log_epoch_means = lambda *a, **k: None  # no Trainer attached
        return module.to(device).train()
    return {
        "mult_train": quiet(FinetuneModule(SIMS2_DIMS, _mult_config(cfg))),
        "mult_same_arch_train": quiet(FinetuneModule(SIMS2_DIMS, _no_cl(cfg))),
        "aemt_pretrain_train": quiet(PretrainModule(SIMS2_DIMS, cfg)),
        "aemt_finetune_train": quiet(FinetuneModule(SIMS2_DIMS, cfg)),
    }


def _mult_config(cfg: Config) -> Config:
    model = dataclasses.replace(cfg.model, **MMSA_MULT)
    return dataclasses.replace(_no_cl(cfg), model=model)


def _no_cl(cfg: Config) -> Config:
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lambda2=0.0, pretrained="none"))


def bench_models(cfg: Config, batches: list[int], device: torch.device, repeats: int, warmup: int = 2,
                 log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Step throughput, FLOPs and peak memory of each model row at each batch size."""
    torch.manual_seed(0)
    modules = _modules(cfg, device)
    autocast = device.type == "cuda" and cfg.trainer.precision in ("bf16-mixed", "bf16", "auto")
    rows = []
    for batch_size in batches:
        batch = _batch(batch_size, cfg.data.seq_len, device)
        steps = {name: _training_step(m, batch, adam(m.parameters(), lr=1e-4), autocast)
                 for name, m in modules.items()}
        infer_model = modules["aemt_finetune_train"].model
        infer_fn = modules["aemt_finetune_train"].forward_fn  # compiled with --compile, as in training

        @torch.no_grad()
        def infer() -> None:
            from aemt.data.batches import masks_from_lengths

            infer_model.eval()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                infer_fn({m: batch[m] for m in SIMS2_DIMS}, masks_from_lengths(batch))
            infer_model.train()
        steps["aemt_infer"] = infer
        log(f"batch {batch_size}: {', '.join(steps)}")
        flops = {name: _flops(step) / batch_size for name, step in steps.items()}
        for name, (seconds, peak) in _time_interleaved(steps, device, warmup, repeats).items():
            rows.append({"name": name, "batch": batch_size, "clips_per_s": round(batch_size / seconds, 1),
                         "ms_per_step": round(seconds * 1000, 2), "peak_mem_mb": round(peak, 1),
                         "gflop_per_clip": round(flops[name] / 1e9, 4),
                         "achieved_gflops": round(flops[name] * batch_size / seconds / 1e9, 2)})
    return rows


def bench_load_pool(n_clips: int, seq_len: int = 50, scale: str = "full") -> list[dict[str, Any]]:
    """Time a first (cold cache) and second (cached) load + pool of a CH-SIMS-v2-shaped file."""
    from aemt.data.dataset import load_labeled
    from aemt.data.synthetic import write_synthetic

    n_train, n_valid = round(n_clips * 2722 / 4403), round(n_clips * 647 / 4403)
    with tempfile.TemporaryDirectory() as tmp:
        labeled, _ = write_synthetic(tmp, scale=scale, n_train=n_train, n_valid=n_valid,
                                     n_test=n_clips - n_train - n_valid, n_unlabeled=2)
        size_mb = labeled.stat().st_size / 2**20
        rows = []
        for name in ("load_pool", "load_pool_cached"):
            _reset_peak(torch.device("cpu"))
            start = time.perf_counter()
            data = load_labeled(labeled, seq_len=seq_len, metrics="sims", cache_dir=Path(tmp) / "cache")
            seconds = time.perf_counter() - start
            assert data.from_cache == (name == "load_pool_cached")
            rows.append({"name": name, "batch": n_clips, "clips_per_s": round(n_clips / seconds, 1),
                         "seconds": round(seconds, 3), "peak_mem_mb": round(_peak_mb(torch.device("cpu")), 1),
                         "file_mb": round(size_mb, 1)})
            del data
    rows[1]["speedup_vs_first"] = round(rows[0]["seconds"] / rows[1]["seconds"], 2)
    return rows


def available_devices() -> list[str]:
    """The devices ``aemt bench`` can run on here: cpu, cuda, cuda:0... for each visible GPU, and mps."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    return ["cpu", *(["cuda"] if count else []), *(f"cuda:{i}" for i in range(count)), *(["mps"] if mps else [])]


def bench_device(device: str | None, option: str = "device") -> torch.device:
    """``device`` (default: cuda when available, else cpu), checked to name a device that is
    available here; raises :class:`ConfigError` naming ``option`` and the devices there are."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is not None and (parsed.type == "cpu" or str(parsed) in available):
        return parsed
    expected = f"expected one of: {', '.join(available)}"
    if parsed is not None and parsed.type == "cuda":
        why = "no CUDA here" if not torch.cuda.is_available() else f"{torch.cuda.device_count()} GPU(s) visible"
        raise ConfigError(f"{option}: {device!r} is not available ({why}); {expected}")
    raise ConfigError(f"{option}: {expected}, got {device!r}")


def check_batches(batches: list[int] | None, option: str = "batches") -> None:
    """Refuse a batch size below 1 (raises :class:`ConfigError` naming ``option``)."""
    for size in batches or []:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{option}: expected batch sizes of at least 1, got {size!r}")


def run_bench(quick: bool = False, device: str | None = None, batches: list[int] | None = None,
              precision: str | None = None, overrides: dict[str, Any] | None = None,
              log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The whole benchmark; ``quick`` uses fewer repeats and a 400-clip file (about a minute on 2 cores).
    ``overrides``: config overrides of the ``sims2`` preset (e.g. ``{"trainer.compile": True}``)."""
    from aemt.training.allocator import keep_freed_memory

    dev = bench_device(device)
    check_batches(batches)
    keep_freed_memory()  # as training does (build_trainer)
    overrides = dict(overrides or {})
    if precision:
        overrides["trainer.precision"] = precision
    cfg = load_config("sims2", overrides)
    log("matmul")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": cfg.trainer.precision if dev.type == "cuda" else "32-true",
        "matmul_gflops": round(matmul_gflops(dev), 1),
        "shapes": {"text": [50, 768], "audio": [925, 25], "vision": [232, 177], "pooled_len": cfg.data.seq_len},
    }
    rows = bench_models(cfg, batches or [16, 64], dev, repeats=3 if quick else 10, warmup=1 if quick else 3, log=log)
    log("load_pool")
    rows += bench_load_pool(400 if quick else 4403)
    by = {(r["name"], r["batch"]): r for r in rows}
    result["ratios"] = {
        f"finetune_vs_same_arch_mult_b{b}": round(by[("mult_same_arch_train", b)]["clips_per_s"]
                                                   / by[("aemt_finetune_train", b)]["clips_per_s"], 2)
        for b in batches or [16, 64]}
    result["results"] = rows
    return result


def _random_split(name: str, n: int, seq_len: int, labeled: bool, seed: int):
    import numpy as np

    from aemt.data.mmsa import Split

    rng = np.random.default_rng(seed)
    lengths = {m: rng.integers(seq_len // 2, seq_len + 1, n) for m in SIMS2_DIMS}
    feats = {m: rng.standard_normal((n, seq_len, d), dtype=np.float32) for m, d in SIMS2_DIMS.items()}
    labels = {k: (np.round(rng.uniform(-1, 1, n) * 5) / 5).astype(np.float32) for k in "MTAV"} if labeled else None
    return Split(name, feats, lengths, [f"{name}{i}" for i in range(n)], [""] * n, labels)


def bench_epochs(cfg: Config, n_pretrain: int = 10161, n_finetune: int = 2722, n_valid: int = 647,
                 epochs: int = 3, log: Callable[[str], None] = lambda m: None,
                 callbacks: Callable[[str], list[Any]] = lambda stage: [],
                 profiled_last: bool = False) -> list[dict[str, Any]]:
    """Wall time of whole training epochs (validation included) through the Lightning Trainer,
    at CH-SIMS v2 sizes: pre-training over ``n_pretrain`` clips, fine-tuning over ``n_finetune``.
    The first epoch (warm-up, compilation) is reported apart from the median of the others;
    ``log`` gets each epoch's time as it ends, and each stage's row. ``callbacks(name)`` gives
    more Lightning callbacks for the stage ``name`` (e.g. a profiler); ``profiled_last``: the last
    epoch runs under one, so it is left out of the median too (``epochs_s`` lists every epoch)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from aemt.training.common import build_trainer, quiet_lightning, stage_loaders
    from aemt.training.finetune import FinetuneModule
    from aemt.training.pretrain import PretrainModule

    quiet_lightning()

    class EpochTimer(Callback):
        def __init__(self, name: str) -> None:
            self.name, self.times = name, []

        def on_train_epoch_start(self, trainer, module) -> None:
            _sync(module.device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            _sync(module.device)
            self.times.append(time.perf_counter() - self.start)
            log(f"{self.name} epoch {len(self.times)}: {self.times[-1]:.2f} s")

    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, progress=False))
    rows = []
    for name, module, n, batch_size in (
        ("pretrain_epoch", PretrainModule(SIMS2_DIMS, cfg), n_pretrain, cfg.pretrain.batch_size),
        ("finetune_epoch", FinetuneModule(SIMS2_DIMS, cfg), n_finetune, cfg.finetune.batch_size),
    ):
        labeled = name == "finetune_epoch"
        train = _random_split("train", n, cfg.data.seq_len, labeled, 0)
        valid = _random_split("valid", n_valid if labeled else max(1, n // 10), cfg.data.seq_len, labeled, 1)
        timer = EpochTimer(name)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(cfg, Path(tmp), epochs, patience=epochs + 1, extra_callbacks=[timer, *callbacks(name)])
            L.seed_everything(0, verbose=False)
            trainer.fit(module, *stage_loaders(cfg, train, valid, batch_size))
        timed = timer.times[1:len(timer.times) - profiled_last] or timer.times
        rows.append({"name": name, "batch": batch_size, "clips": n, "first_epoch_s": round(timer.times[0], 3),
                     "epoch_s": round(statistics.median(timed), 3),
                     "last_epoch_s": round(timer.times[-1], 3),  # CUDA graphs record a last, smaller batch late
                     "epochs_s": [round(t, 3) for t in timer.times],
                     "clips_per_s": round(n / statistics.median(timed), 1)})
        log(f"{name}: {rows[-1]}")
    return rows
