"""Weights saved by aemt before the grouped autoencoders, in today's layout.

Until then each modality had its own encoder (and decoder) module: ``encoders.<m>.*`` in AE-MT,
``autoencoders.<m>.encoder.*`` / ``autoencoders.<m>.decoder.*`` in the pre-training model. Now the
Transformer stacks are one grouped stack whose index g holds the weights of ``MODALITIES[g]``,
and the convolutions live under ``encoders.conv.<m>`` / ``decoders.conv.<m>`` (the LSTM kind keeps
``encoders.<m>.*``). The conversion is exact: a grouped weight is the per-modality ones stacked.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from aemt.models.common import MODALITIES

# old per-modality module paths -> today's parent ("{m}" is the modality)
_OLD_PATHS = (("autoencoders.{m}.encoder.", "encoders."), ("autoencoders.{m}.decoder.", "decoders."),
              ("encoders.{m}.", "encoders."), ("decoders.{m}.", "decoders."))


def split_at(key: str, path: str) -> tuple[str, str] | None:
    """``(prefix, rest)`` when the module ``path`` (e.g. ``"encoders."``) starts a segment of the
    state-dict ``key`` (after nothing or a prefix such as ``"model."``), else None."""
    prefix, found, rest = key.partition(path)
    return (prefix, rest) if found and rest and (not prefix or prefix.endswith(".")) else None


def _candidates(key: str) -> Iterator[tuple[str, str, str | None]]:
    """``(prefix, new key, modality to stack by or None)`` for an old per-modality ``key``."""
    for old, new in _OLD_PATHS:
        for m in MODALITIES:
            if parts := split_at(key, old.format(m=m)):
                prefix, rest = parts
                yield prefix, f"{new}{m}.{rest}", None  # kept per modality (LSTM kind)
                if rest.startswith("conv."):
                    yield prefix, f"{new}conv.{m}.{rest[len('conv.'):]}", None  # convolutions by modality
                yield prefix, new + rest, m  # a slice of a grouped weight
                return


def upgrade_state_dict(state: Mapping[str, Tensor], target_keys: Iterable[str]) -> dict[str, Tensor]:
    """``state`` with old per-modality keys renamed, or stacked over :data:`MODALITIES`, into the
    layout of ``target_keys`` (a model's state-dict keys; ``state``'s keys may carry a prefix such
    as Lightning's ``model.``). Keys in today's layout, and keys it cannot map, pass unchanged."""
    target = set(target_keys)
    out: dict[str, Tensor] = {}
    stacks: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for prefix, new_key, modality in _candidates(key):
            if new_key in target:
                if modality is None:
                    out[prefix + new_key] = value
                else:
                    stacks.setdefault(prefix + new_key, {})[modality] = value
                break
        else:
            out[key] = value
    for key, parts in stacks.items():
        if len(parts) == len(MODALITIES):  # else missing, for load_state_dict to report
            out[key] = torch.stack([parts[m] for m in MODALITIES])
    return out
