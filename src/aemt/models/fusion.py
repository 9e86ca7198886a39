"""MulT cross-modal fusion (paper §3.3.1, eq. 11–14), with the six pair stacks run as one batch.

Z_{i→j} is a stack of ``cfg.cross_layers`` cross-modal blocks in which the *target* modality j
provides the queries and the source i the keys and values. The paper's text under eq. 11 names
the query i; we follow MulT (and the paper's own naming Z_t = [Z_{a→t}; Z_{v→t}]): the target is
the query, so Z_{i→j} has the length of modality j.

Speed: the six stacks share one set of *grouped* weights (leading dim 6) and run as one
computation on stacked inputs (6, B, L, d) when all modalities have the same length (the usual
case after pooling). Lengths that differ a little (MMSA's unpadded text convolution: 46 text
steps beside 50) are padded to the longest, with the padded steps masked as keys and the future
mask keeping each pair's offset of its true lengths. Lengths that differ more are not padded: the
pairs are bucketed by shape and each bucket runs with its slice of the same stacked weights. All
paths compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.models.common import MODALITIES, block_kwargs, last_valid_index, run_grouped
from aemt.models.layers import CrossBlock, Dropout, EncoderBlock, TransformerStack, embed_positions

# (source i, target j) of Z_{i→j}, ordered so that consecutive pairs form Z_t, Z_a, Z_v (eq. 12–14)
PAIRS: tuple[tuple[str, str], ...] = (
    ("audio", "text"), ("vision", "text"),  # eq. 12: Z_t = [Z_{a→t}; Z_{v→t}]
    ("text", "audio"), ("vision", "audio"),  # eq. 13: Z_a = [Z_{t→a}; Z_{v→a}]
    ("audio", "vision"), ("text", "vision"),  # eq. 14: Z_v = [Z_{a→v}; Z_{t→v}]
)

# Pad the modalities to one length (one batched computation, not one per shape) when the longest
# is at most this many times the shortest: the padded steps cost less than the extra calls.
PAD_TO_ONE_LENGTH_RATIO = 1.25


class CrossModalFusion(nn.Module):
    """Six cross-modal Transformers, three self-attention Transformers, last valid steps → Z (B, 6d).

    ``forward(hidden, masks)`` takes H_m (B, L_m, d) and masks (B, L_m) keyed by modality.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, n_pairs, n_mod = cfg.d_model, len(PAIRS), len(MODALITIES)
        by_target = dict(zip(MODALITIES, cfg.cross_attn_rates()))  # MulT: attn_dropout{,_a,_v}
        rates = tuple(by_target[j] for _, j in PAIRS)
        causal = cfg.causal_attention  # MulT's attn_mask
        self.cross = TransformerStack(lambda: CrossBlock(**block_kwargs(cfg, attn_dropout=rates), groups=n_pairs,
                                                         causal=causal), cfg.cross_layers, d, groups=n_pairs)
        self.drop = Dropout(cfg.rate("embed"))
        # MulT's "memory" Transformers over Z_m, width 2d
        self.memory = TransformerStack(lambda: EncoderBlock(**block_kwargs(cfg, 2 * d), groups=n_mod, causal=causal),
                                       cfg.self_layers, 2 * d, groups=n_mod)
        self.out_dim = 2 * d * n_mod
        self.positions, self.causal = cfg.position_embeddings, causal

    def forward(self, hidden: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
        steps = {m: hidden[m].shape[-2] for m in MODALITIES}
        # MulT's future mask: Z_{i→j}'s offset is |L_i - L_j| of the true lengths, also once padded
        options = {"future_offsets": [abs(steps[i] - steps[j]) for i, j in PAIRS]} if self.causal else None
        longest = max(steps.values())
        if longest != min(steps.values()) and longest <= PAD_TO_ONE_LENGTH_RATIO * min(steps.values()):
            hidden = {m: F.pad(h, (0, 0, 0, longest - h.shape[-2])) for m, h in hidden.items()}
            masks = {m: F.pad(v, (0, longest - v.shape[-1]), value=False) for m, v in masks.items()}
        # eq. 11: Z_{i→j} = CrossmodalTransformer(query H_j, key/value H_i)
        z = run_grouped(self.cross, [(hidden[j], hidden[i], masks[i]) for i, j in PAIRS], options=options)
        z_m = [torch.cat(z[2 * k: 2 * k + 2], dim=-1) for k in range(len(MODALITIES))]  # eq. 12–14
        # MulT: each Transformer re-embeds its input (scale by sqrt(2d), add positions, dropout)
        # Only the last *valid* step of each is used, so the last layer computes just that step
        last = [{"query_index": last_valid_index(masks[m])} for m in MODALITIES]
        stream = self.memory.norm.weight.dtype  # float32 under autocast, see embed_positions
        inputs = [(self.drop(embed_positions(z, stream, self.positions)), masks[m]) for z, m in zip(z_m, MODALITIES)]
        h = run_grouped(self.memory, inputs, last)
        return torch.cat([h_m.squeeze(-2) for h_m in h], dim=-1)  # Z = [Z_t; Z_a; Z_v] (B, 6d)
