"""The table of value checks behind :meth:`aemt.config.Config.validate`.

Each check is ``(key, value, ok, expected)``; the first one that is not ``ok`` becomes the
message ``config key '<key>': expected <expected>, got <value>``. The allowed sets are here too,
so that a bad value stops at load time instead of deep in Lightning, torch or numpy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from aemt.config import Config

SECTIONS = ("data", "model", "pretrain", "finetune", "trainer")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
COMPILE_BACKENDS = ("inductor", "cudagraphs")
DEVICE_RESIDENT = ("auto", "always", "never")  # data.device_resident: keep the splits in GPU memory?
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning 2.x's precision strings (its _PRECISION_INPUT, less transformer-engine) and "auto" (ours)
PRECISIONS = ("auto", "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64", "32", "16", "bf16")
MAX_QUERIES = 1024  # longest sequence the learned decoder queries cover (aemt.models.autoencoder)
SEED_MAX = 2**32 - 1  # numpy's seeds (and Lightning's seed_everything) are in [0, 2**32 - 1]


class Problem(NamedTuple):
    """The first failed check: its key and the whole message."""

    key: str
    message: str


def _one_of(values: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(v) for v in values)


def _finite(cfg: Config) -> list[tuple[str, Any, bool, str]]:
    """Every float (or tuple of floats) must be finite: inf and nan pass range checks like ``> 0``."""
    checks = []
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            finite = all(math.isfinite(v) for v in numbers if isinstance(v, float))
            checks.append((f"{name}.{f.name}", value, finite, "a finite number"))
    return checks


def _checks(cfg: Config) -> list[tuple[str, Any, bool, str]]:
    d, m, t = cfg.data, cfg.model, cfg.trainer
    checks = [
        *_finite(cfg),
        ("data.seq_len", d.seq_len, d.seq_len >= 1, ">= 1"),
        ("data.text_input", d.text_input, d.text_input in ("sequence", "cls"), "'sequence' or 'cls'"),
        ("data.metrics", d.metrics, d.metrics in ("sims", "mosei"), "'sims' or 'mosei'"),
        ("data.device_resident", d.device_resident, d.device_resident in DEVICE_RESIDENT,
         "'auto', 'always' or 'never'"),
        ("model.d_model", m.d_model, m.d_model >= 1, ">= 1"),
        ("model.num_heads", m.num_heads, m.num_heads >= 1 and m.d_model % m.num_heads == 0,
         f"a divisor of model.d_model={m.d_model}"),
        # 0 layers: encoders are MulT's input stage (conv + positions), no cross-modal / memory blocks
        *((f"model.{name}_layers", getattr(m, f"{name}_layers"), getattr(m, f"{name}_layers") >= 0, ">= 0")
          for name in ("encoder", "decoder", "cross", "self")),
        ("model.decoder_layers", m.decoder_layers,
         m.decoder_layers >= 1 or m.autoencoder != "transformer" or m.decoder_input != "queries",
         ">= 1 with model.autoencoder 'transformer' and model.decoder_input 'queries' (with 0 layers the "
         "reconstruction would come from the learned queries alone, never from the encoders' output)"),
        ("model.autoencoder", m.autoencoder, m.autoencoder in ("transformer", "lstm"), "'transformer' or 'lstm'"),
        ("model.decoder_input", m.decoder_input, m.decoder_input in ("queries", "memory"), "'queries' or 'memory'"),
        ("model.attention_backend", m.attention_backend, m.attention_backend in ("auto", "sdpa", "math"),
         "'auto', 'sdpa' or 'math'"),
        ("model.conv_kernels", m.conv_kernels,
         len(m.conv_kernels) == 3 and all(k >= 1 and k % 2 == 1 for k in m.conv_kernels), "three odd kernel sizes >= 1"),
        ("model.conv_padding", m.conv_padding, m.conv_padding in ("same", "valid"), "'same' or 'valid'"),
        ("model.conv_padding", m.conv_padding, m.conv_padding == "same" or (
            cfg.finetune.pretrained == "none" and m.autoencoder == "transformer" and d.text_input == "sequence"
            and d.seq_len >= max(m.conv_kernels)),
         "'same', or 'valid' (MMSA's MulT) only for the MulT baseline: finetune.pretrained 'none' (the "
         "autoencoders reconstruct every frame), model.autoencoder 'transformer', data.text_input "
         f"'sequence' and data.seq_len >= the largest kernel ({max(m.conv_kernels)})"),
        ("model.dropout", m.dropout, 0 <= m.dropout < 1, "in [0, 1)"),
        ("model.attn_dropout", m.attn_dropout, 0 <= m.attn_dropout < 1, "in [0, 1)"),
        ("model.text_dropout", m.text_dropout, 0 <= m.text_dropout < 1, "in [0, 1)"),
        *((f"model.{name}_dropout", getattr(m, f"{name}_dropout"), 0 <= m.rate(name) < 1, "in [0, 1) or null")
          for name in ("ffn", "embed", "out")),
        ("model.cross_attn_dropout", m.cross_attn_dropout, all(0 <= p < 1 for p in m.cross_attn_rates()),
         "three rates in [0, 1) or null"),
        ("data.seq_len", d.seq_len, d.seq_len <= MAX_QUERIES or m.decoder_input != "queries",
         f"<= {MAX_QUERIES} with model.decoder_input 'queries' (the learned decoder queries)"),
        ("pretrain.valid_fraction", cfg.pretrain.valid_fraction, 0 < cfg.pretrain.valid_fraction < 0.5, "in (0, 0.5)"),
        ("pretrain.lambda1", cfg.pretrain.lambda1, cfg.pretrain.lambda1 >= 0, ">= 0"),
        ("pretrain.p_tamper", cfg.pretrain.p_tamper, 0 <= cfg.pretrain.p_tamper <= 1, "in [0, 1]"),
        ("finetune.lambda2", cfg.finetune.lambda2, cfg.finetune.lambda2 >= 0, ">= 0"),
        ("finetune.tau", cfg.finetune.tau, cfg.finetune.tau > 0, "> 0"),
        ("finetune.neutral_band", cfg.finetune.neutral_band, cfg.finetune.neutral_band >= 0, ">= 0"),
        ("finetune.sp_dropout", cfg.finetune.sp_dropout, 0 <= cfg.finetune.sp_dropout < 1, "in [0, 1)"),
        ("trainer.seed", t.seed, 0 <= t.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (2**32 - 1, numpy's seeds)"),
        ("trainer.accelerator", t.accelerator, t.accelerator in ACCELERATORS, _one_of(ACCELERATORS)),
        ("trainer.devices", t.devices, t.devices >= 1, ">= 1"),
        ("trainer.num_nodes", t.num_nodes, t.num_nodes >= 1, ">= 1"),
        ("trainer.precision", t.precision, t.precision in PRECISIONS, _one_of(PRECISIONS)),
        ("trainer.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("trainer.lr_patience", t.lr_patience, t.lr_patience >= 0, ">= 0"),
        ("trainer.lr_factor", t.lr_factor, 0 < t.lr_factor < 1, "in (0, 1)"),
        ("trainer.compile_mode", t.compile_mode, t.compile_mode in COMPILE_MODES, _one_of(COMPILE_MODES)),
        ("trainer.compile_scope", t.compile_scope, t.compile_scope in ("model", "blocks"), "'model' or 'blocks'"),
        ("trainer.compile_backend", t.compile_backend, t.compile_backend in COMPILE_BACKENDS,
         f"one of {COMPILE_BACKENDS}"),
        ("trainer.compile_mode", t.compile_mode, t.compile_backend == "inductor" or t.compile_mode == "default",
         "'default' with trainer.compile_backend 'cudagraphs' (modes are inductor's)"),
        ("trainer.compile_scope", t.compile_scope, t.compile_scope == "model" or not t.uses_cuda_graphs(),
         f"'model' with CUDA graphs (trainer.compile_mode '{t.compile_mode}', compile_backend "
         f"'{t.compile_backend}'): CUDA graphs of blocks compiled apart break outside a backward, "
         "pytorch/pytorch#152887"),
    ]
    for stage in ("pretrain", "finetune"):
        sec = getattr(cfg, stage)
        checks += [
            (f"{stage}.epochs", sec.epochs, sec.epochs >= 1, ">= 1"),
            (f"{stage}.batch_size", sec.batch_size, sec.batch_size >= 2, ">= 2"),
            (f"{stage}.lr", sec.lr, sec.lr > 0, "> 0"),
            (f"{stage}.weight_decay", sec.weight_decay, sec.weight_decay >= 0, ">= 0"),
            (f"{stage}.patience", sec.patience, sec.patience >= 0, ">= 0"),
        ]
    return checks


def first_problem(cfg: Config) -> Problem | None:
    """The first value of ``cfg`` outside its allowed set or range, or None."""
    for key, value, ok, expected in _checks(cfg):
        if not ok:
            return Problem(key, f"config key '{key}': expected {expected}, got {value!r}")
    return None
