"""MulT cross-modal fusion (paper §3.3.1, eq. 11–14), with the six pair stacks run as one batch.

Z_{i→j} is a stack of ``cfg.cross_layers`` cross-modal blocks in which the *target* modality j
provides the queries and the source i the keys and values. The paper's text under eq. 11 names
the query i; we follow MulT (and the paper's own naming Z_t = [Z_{a→t}; Z_{v→t}]): the target is
the query, so Z_{i→j} has the length of modality j.

Speed: the six stacks share one set of *grouped* weights (leading dim 6) and run as one
computation on stacked inputs (6, B, L, d) when all modalities have the same length (the usual
case after pooling). When lengths differ, the pairs are bucketed by shape and each bucket runs
with its slice of the same stacked weights, so both paths compute the same function.
"""

from __future__ import annotations

import torch
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
        self.positions = cfg.position_embeddings

    def forward(self, hidden: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
        # eq. 11: Z_{i→j} = CrossmodalTransformer(query H_j, key/value H_i)
        z = run_grouped(self.cross, [(hidden[j], hidden[i], masks[i]) for i, j in PAIRS])
        z_m = [torch.cat(z[2 * k: 2 * k + 2], dim=-1) for k in range(len(MODALITIES))]  # eq. 12–14
        # MulT: each Transformer re-embeds its input (scale by sqrt(2d), add positions, dropout)
        # Only the last *valid* step of each is used, so the last layer computes just that step
        last = [{"query_index": last_valid_index(masks[m])} for m in MODALITIES]
        stream = self.memory.norm.weight.dtype  # float32 under autocast, see embed_positions
        inputs = [(self.drop(embed_positions(z, stream, self.positions)), masks[m]) for z, m in zip(z_m, MODALITIES)]
        h = run_grouped(self.memory, inputs, last)
        return torch.cat([h_m.squeeze(-2) for h_m in h], dim=-1)  # Z = [Z_t; Z_a; Z_v] (B, 6d)
