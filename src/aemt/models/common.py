"""Small pieces shared by the models: modality names, masked convolution and pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from aemt.models.layers import subset_of_groups, take_steps

if TYPE_CHECKING:
    from aemt.config import ModelConfig

MODALITIES: tuple[str, str, str] = ("text", "audio", "vision")


class MaskedConv1d(nn.Module):
    """Temporal ``Conv1d`` on (B, L, C_in) -> (B, L, C_out) (eq. 1 and eq. 4): 'same' padding, or
    ``padding="valid"`` (none, as MMSA's MulT: (B, L - kernel + 1, C_out), see :meth:`output_mask`).

    Padded frames are zeroed before the convolution, so a kernel > 1 cannot carry values of
    padded frames into valid ones. A kernel of 1 runs as a linear layer (same parameters).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, bias: bool = False, padding: str = "same") -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"conv kernel must be odd and >= 1, got {kernel}")
        if padding not in ("same", "valid"):
            raise ValueError(f"conv padding must be 'same' or 'valid', got {padding!r}")
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, padding=kernel // 2 if padding == "same" else 0, bias=bias)

    def output_mask(self, mask: Tensor) -> Tensor:
        """The valid steps (B, L_out) of the output for valid input frames ``mask`` (B, L): the
        same with 'same' padding; without padding, the steps whose window holds only valid frames
        (for prefix masks), and always the first (a clip shorter than the kernel keeps one step)."""
        shift = self.conv.kernel_size[0] - 1 - 2 * self.conv.padding[0]  # steps the output is shorter by
        if shift == 0:
            return mask
        out = mask[..., shift:].clone()
        out[..., 0] = True
        return out

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x * mask.unsqueeze(-1).to(x.dtype)
        if self.conv.kernel_size[0] == 1:
            return F.linear(x, self.conv.weight.squeeze(-1), self.conv.bias)
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (..., L, d) with the steps where ``mask`` (..., L) is False set to zero."""
    return x * mask.unsqueeze(-1).to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, L, d) over the valid steps of ``mask`` (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid step of ``mask`` (..., L) -> (...,) long (0 when none is valid)."""
    L = mask.shape[-1]
    return L - 1 - mask.flip(-1).to(torch.uint8).argmax(dim=-1)


def last_valid(x: Tensor, mask: Tensor) -> Tensor:
    """The last valid step of ``x`` (..., L, d) under ``mask`` (..., L) -> (..., d)."""
    return take_steps(x, last_valid_index(mask)).squeeze(-2)


def run_grouped(stack: nn.Module, inputs: Sequence[Sequence[Tensor]],
                keywords: Sequence[dict[str, Tensor]] | None = None,
                options: dict[str, Sequence] | None = None) -> list[Tensor]:
    """Run a grouped module on per-group arguments; returns one output per group.

    ``inputs[g]`` (and ``keywords[g]``, keyword arguments) are the arguments of group g without
    the group dim. Groups whose arguments have equal shapes are stacked and run together, using
    the rows of the stacked parameters that belong to them (one call when every shape matches).
    ``options``: keyword arguments that are not tensors, each a sequence with one entry per group;
    a call gets a tuple of the entries of its groups.
    """
    keywords = keywords or [{} for _ in inputs]
    names = sorted(keywords[0])  # every group has the same keyword arguments
    # shapes compared with ==, not hashed as dict keys: under torch.compile hashing a symbolic
    # batch size would specialise the graph to it (one recompilation per batch size)
    buckets: list[tuple[tuple, list[int]]] = []
    for g in range(len(inputs)):
        key = tuple(a.shape for a in inputs[g]) + tuple(keywords[g][k].shape for k in names)
        same = next((groups for shape, groups in buckets if shape == key), None)
        if same is None:
            buckets.append((key, [g]))
        else:
            same.append(g)
    outputs: list[Tensor] = [None] * len(inputs)  # type: ignore[list-item]
    for _, groups in buckets:
        args = tuple(torch.stack([inputs[g][i] for g in groups]) for i in range(len(inputs[groups[0]])))
        kw = {k: torch.stack([keywords[g][k] for g in groups]) for k in names}
        kw.update({k: tuple(values[g] for g in groups) for k, values in (options or {}).items()})
        if len(groups) == len(inputs):
            y = stack(*args, **kw)
        else:  # a subset of the groups: the same parameters, indexed
            params = {name: p[groups] for name, p in stack.named_parameters()}
            with subset_of_groups(stack, groups):
                y = functional_call(stack, params, args, kw)
        for g, y_g in zip(groups, y.unbind(0)):
            outputs[g] = y_g
    return outputs


def block_kwargs(cfg: ModelConfig, d: int | None = None,
                 attn_dropout: float | Sequence[float] | None = None) -> dict:
    """Keyword arguments of a Transformer block of width ``d`` (default ``cfg.d_model``);
    ``attn_dropout`` overrides ``cfg.attn_dropout`` (one rate, or one per group)."""
    return dict(d=d or cfg.d_model, heads=cfg.num_heads, dropout=cfg.dropout, ffn_dropout=cfg.rate("ffn"),
                attn_dropout=cfg.attn_dropout if attn_dropout is None else attn_dropout,
                backend=cfg.attention_backend)


def modality_kernels(cfg: ModelConfig) -> dict[str, int]:
    """``cfg.conv_kernels`` (text, audio, vision order) as a dict keyed by modality."""
    return {m: int(k) for m, k in zip(MODALITIES, cfg.conv_kernels)}


def check_dims(dims: dict[str, int]) -> dict[str, int]:
    """Validate that ``dims`` gives a positive feature width for every modality."""
    missing = [m for m in MODALITIES if m not in dims]
    if missing:
        raise ValueError(f"feature dims missing for {missing}; expected keys {MODALITIES}")
    return {m: int(dims[m]) for m in MODALITIES}
