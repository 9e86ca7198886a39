"""Does aemt's plain MulT compute the same function as MMSA 2.2.1's MulT, given the same weights?

Both are built at MMSA's CH-SIMS MulT config (``compare_mmsa.build_mmsa`` / ``build_aemt``);
MMSA's biases and LayerNorms (0/1 at init, which would hide mapping errors) are jittered, and every
MMSA parameter is copied into aemt by an explicit name map: grouped ``weight[g]`` is one plain layer;
MMSA's one cross-block LayerNorm goes into ``norm_q`` and ``norm_kv``; aemt's Z_v is [a→v; t→v]
where MMSA's is [t→v; a→v], so the vision memory Transformer and the head get their residual-stream
channels permuted. Every element of both sides must be covered exactly once, shapes equal, or it stops.

aemt is built with MMSA's input stage (``model.conv_padding: valid``: the text conv is not padded,
so its 50 steps become 46; ``model.position_embeddings: false``: MMSA 2.2.1's MulT adds none). In
eval mode on random inputs (all frames valid) it compares MMSA's ``'M'`` with aemt's
``.prediction`` and the gradients of every parameter after ``sum(outputs).backward()`` (per group).
Exit 0 when they agree (rtol 1e-4, atol 1e-5), else 1::

    /work/mmsa-venv/bin/python bench/mult_vs_mmsa.py [--json] [--seed 0] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_mmsa as cm  # noqa: E402  (also puts src/ on the path when aemt is not installed)
from aemt.models.common import MODALITIES  # noqa: E402
from aemt.models.fusion import PAIRS  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
LETTER = {"text": "l", "audio": "a", "vision": "v"}
CONV = {f"proj_{LETTER[m]}": m for m in MODALITIES}
CROSS = [f"trans_{LETTER[j]}_with_{LETTER[i]}" for i, j in PAIRS]  # aemt's group g is MMSA's CROSS[g]
MEMORY = [f"trans_{LETTER[m]}_mem" for m in MODALITIES]
# MMSA's Z_m source order (MULT.py:112,121,130); aemt's is that of PAIRS
MMSA_SOURCES = {"text": ("audio", "vision"), "audio": ("text", "vision"), "vision": ("text", "audio")}
AXIS1 = ("in_proj_weight", "fc1.weight", "proj1.weight", "out_layer.weight")  # residual stream = input dim
AXIS0 = ("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias", "proj2.weight", "proj2.bias")
ALL = slice(None)
Target = tuple[str, "int | None", slice]  # aemt name, group, rows of the (permuted) MMSA tensor
Entry = tuple[str, "Tensor | None", list[Target]]  # MMSA name, channel permutation, targets


def permuted(t: Tensor, name: str, perm: Tensor | None, inverse: bool = False) -> Tensor:
    """MMSA layout -> aemt layout (``aemt[c] = mmsa[perm[c]]`` on the residual-stream axis), or back."""
    axis = 1 if name.endswith(AXIS1) else 0 if name.endswith(AXIS0) or ".layer_norm" in name else None
    return t if perm is None or axis is None else t.index_select(axis, perm.argsort() if inverse else perm)


def memory_perms(d: int) -> list[Tensor]:
    """Per modality: aemt's Z_m channel c is MMSA's channel perm[c] (sources concatenated in other orders)."""
    return [torch.cat([torch.arange(d) + d * MMSA_SOURCES[m].index(i) for i, j in PAIRS if j == m]) for m in MODALITIES]


def block_entries(mm: str, aa: str, g: int, layers: int, d: int, perm: Tensor | None, cross: bool) -> list[Entry]:
    out: list[Entry] = []
    for i in range(layers):
        m, a = f"Model.{mm}.layers.{i}.", f"{aa}.blocks.{i}."
        for k in ("weight", "bias"):
            proj = ([(f"{a}attn.q.{k}", g, slice(0, d)), (f"{a}attn.kv.{k}", g, slice(d, 3 * d))] if cross
                    else [(f"{a}attn.qkv.{k}", g, ALL)])
            norm0 = [(f"{a}{n}.{k}", g, ALL) for n in (("norm_q", "norm_kv") if cross else ("norm_attn",))]
            out += [(f"{m}self_attn.in_proj_{k}", perm, proj), (f"{m}layer_norms.0.{k}", perm, norm0),
                    (f"{m}self_attn.out_proj.{k}", perm, [(f"{a}attn.out.{k}", g, ALL)]),
                    (f"{m}fc1.{k}", perm, [(f"{a}ffn.fc1.{k}", g, ALL)]),
                    (f"{m}fc2.{k}", perm, [(f"{a}ffn.fc2.{k}", g, ALL)]),
                    (f"{m}layer_norms.1.{k}", perm, [(f"{a}norm_ff.{k}", g, ALL)])]
    return out + [(f"Model.{mm}.layer_norm.{k}", perm, [(f"{aa}.norm.{k}", g, ALL)]) for k in ("weight", "bias")]


def build_entries(d: int, cross_layers: int, mem_layers: int) -> list[Entry]:
    perms = memory_perms(d)
    entries: list[Entry] = [(f"Model.{c}.weight", None, [(f"encoders.conv.{m}.conv.weight", None, ALL)])
                            for c, m in CONV.items()]
    for g, name in enumerate(CROSS):
        entries += block_entries(name, "fusion.cross", g, cross_layers, d, None, cross=True)
    for g, name in enumerate(MEMORY):
        entries += block_entries(name, "fusion.memory", g, mem_layers, 2 * d, perms[g], cross=False)
    head = torch.cat([p + 2 * d * g for g, p in enumerate(perms)])
    for mm, aa in (("proj1", "proj1"), ("proj2", "proj2"), ("out_layer", "out")):
        entries += [(f"Model.{mm}.{k}", head, [(f"head.{aa}.{k}", None, ALL)]) for k in ("weight", "bias")]
    return entries


@torch.no_grad()
def copy_weights(mmsa: nn.Module, ours: nn.Module, entries: list[Entry]) -> None:
    mp, ap = dict(mmsa.named_parameters()), dict(ours.named_parameters())
    covered = {n: torch.zeros(p.shape, dtype=torch.int) for n, p in ap.items()}
    errors = [f"MMSA parameter not mapped: {n}" for n in sorted(set(mp) - {e[0] for e in entries})]
    for name, perm, targets in entries:
        missing = ([f"MMSA {name}"] if name not in mp else []) + [f"aemt {t}" for t, _, _ in targets if t not in ap]
        if missing:
            errors += [f"mapped name does not exist: {n}" for n in missing]
            continue
        src = permuted(mp[name].detach(), name, perm)
        for tname, g, rows in targets:
            dst, cov = (ap[tname], covered[tname]) if g is None else (ap[tname][g], covered[tname][g])
            if dst.shape != src[rows].shape:
                errors.append(f"shape: {name}[{rows}] {tuple(src[rows].shape)} vs {tname}[{g}] {tuple(dst.shape)}")
            else:
                dst.copy_(src[rows])
                cov += 1
    errors += [f"aemt parameter not covered exactly once: {n}" for n, c in covered.items() if not bool((c == 1).all())]
    if errors:
        raise SystemExit("weight mapping failed:\n  " + "\n  ".join(errors))


def diff(m: Tensor, a: Tensor) -> dict:
    return {"max_abs_diff": float((m - a).abs().max()), "max_abs_mmsa": float(m.abs().max()),
            "close": bool(torch.allclose(a, m, rtol=RTOL, atol=ATOL))}


def grad_report(mmsa: nn.Module, ours: nn.Module, entries: list[Entry]) -> dict[str, dict]:
    """Per group of MMSA parameters: aemt's gradients brought into MMSA's layout vs MMSA's own."""
    mp, ap, groups = dict(mmsa.named_parameters()), dict(ours.named_parameters()), {}
    for name, perm, targets in entries:
        acc = torch.zeros_like(permuted(mp[name].grad, name, perm))
        for tname, g, rows in targets:  # a shared LayerNorm's gradient is the sum of its two copies'
            acc[rows] += ap[tname].grad if g is None else ap[tname].grad[g]
        r = diff(mp[name].grad, permuted(acc, name, perm, inverse=True))
        key = name.split(".")[1]
        key = "conv" if key in CONV else "head" if key in ("proj1", "proj2", "out_layer") else key
        s = groups.setdefault(key, {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "close": True})
        s["max_abs_diff"] = max(s["max_abs_diff"], r["max_abs_diff"])
        s["max_rel_diff"] = max(s["max_rel_diff"], r["max_abs_diff"] / max(r["max_abs_mmsa"], 1e-30))
        s["close"] &= r["close"]
    return groups


def compare(mmsa: nn.Module, ours: nn.Module, entries: list[Entry], feats: dict, masks: dict) -> dict:
    mmsa.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    ym = mmsa(feats["text"], feats["audio"], feats["vision"])["M"].squeeze(-1)
    ya = ours(feats, masks).prediction
    ym.sum().backward(), ya.sum().backward()
    grads, pred = grad_report(mmsa, ours, entries), diff(ym.detach(), ya.detach())
    return {"prediction": pred, "grads": grads, "close": pred["close"] and all(g["close"] for g in grads.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--seed", 0), ("--batch", 4), ("--seq-len", 50)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    mmsa, args = cm.build_mmsa(a.seq_len)
    torch.manual_seed(a.seed)
    ours, cfg = cm.build_aemt(args)
    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():  # biases (0) and LayerNorms (1, 0)
        [prm.add_(0.1 * torch.randn(prm.shape, generator=gen)) for prm in mmsa.parameters() if prm.dim() == 1]
    entries = build_entries(cfg.d_model, cfg.cross_layers, cfg.self_layers)
    copy_weights(mmsa, ours, entries)
    mmsa.eval(), ours.eval()
    feats = {m: torch.randn(a.batch, a.seq_len, dim, generator=gen) for m, dim in cm.DIMS.items()}
    masks = {m: torch.ones(a.batch, a.seq_len, dtype=torch.bool) for m in cm.DIMS}
    result = compare(mmsa, ours, entries, feats, masks)
    report = {"params": {"mmsa": cm.n_params(mmsa), "aemt": cm.n_params(ours)}, "mapped": len(entries),
              "rtol": RTOL, "atol": ATOL, **result}
    print(json.dumps(report) if a.json else "\n".join(text_report(report)))
    return 0 if result["close"] else 1


def text_report(report: dict) -> Iterator[str]:
    yield (f"params MMSA {report['params']['mmsa']:,}, aemt {report['params']['aemt']:,}; "
           f"{report['mapped']} MMSA tensors mapped, every aemt element covered once")
    pr = report["prediction"]
    yield (f"{'AGREE' if report['close'] else 'DIFFER'}: prediction max|diff| {pr['max_abs_diff']:.3e} "
           f"(max|y| {pr['max_abs_mmsa']:.3e})")
    yield from (f"  grad {g:<16} max abs {s['max_abs_diff']:.2e}  max rel {s['max_rel_diff']:.2e}  "
                f"{'ok' if s['close'] else 'DIFFER'}" for g, s in report["grads"].items())


if __name__ == "__main__":
    sys.exit(main())
