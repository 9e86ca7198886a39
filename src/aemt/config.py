"""Run configuration: nested dataclasses that map 1:1 onto the YAML presets.

A config has five sections (``data``, ``model``, ``pretrain``, ``finetune``, ``trainer``).
``load_config`` takes a preset name shipped in ``aemt/configs`` (``sims2``, ``mosei``, ``mosi``,
``synthetic``) or a path to a YAML file, and applies dotted overrides such as
``{"finetune.lambda2": 0}``. Unknown keys, ill-typed values (no rounding, no truthiness) and
values out of range (:mod:`aemt.config_checks`) raise one :class:`ConfigError` naming the file or
override, the key, the expected and the actual value.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from aemt.config_checks import CUDA_GRAPH_MODES, SECTIONS, first_problem
from aemt.errors import ConfigError

PRESETS = ("sims2", "mosei", "mosi", "synthetic")
_PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """How MMSA-layout files become model inputs (paper §4.2.1)."""

    seq_len: int = 50  # every modality is average-pooled over its valid frames to this length
    text_input: str = "sequence"  # "sequence": all BERT tokens; "cls": position 0 only (paper §3.2.1)
    standardize: bool = True  # per-feature z-score with train-split statistics
    metrics: str = "sims"  # "sims" (SIMS, SIMS v2) or "mosei" (MOSI, MOSEI)
    # pooled-array cache; None: $AEMT_CACHE_DIR or ~/.cache/aemt; "off" (YAML's bare `off` is false)
    cache_dir: str | None = field(default=None, metadata={"like": "off", "if_false": "off"})
    # training on a GPU, keep the splits in GPU memory: "auto" (if a split takes <= 1/4 of the free
    # memory), "always" or "never" (batches are then cut on the host and copied every step)
    device_resident: str = "auto"


@dataclass
class ModelConfig:
    """Architecture of the autoencoders (pre-training) and AE-MT (fine-tuning)."""

    d_model: int = 50  # shared width d of eq. 1
    num_heads: int = 10
    encoder_layers: int = 3  # E_m, Table 2
    decoder_layers: int = 3  # D_m, Table 2
    cross_layers: int = 4  # cross-modal transformers Z_{i->j}, Table 2
    self_layers: int = 3  # self-attention transformer over Z_m (MulT's "memory" transformer)
    conv_kernels: tuple[int, int, int] = (5, 1, 1)  # k_t, k_a, k_v of eq. 1 and 4
    autoencoder: str = "transformer"  # "transformer" or "lstm" (the paper's w/o TR ablation)
    decoder_input: str = "queries"  # "queries": learned positional queries attend to H_m
    dropout: float = 0.1  # residual dropout (MulT's res_dropout); the default of the three below
    attn_dropout: float = 0.1  # dropout on attention weights (MulT's attn_dropout)
    # MulT's finer dropouts; None: the value of `dropout` (resp. `attn_dropout`)
    ffn_dropout: float | None = field(default=None, metadata={"like": 0.1})  # in the FFN (relu_dropout)
    embed_dropout: float | None = field(default=None, metadata={"like": 0.1})  # on Transformer inputs
    out_dropout: float | None = field(default=None, metadata={"like": 0.1})  # in the output and tamper heads
    # attention dropout of the cross-modal Transformers by target modality (text, audio, vision):
    # MulT's attn_dropout, attn_dropout_a, attn_dropout_v
    cross_attn_dropout: tuple[float, float, float] | None = field(default=None, metadata={"like": (0.1, 0.1, 0.1)})
    attention_backend: str = "auto"  # "auto", "sdpa" or "math" (see models/layers/attention.py)
    # MMSA's MulT options (its SIMS config: 0.3 and true): dropout on the text features before E_t,
    # and MulT's future mask in the cross-modal and memory Transformers (its attn_mask)
    text_dropout: float = 0.0
    causal_attention: bool = False
    # MMSA 2.2.1's MulT input stage: "valid" pads the conv of eq. 1 not at all (a sequence loses
    # kernel - 1 steps; for the MulT baseline only), and it adds no position embeddings
    conv_padding: str = "same"
    position_embeddings: bool = True

    def rate(self, name: str) -> float:
        """Dropout rate ``name`` ("ffn", "embed" or "out") with its fallback to ``dropout``."""
        value = getattr(self, f"{name}_dropout")
        return self.dropout if value is None else value

    def cross_attn_rates(self) -> tuple[float, float, float]:
        """Cross-modal attention dropout by target modality, falling back to ``attn_dropout``."""
        return tuple(self.cross_attn_dropout or (self.attn_dropout,) * 3)  # type: ignore[return-value]


@dataclass
class PretrainConfig:
    """Stage 1: reconstruction + modality-consistency detection (eq. 10)."""

    epochs: int = 500
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    lambda1: float = 0.4
    p_tamper: float = 0.5
    patience: int = 20  # early stopping on the validation loss
    valid_fraction: float = 0.1  # held out of the unlabeled clips when the file has no valid split


@dataclass
class FinetuneConfig:
    """Stage 2: sentiment regression + contrastive learning (eq. 19)."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    lambda2: float = 1.5
    tau: float = 1.0  # temperature of eq. 18
    sp_dropout: float = 0.1  # dropout rate of the strong positive, eq. 16
    sp_stop_grad: bool = True  # strong positive as a no-grad target (cheaper) or through both views
    sp_model_dropout: bool = False  # the no-grad strong-positive pass with the model's own dropout on
    neutral_band: float = 0.1  # |label| <= band is neutral when grouping clips for eq. 18
    pretrained: str = "auto"  # "auto": --pretrained DIR if given; "none": random encoders; or a run dir
    patience: int = 10


@dataclass
class TrainerConfig:
    """Devices, precision and reproducibility (handed to Lightning)."""

    seed: int = 1111
    accelerator: str = "auto"  # "auto", "cpu", "gpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # "auto", "ddp", ...
    precision: str = "auto"  # "auto": bf16-mixed on a GPU, 32-true on CPU; or any Lightning precision
    compile: bool = False  # torch.compile the model (GPU)
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), ...
    compile_scope: str = "model"  # "model": one graph; "blocks": each Transformer block apart (faster to compile)
    # "inductor" (compile_mode applies) or "cudagraphs": CUDA graphs of the traced, unfused graph
    # (no code generation, so it compiles in seconds; a GPU step's time is mostly launch overhead)
    compile_backend: str = "inductor"
    grad_clip: float = 0.8
    lr_patience: int = 5  # ReduceLROnPlateau
    lr_factor: float = 0.5
    deterministic: bool = False
    progress: bool = True

    def uses_cuda_graphs(self) -> bool:
        """Whether compiling records CUDA graphs (on a GPU)."""
        return self.compile_backend == "cudagraphs" or self.compile_mode in CUDA_GRAPH_MODES


@dataclass
class Config:
    """A complete run configuration."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML-friendly dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def validate(self) -> "Config":
        """Raise :class:`ConfigError` on a value outside its allowed set or range (see
        :mod:`aemt.config_checks`)."""
        problem = first_problem(self)
        if problem is not None:
            raise ConfigError(problem.message)
        return self


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``; ValueError or TypeError when it is not one (no
    rounding 5.5 to 5, no truthiness of 2)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if isinstance(value, bool):  # not 1 layer, nor the string "True"
        raise TypeError
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError
        return tuple(_convert(v, d) for v, d in zip(value, default))
    if not isinstance(value, (int, float, str)):
        raise TypeError
    if isinstance(default, int):
        if isinstance(value, float) and not value.is_integer():  # also inf and nan
            raise ValueError
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, str):
        return str(value)
    raise TypeError


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a YAML/CLI value to the type of the field's default, or raise ConfigError."""
    if default is None or value is None:
        return value
    try:
        return _convert(value, default)
    except (TypeError, ValueError, OverflowError):
        pass
    if isinstance(default, bool):
        raise ConfigError(f"config key '{key}': expected a value of type bool (true or false), got {value!r}")
    hint = " (YAML reads a bare yes, no, on or off as a boolean: quote it)" if isinstance(value, bool) else ""
    if isinstance(default, tuple):
        kind = type(default[0]).__name__ if default else "value"
        raise ConfigError(f"config key '{key}': expected {len(default)} values of type {kind} "
                          f"(like {list(default)}), got {value!r}{hint}")
    raise ConfigError(
        f"config key '{key}': expected a value of type {type(default).__name__} "
        f"(like {default!r}), got {value!r}{hint}"
    )


def _apply(section: Any, values: Mapping[str, Any], prefix: str) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; known keys: {sorted(names)}")
        current, meta = getattr(section, key), names[key].metadata
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{full}': expected a mapping, got {value!r}")
            _apply(current, value, f"{full}.")
        elif value is None:
            if not (names[key].default is None or "like" in meta):
                raise ConfigError(f"config key '{full}': expected a value like {current!r}, got null")
            setattr(section, key, None)
        else:  # an optional field (default None) is coerced like its metadata's "like" value
            if value is False and "if_false" in meta:  # YAML's bare `off`
                value = meta["if_false"]
            like = meta.get("like", current) if current is None else current
            setattr(section, key, _coerce(full, value, like))


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict (as read from YAML)."""
    cfg = Config()
    _apply(cfg, values or {}, "")
    return cfg.validate()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on failure."""
    try:
        with open(path, encoding="utf-8") as handle:  # YAML's messages then name the file, not "<unicode string>"
            values = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {' '.join(str(exc).split())}") from None
    if values is None:
        warnings.warn(f"'{path}' is empty (or only comments): every setting takes its default", stacklevel=2)
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at top level, got {type(values).__name__}")
    return values


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None,
                origin: str = "override") -> Config:
    """Load a preset by name or a YAML file, then apply dotted ``overrides``. A bad value's
    :class:`ConfigError` names the preset or file, or ``origin`` (e.g. "--set") for an override."""
    text = str(name_or_path)
    path = _PRESET_DIR / f"{text}.yaml" if text in PRESETS else Path(text)
    if not path.exists():
        raise ConfigError(f"config '{text}' is neither a preset {list(PRESETS)} nor an existing YAML file")
    values = read_yaml(path)
    values.setdefault("name", text if text in PRESETS else path.stem)
    try:
        cfg = config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{f'preset {text!r}' if text in PRESETS else f'config file {str(path)!r}'}: {exc}") from None
    return apply_overrides(cfg, overrides or {}, origin)


def apply_overrides(cfg: Config, overrides: Mapping[str, Any], origin: str = "override") -> Config:
    """Return a copy of ``cfg`` with dotted-key overrides applied and validated; a bad one's
    :class:`ConfigError` starts with ``origin``."""
    cfg = dataclasses.replace(cfg)  # shallow; sections are replaced below
    for section in SECTIONS:
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section)))
    for key, value in overrides.items():
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        try:
            _apply(cfg, nested, "")
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    problem = first_problem(cfg)
    if problem is not None:  # a value overridden, or one that no longer fits them (num_heads after d_model)
        changed = "" if problem.key in overrides else " " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ConfigError(f"{origin}{changed}: {problem.message}")
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from aemt.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
