"""Training-step throughput: MMSA 2.2.1's MulT vs aemt's plain MulT, same shapes, same process.

MMSA is not a dependency of aemt, so this script runs with a separate environment that has both
(nothing here downloads model weights; MulT with ``use_bert=False`` never touches BERT)::

    python3 -m venv /work/mmsa-venv
    /work/mmsa-venv/bin/pip install -q torch==2.13.0
    /work/mmsa-venv/bin/pip install -q --no-deps MMSA==2.2.1
    /work/mmsa-venv/bin/pip install -q numpy pandas tqdm scikit-learn easydict transformers nvidia-ml-py3
    /work/mmsa-venv/bin/pip install -q pyyaml lightning typer rich matplotlib
    echo /work/main/src > /work/mmsa-venv/lib/python3.11/site-packages/aemt-src.pth   # aemt importable

    /work/mmsa-venv/bin/python bench/compare_mmsa.py [--rounds 15] [--batch-sizes 16 64] [--input-stage aemt|mmsa] [--json]

Both models get MMSA's own CH-SIMS MulT hyper-parameters (read from the installed
``MMSA/config/config_regression.json``: width 50, 10 heads, 2 cross-modal levels, 3 memory
layers, conv kernels 5/1/1, its dropouts including the text-feature dropout, and its future
mask), CH-SIMS v2 feature widths 768/25/177 and every modality at length 50 (what aemt's loader
produces by pooling). aemt's MulT keeps its own input stage by default (the text conv padded, so
50 steps stay 50; sinusoidal positions added); ``--input-stage mmsa`` gives it MMSA's (unpadded:
46 text steps; no positions), with which it computes MMSA's function (``bench/mult_vs_mmsa.py``).
One training step is
``zero_grad → forward → MSE vs random targets → backward → Adam.step`` on random inputs, each
model with its own framework's optimiser (MMSA: ``torch.optim.Adam``; aemt: ``aemt.training.optim.adam``,
the same update with PyTorch's fused kernel).

After a warm-up, the two steps alternate (the order flips every round) so that load from other
processes hits both alike; the report gives the median ms/step, clips/s and the speed ratio
(aemt / MMSA), both from the medians and as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import aemt  # noqa: F401
except ImportError:  # run from a checkout without aemt installed in this environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DIMS = {"text": 768, "audio": 25, "vision": 177}


def mmsa_args(seq_len: int):
    """MMSA's config for MulT on SIMS, with CH-SIMS v2 dims and all lengths ``seq_len``."""
    from MMSA.config import get_config_regression

    args = get_config_regression("mult", "sims")  # commonParams + datasetParams.sims (EasyDict)
    args.update(
        feature_dims=(DIMS["text"], DIMS["audio"], DIMS["vision"]),
        seq_lens=(seq_len, seq_len, seq_len),
        need_data_aligned=False,
        need_model_aligned=False,
        use_bert=False,
        train_mode="regression",
        device=torch.device("cpu"),
    )
    return args


def build_mmsa(seq_len: int):
    from MMSA.models import AMIO

    args = mmsa_args(seq_len)
    return AMIO(args), args


def build_aemt(args, mmsa_input_stage: bool = True):
    """aemt's plain MulT (no pre-trained encoders: ``encoder_layers=0``) at MMSA's shape; with
    ``mmsa_input_stage`` also MMSA's unpadded text conv and no position embeddings (then it is
    MMSA's function, ``bench/mult_vs_mmsa.py``), else aemt's default input stage."""
    from aemt.config import ModelConfig
    from aemt.models import AEMT

    width, heads = args.dst_feature_dim_nheads
    cfg = ModelConfig(
        d_model=width, num_heads=heads, encoder_layers=0,
        cross_layers=args.nlevels, self_layers=3,  # MMSA's memory transformers have max(nlevels, 3) layers
        conv_kernels=(args.conv1d_kernel_size_l, args.conv1d_kernel_size_a, args.conv1d_kernel_size_v),
        dropout=args.res_dropout, ffn_dropout=args.relu_dropout, embed_dropout=args.embed_dropout,
        out_dropout=args.output_dropout, attn_dropout=args.attn_dropout,  # memory Transformers
        cross_attn_dropout=(args.attn_dropout, args.attn_dropout_a, args.attn_dropout_v),  # by target
        text_dropout=args.text_dropout, causal_attention=bool(args.attn_mask),
    )
    if mmsa_input_stage:  # MMSA's input stage: unpadded conv (text 50 -> 46 steps), no positions
        cfg = dataclasses.replace(cfg, conv_padding="valid", position_embeddings=False)
    return AEMT(dict(DIMS), cfg), cfg


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_steps(mmsa: nn.Module, aemt_model: nn.Module, batch: int, seq_len: int, lr: float, seed: int):
    """Two closures, each running one full training step on fixed random data."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(batch, seq_len, d, generator=g) for m, d in DIMS.items()}
    masks = {m: torch.ones(batch, seq_len, dtype=torch.bool) for m in DIMS}
    target = torch.randn(batch, generator=g)
    loss_fn = nn.MSELoss()
    from aemt.training.optim import adam

    opt_mmsa = torch.optim.Adam(mmsa.parameters(), lr=lr)  # what MMSA's MulT trainer uses
    opt_aemt = adam(aemt_model.parameters(), lr=lr)  # what aemt's trainer uses (fused where possible)
    mmsa.train()
    aemt_model.train()
    target_mmsa = target.view(-1, 1)

    def step_mmsa() -> torch.Tensor:
        opt_mmsa.zero_grad(set_to_none=True)
        out = mmsa(feats["text"], feats["audio"], feats["vision"])["M"]  # (B, 1)
        loss = loss_fn(out, target_mmsa)
        loss.backward()
        opt_mmsa.step()
        return loss

    def step_aemt() -> torch.Tensor:
        opt_aemt.zero_grad(set_to_none=True)
        out = aemt_model(feats, masks).prediction  # (B,)
        loss = loss_fn(out, target)
        loss.backward()
        opt_aemt.step()
        return loss

    return step_mmsa, step_aemt


def timed(step) -> float:
    t0 = time.perf_counter()
    step()  # CPU: every op has finished when the call returns
    return time.perf_counter() - t0


def bench_batch(mmsa, aemt_model, batch: int, seq_len: int, rounds: int, warmup: int, lr: float,
                seed: int) -> dict:
    step_mmsa, step_aemt = make_steps(mmsa, aemt_model, batch, seq_len, lr, seed)
    for _ in range(warmup):
        step_mmsa()
        step_aemt()
    t_mmsa, t_aemt = [], []
    for r in range(rounds):
        if r % 2 == 0:
            t_mmsa.append(timed(step_mmsa))
            t_aemt.append(timed(step_aemt))
        else:
            t_aemt.append(timed(step_aemt))
            t_mmsa.append(timed(step_mmsa))
    med_mmsa, med_aemt = statistics.median(t_mmsa), statistics.median(t_aemt)
    return {
        "batch": batch,
        "mmsa_ms": 1e3 * med_mmsa,
        "aemt_ms": 1e3 * med_aemt,
        "mmsa_clips_s": batch / med_mmsa,
        "aemt_clips_s": batch / med_aemt,
        "ratio": med_mmsa / med_aemt,  # aemt speed / MMSA speed
        "ratio_paired_median": statistics.median(m / a for m, a in zip(t_mmsa, t_aemt)),
        "mmsa_ms_min": 1e3 * min(t_mmsa),
        "aemt_ms_min": 1e3 * min(t_aemt),
        "mmsa_ms_all": [round(1e3 * t, 2) for t in t_mmsa],
        "aemt_ms_all": [round(1e3 * t, 2) for t in t_aemt],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="alternating timed rounds per batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--seq-len", type=int, default=50, help="length of every modality (pooled)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (aemt's trainer raises them, for both models here)")
    p.add_argument("--input-stage", choices=("aemt", "mmsa"), default="aemt",
                   help="aemt's MulT input stage (padded conv, positions) or MMSA's (unpadded conv: text 46 "
                        "steps; no positions: then MMSA's function exactly, see bench/mult_vs_mmsa.py)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)

    try:
        import MMSA  # noqa: F401
    except ImportError:
        print("MMSA is not installed in this environment; see the set-up in this script's docstring",
              file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.default_malloc:  # what aemt's trainer does; it applies to the whole process, MMSA too
        from aemt.training.allocator import keep_freed_memory

        keep_freed_memory()

    load_start = os.getloadavg()
    torch.manual_seed(a.seed)
    mmsa, args = build_mmsa(a.seq_len)
    torch.manual_seed(a.seed)
    aemt_model, cfg = build_aemt(args, mmsa_input_stage=a.input_stage == "mmsa")
    lr = float(args.learning_rate)

    results = [bench_batch(mmsa, aemt_model, b, a.seq_len, a.rounds, a.warmup, lr, a.seed + b)
               for b in a.batch_sizes]
    load_end = os.getloadavg()

    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": not a.default_malloc,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "input_stage": a.input_stage,
        "rounds": a.rounds,
        "warmup": a.warmup,
        "seq_len": a.seq_len,
        "dims": DIMS,
        "mmsa_params": n_params(mmsa),
        "aemt_params": n_params(aemt_model),
        "mmsa_config": {k: args[k] for k in (
            "dst_feature_dim_nheads", "nlevels", "conv1d_kernel_size_l", "conv1d_kernel_size_a",
            "conv1d_kernel_size_v", "attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout",
            "embed_dropout", "res_dropout", "output_dropout", "text_dropout", "attn_mask", "learning_rate")},
        "aemt_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "results": results,
    }
    if a.json:
        print(json.dumps(report))
        return 0

    print(f"torch {report['torch']}, {report['threads']} threads on {report['cpus']} CPUs, "
          f"glibc keeps freed memory: {report['keep_freed_memory']}; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"params: MMSA MulT {report['mmsa_params']:,}, aemt MulT {report['aemt_params']:,}; "
          f"aemt with {a.input_stage}'s input stage")
    print(f"inputs: (B, {a.seq_len}, D) with D = 768/25/177; {a.warmup} warm-up steps, "
          f"{a.rounds} alternating rounds; median of the rounds")
    print(f"{'batch':>5} | {'MMSA ms':>8} {'clips/s':>8} | {'aemt ms':>8} {'clips/s':>8} | "
          f"{'ratio':>5} {'paired':>6}")
    for r in results:
        print(f"{r['batch']:>5} | {r['mmsa_ms']:8.1f} {r['mmsa_clips_s']:8.1f} | {r['aemt_ms']:8.1f} "
              f"{r['aemt_clips_s']:8.1f} | {r['ratio']:5.2f} {r['ratio_paired_median']:6.2f}")
    print("ratio = aemt clips/s ÷ MMSA clips/s (from the medians); paired = median of per-round ratios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
