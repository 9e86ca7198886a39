"""Reading an experiment file's values with checks (the format: :mod:`aemt.evaluation.experiment`).

Each bad value is one :class:`ConfigError` naming the file, the key, the expected and the actual
value; a data file that does not exist is a :class:`DataError` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from aemt.config_checks import SEED_MAX
from aemt.errors import ConfigError, DataError

T = TypeVar("T")
TOP_KEYS = ("name", "base", "data", "seeds", "variants", "overrides", "sweeps", "sweep_variant", "missing_modality")
DATA_KEYS = ("labeled", "unlabeled", "synthetic")
_COUNT = (int, type(None))  # null: the preset's count
# the arguments of aemt.data.synthetic.write_synthetic after its folder (a test keeps them in step)
SYNTHETIC_KEYS: dict[str, tuple[type, ...]] = {
    "preset": (str,), "scale": (str,), "n_train": _COUNT, "n_valid": _COUNT, "n_test": _COUNT,
    "n_unlabeled": _COUNT, "seed": (int,), "nonfinite_rate": (int, float)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
               list: "a list", type(None): "null"}


def is_a(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance``, except that true/false is no number."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def check_count(option: str, value: int | None) -> None:
    """A command-line count (``--seeds``, ``--epochs``): absent, or an integer >= 1."""
    if value is not None and not (is_a(value, (int,)) and value >= 1):
        raise ConfigError(f"{option}: expected an integer >= 1, got {value!r}")


class ExperimentFile:
    """An experiment file's top-level mapping; each method returns one key's value, checked."""

    def __init__(self, path: Path, spec: Mapping[str, Any]) -> None:
        self.path, self.spec = Path(path), spec
        self.known_keys(spec, "", TOP_KEYS)

    def error(self, key: str, expected: str, got: Any) -> ConfigError:
        """The error for ``key``: ``expected`` (in words) vs ``got``."""
        return ConfigError(f"experiment '{self.path}', key '{key}': expected {expected}, got {got!r}")

    def known_keys(self, mapping: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        """Refuse keys of ``mapping`` (the value of ``key``; '' for the top level) not in ``allowed``."""
        unknown = [k for k in mapping if k not in allowed]
        if unknown:
            where = f", key '{key}'" if key else ""
            raise ConfigError(f"experiment '{self.path}'{where}: unknown keys {unknown}; known: {list(allowed)}")

    def typed(self, key: str, value: Any, *types: type) -> Any:
        """``value`` (the value of ``key``) if it is one of ``types``."""
        if not is_a(value, types):
            raise self.error(key, " or ".join(_TYPE_NAMES[t] for t in types), value)
        return value

    def get(self, key: str, default: Any, *types: type) -> Any:
        """The top-level ``key`` (``default`` when absent), which must be one of ``types``."""
        return self.typed(key, self.spec.get(key, default), *types)

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        """``value`` as a mapping with string keys (null: an empty one)."""
        value = self.typed(key, {} if value is None else value, dict)
        if not all(isinstance(k, str) and k for k in value):
            raise self.error(key, "a mapping with non-empty strings (dotted config keys) as keys", value)
        return dict(value)

    def config(self, key: str, build: Callable[[], T]) -> T:
        """``build()``, its :class:`ConfigError` prefixed with this file and ``key`` (if any)."""
        try:
            return build()
        except ConfigError as exc:
            where = f", key '{key}'" if key else ""
            raise ConfigError(f"experiment '{self.path}'{where}: {exc}") from None

    def seeds(self, count: int | None, default: int, first: int) -> list[int]:
        """``seeds``: a count N (``first``, ``first + 1``, ...) or a list; ``count`` (``--seeds``)
        keeps that many (or takes ``count`` seeds from ``first`` when the file has fewer)."""
        raw = self.spec.get("seeds", default)
        if is_a(raw, (int,)) and raw >= 1:
            seeds = list(range(first, first + raw))
        elif (isinstance(raw, list) and raw and all(is_a(s, (int,)) and 0 <= s <= SEED_MAX for s in raw)
              and len(set(raw)) == len(raw)):
            seeds = list(raw)
        else:
            raise self.error("seeds", f"a count >= 1 or a non-empty list of distinct integers in [0, {SEED_MAX}]", raw)
        if count is not None:
            seeds = list(range(first, first + count)) if count > len(seeds) else seeds[:count]
        return seeds

    def variants(self, builtin: Mapping[str, dict[str, Any]], sweeps: bool) -> dict[str, dict[str, Any]]:
        """``variants``: a list of built-in names and ``{name: {key: value}}``, each name once;
        empty only when there are ``sweeps``."""
        raw = self.get("variants", list(builtin), list)
        if not raw and not sweeps:
            raise self.error("variants", "a non-empty list (or sweeps)", raw)
        variants: dict[str, dict[str, Any]] = {}
        for i, item in enumerate(raw):
            key = f"variants[{i}]"
            if isinstance(item, str):
                if item not in builtin:
                    raise ConfigError(f"experiment '{self.path}', key '{key}': unknown variant {item!r}; built-in: "
                                      f"{list(builtin)} (or give {{name: {{key: value}}}})")
                name, own = item, dict(builtin[item])
            elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
                name, own = next(iter(item.items()))
                own = self.mapping(f"{key}.{name}", own)
            else:
                raise self.error(key, "a built-in variant name or {name: {key: value}}", item)
            if name in variants:
                raise self.error(key, "each variant name once", name)
            variants[name] = own
        return variants

    def sweeps(self) -> dict[str, list[Any]]:
        """``sweeps``: ``{config key: [value, ...]}``, each list non-empty with distinct values."""
        sweeps = self.mapping("sweeps", self.spec.get("sweeps"))
        for key, values in sweeps.items():
            if not isinstance(values, list) or not values or len({str(v) for v in values}) < len(values):
                raise self.error(f"sweeps.{key}", "a non-empty list of distinct values", values)
        return sweeps

    def sweep_variant(self, variants: Mapping[str, Any]) -> str:
        """``sweep_variant`` (default ``aemt``): one of ``variants`` (this file's and the built-in ones)."""
        name = self.get("sweep_variant", "aemt", str)
        if name not in variants:
            raise self.error("sweep_variant", f"one of the variants {list(variants)}", name)
        return name

    def data(self) -> dict[str, Any]:
        """``data``: ``{labeled: FILE[, unlabeled: FILE]}`` (files that exist, relative to this
        file's folder; returned absolute) or ``{synthetic: {write_synthetic's arguments}}``."""
        data = self.mapping("data", self.spec.get("data"))
        self.known_keys(data, "data", DATA_KEYS)
        if ("unlabeled" in data and "labeled" not in data) or ("labeled" in data and "synthetic" in data):
            raise self.error("data", "{labeled: FILE} or {labeled: FILE, unlabeled: FILE} or {synthetic: {...}}",
                             data)
        for name in ("labeled", "unlabeled"):
            if name in data:
                given = Path(self.typed(f"data.{name}", data[name], str)).expanduser()
                path = (self.path.parent / given).absolute()  # an absolute `given` stays itself
                if not path.is_file():
                    note = "" if given.is_absolute() else " (relative paths start at the experiment file's folder)"
                    raise DataError(f"expected an existing data file, got '{path}'{note}", file=str(self.path),
                                    key=f"data.{name}")
                data[name] = str(path)
        if "synthetic" in data:
            synthetic = data["synthetic"] = self.mapping("data.synthetic", data["synthetic"])
            self.known_keys(synthetic, "data.synthetic", tuple(SYNTHETIC_KEYS))
            for key, value in synthetic.items():
                self.typed(f"data.synthetic.{key}", value, *SYNTHETIC_KEYS[key])
        return data
