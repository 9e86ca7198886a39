"""Run configuration: nested dataclasses that map 1:1 onto the YAML presets.

A config has five sections (``data``, ``model``, ``pretrain``, ``finetune``, ``trainer``).
``load_config`` takes a preset name shipped in ``aemt/configs`` (``sims2``, ``mosei``, ``mosi``,
``synthetic``) or a path to a YAML file, and applies dotted overrides such as
``{"finetune.lambda2": 0}``. Unknown keys and ill-typed values raise :class:`ConfigError`
naming the key, the expected and the actual value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from aemt.errors import ConfigError

PRESETS = ("sims2", "mosei", "mosi", "synthetic")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
COMPILE_BACKENDS = ("inductor", "cudagraphs")
DEVICE_RESIDENT = ("auto", "always", "never")  # data.device_resident: keep the splits in GPU memory?
_PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """How MMSA-layout files become model inputs (paper §4.2.1)."""

    seq_len: int = 50  # every modality is average-pooled over its valid frames to this length
    text_input: str = "sequence"  # "sequence": all BERT tokens; "cls": position 0 only (paper §3.2.1)
    standardize: bool = True  # per-feature z-score with train-split statistics
    metrics: str = "sims"  # "sims" (SIMS, SIMS v2) or "mosei" (MOSI, MOSEI)
    cache_dir: str | None = None  # pooled-array cache; None: $AEMT_CACHE_DIR or ~/.cache/aemt; "off"
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
        """Raise :class:`ConfigError` on a value outside its allowed set or range."""
        checks = [
            ("data.seq_len", self.data.seq_len, self.data.seq_len >= 1, ">= 1"),
            ("data.text_input", self.data.text_input, self.data.text_input in ("sequence", "cls"), "'sequence' or 'cls'"),
            ("data.metrics", self.data.metrics, self.data.metrics in ("sims", "mosei"), "'sims' or 'mosei'"),
            ("data.device_resident", self.data.device_resident, self.data.device_resident in DEVICE_RESIDENT,
             "'auto', 'always' or 'never'"),
            ("model.d_model", self.model.d_model, self.model.d_model >= 1, ">= 1"),
            ("model.num_heads", self.model.num_heads,
             self.model.num_heads >= 1 and self.model.d_model % self.model.num_heads == 0,
             f"a divisor of model.d_model={self.model.d_model}"),
            ("model.autoencoder", self.model.autoencoder, self.model.autoencoder in ("transformer", "lstm"), "'transformer' or 'lstm'"),
            ("model.decoder_input", self.model.decoder_input, self.model.decoder_input in ("queries", "memory"), "'queries' or 'memory'"),
            ("model.attention_backend", self.model.attention_backend, self.model.attention_backend in ("auto", "sdpa", "math"), "'auto', 'sdpa' or 'math'"),
            ("model.conv_kernels", self.model.conv_kernels,
             len(self.model.conv_kernels) == 3 and all(int(k) >= 1 and int(k) % 2 == 1 for k in self.model.conv_kernels),
             "three odd kernel sizes >= 1"),
            ("model.dropout", self.model.dropout, 0 <= self.model.dropout < 1, "in [0, 1)"),
            ("model.attn_dropout", self.model.attn_dropout, 0 <= self.model.attn_dropout < 1, "in [0, 1)"),
            ("model.text_dropout", self.model.text_dropout, 0 <= self.model.text_dropout < 1, "in [0, 1)"),
            *((f"model.{name}_dropout", getattr(self.model, f"{name}_dropout"),
               0 <= self.model.rate(name) < 1, "in [0, 1) or null") for name in ("ffn", "embed", "out")),
            ("model.cross_attn_dropout", self.model.cross_attn_dropout,
             all(0 <= p < 1 for p in self.model.cross_attn_rates()), "three rates in [0, 1) or null"),
            ("data.seq_len", self.data.seq_len, self.data.seq_len <= 1024 or self.model.decoder_input != "queries",
             "<= 1024 with model.decoder_input 'queries' (the learned decoder queries)"),
            ("pretrain.valid_fraction", self.pretrain.valid_fraction, 0 < self.pretrain.valid_fraction < 0.5,
             "in (0, 0.5)"),
            ("pretrain.lambda1", self.pretrain.lambda1, self.pretrain.lambda1 >= 0, ">= 0"),
            ("pretrain.p_tamper", self.pretrain.p_tamper, 0 <= self.pretrain.p_tamper <= 1, "in [0, 1]"),
            ("finetune.lambda2", self.finetune.lambda2, self.finetune.lambda2 >= 0, ">= 0"),
            ("finetune.tau", self.finetune.tau, self.finetune.tau > 0, "> 0"),
            ("finetune.neutral_band", self.finetune.neutral_band, self.finetune.neutral_band >= 0, ">= 0"),
            ("finetune.sp_dropout", self.finetune.sp_dropout, 0 <= self.finetune.sp_dropout < 1, "in [0, 1)"),
            ("trainer.compile_scope", self.trainer.compile_scope, self.trainer.compile_scope in ("model", "blocks"),
             "'model' or 'blocks'"),
            ("trainer.compile_backend", self.trainer.compile_backend, self.trainer.compile_backend in COMPILE_BACKENDS,
             f"one of {COMPILE_BACKENDS}"),
            ("trainer.compile_mode", self.trainer.compile_mode,
             self.trainer.compile_backend == "inductor" or self.trainer.compile_mode == "default",
             "'default' with trainer.compile_backend 'cudagraphs' (modes are inductor's)"),
            ("trainer.compile_scope", self.trainer.compile_scope,
             self.trainer.compile_scope == "model" or not self.trainer.uses_cuda_graphs(),
             f"'model' with CUDA graphs (trainer.compile_mode '{self.trainer.compile_mode}', compile_backend "
             f"'{self.trainer.compile_backend}'): CUDA graphs of blocks compiled apart break outside a backward, "
             "pytorch/pytorch#152887"),
        ]
        for stage in ("pretrain", "finetune"):
            sec = getattr(self, stage)
            checks += [
                (f"{stage}.epochs", sec.epochs, sec.epochs >= 1, ">= 1"),
                (f"{stage}.batch_size", sec.batch_size, sec.batch_size >= 2, ">= 2"),
                (f"{stage}.lr", sec.lr, sec.lr > 0, "> 0"),
            ]
        for key, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")
        return self


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a YAML/CLI value to the type of the field's default, or raise ConfigError."""
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            items = tuple(type(default[0])(v) for v in value)
            if len(items) != len(default):
                raise ValueError
            return items
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(
        f"config key '{key}': expected a value of type {type(default).__name__} "
        f"(like {default!r}), got {value!r}"
    )


def _apply(section: Any, values: Mapping[str, Any], prefix: str) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; known keys: {sorted(names)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{full}': expected a mapping, got {value!r}")
            _apply(current, value, f"{full}.")
        elif value is None:
            if not (names[key].default is None or "like" in names[key].metadata):
                raise ConfigError(f"config key '{full}': expected a value like {current!r}, got null")
            setattr(section, key, None)
        else:  # an optional field (default None) is coerced like its metadata's "like" value
            like = names[key].metadata.get("like", current) if current is None else current
            setattr(section, key, _coerce(full, value, like))


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict (as read from YAML)."""
    cfg = Config()
    _apply(cfg, values or {}, "")
    return cfg.validate()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on failure."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at top level, got {type(values).__name__}")
    return values


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a preset by name or a YAML file, then apply dotted ``overrides``."""
    text = str(name_or_path)
    path = _PRESET_DIR / f"{text}.yaml" if text in PRESETS else Path(text)
    if not path.exists():
        raise ConfigError(f"config '{text}' is neither a preset {list(PRESETS)} nor an existing YAML file")
    values = read_yaml(path)
    values.setdefault("name", text if text in PRESETS else path.stem)
    cfg = config_from_dict(values)
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return a copy of ``cfg`` with dotted-key overrides applied and validated."""
    cfg = dataclasses.replace(cfg)  # shallow; sections are replaced below
    for section in ("data", "model", "pretrain", "finetune", "trainer"):
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section)))
    for key, value in overrides.items():
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _apply(cfg, nested, "")
    return cfg.validate()


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from aemt.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
