"""Experiment configuration: TOML file -> validated dataclasses, ``key=value`` overrides on top.

Order of precedence (timm's ``train.py`` idea): dataclass defaults < config file < command-line
``section.key=value`` overrides. Unknown sections/keys and values of the wrong type are errors that
name the key and the valid choices. The resolved config is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrobust.errors import ConfigError


@dataclass
class DataSection:
    name: str = "fashion-mnist"
    dir: str = ""  # data folder; empty = $QROBUST_DATA or the data set's default place
    download: bool = False
    augment: bool = True  # random crop (+ flip where the data set allows it)


@dataclass
class ModelSection:
    arch: str = "convnet"


@dataclass
class TrainSection:
    epochs: int = 15
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to BatchNorm parameters and biases
    label_smoothing: float = 0.0
    schedule: str = "cosine"  # cosine | constant (per step, after linear warm-up)
    warmup_epochs: float = 0.5
    bf16: bool = False  # bf16 autocast; slower than fp32 on CPUs without AVX512-BF16/AMX
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    eval_batch_size: int = 1024


ACT_RANGES = ("ema", "learned")


def check_act_range(value: Any, key: str = "act_range") -> str:
    """Validate an activation-range mode (``QuantConfig.act_range``, ``quant.act_range``, ``qat.act_range``)."""
    if value not in ACT_RANGES:
        raise ConfigError(
            f"{key} '{value}' is unknown; use 'ema' (EMA min/max ranges) or 'learned' "
            "(ranges learned by gradient descent, LSQ+; better at 2-4 bits)"
        )
    return value


@dataclass
class QuantSection:
    bits: int = 32  # 32 = float; 2..8 = QAT at that weight bit width
    act_bits: int = 0  # 0 = same as bits
    backend: str = "server"  # server (x86) | mobile (ARM)
    first_last_bits: int = 8  # 0 = quantize first/last layers at `bits` too
    act_range: str = "ema"  # ema (EMA min/max) | learned (LSQ+-style learned range; better at 2-4 bits)
    edge_bits: int = 8  # input quantizer and logits at every body width; 0 = follow the body (old, ties)
    float_logits: bool = False  # true: logits unquantized (ONNX QDQ export only; torch int8 refuses)
    init: str = ""  # float checkpoint (or run folder) to start QAT from


@dataclass
class RunConfig:
    seed: int = 0
    name: str = ""
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    quant: QuantSection = field(default_factory=QuantSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        check_finite(self)
        check_act_range(self.quant.act_range, "quant.act_range")
        t, q = self.train, self.quant
        checks = [
            (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
            (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
            (t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}"),
            (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
            (0 <= t.momentum < 1, f"train.momentum must be in [0, 1) (0 = plain SGD), got {t.momentum}"),
            (t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0 (0 = no warm-up), got {t.warmup_epochs}"),
            (t.optimizer in ("sgd", "adam"), f"train.optimizer '{t.optimizer}' is unknown; use 'sgd' or 'adam'"),
            (t.schedule in ("cosine", "constant"), f"train.schedule '{t.schedule}' is unknown; use 'cosine' or 'constant'"),
            (0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}"),
            (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
            (t.device in ("auto", "cpu", "cuda"), f"train.device '{t.device}' is unknown; use auto, cpu or cuda"),
            (self.quant.bits == 32 or 2 <= self.quant.bits <= 8,
             f"quant.bits must be 32 (float) or 2..8, got {self.quant.bits}"),
            (self.quant.act_bits == 0 or 2 <= self.quant.act_bits <= 8,
             f"quant.act_bits must be 0 (same as bits) or 2..8, got {self.quant.act_bits}"),
            (self.quant.edge_bits == 0 or 2 <= self.quant.edge_bits <= 8,
             f"quant.edge_bits must be 2..8 (8 = as deployed) or 0 (follow the body), got {self.quant.edge_bits}"),
            (self.quant.first_last_bits == 0 or 2 <= self.quant.first_last_bits <= 8,
             f"quant.first_last_bits must be 0 (no exception) or 2..8, got {self.quant.first_last_bits}"),
            (self.quant.backend in ("server", "mobile"),
             f"quant.backend '{self.quant.backend}' is unknown; use 'server' (x86) or 'mobile' (ARM)"),
            (q.bits != 32 or q.act_bits == 0,
             f"quant.act_bits={q.act_bits} needs a QAT run, but quant.bits=32 is float; set quant.bits to 2..8 "
             "or drop quant.act_bits"),
            (q.bits != 32 or not q.init,
             "quant.init is for QAT runs; set quant.bits to 2..8 or drop quant.init"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def check_finite(config: Any, prefix: str = "") -> None:
    """ConfigError naming the first float field of dataclass ``config`` (recursively, lists included)
    that is NaN or infinite: no setting of qrobust means anything at NaN/inf."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key} must be a finite number, got {value!r}; give an ordinary number")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or raise ConfigError.

    Supports bool, int, float, str and ``list[...]`` of those (a list override is written
    ``key=[8,4,2]`` or ``key=8,4,2``).
    """
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = tomllib.loads(f"v = {text}")["v"] if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except tomllib.TOMLDecodeError:
                value = None
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, e.g. {key}=[8,4,2]; got {value!r}")
        (inner,) = typing.get_args(kind) or (str,)
        return [_coerce(v, inner, key) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value.strip()
    raise ConfigError(f"config key '{key}' expects a {getattr(kind, '__name__', kind)}, got {value!r}")


def apply_values(obj: Any, values: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` (recursively) from ``values``; unknown keys are errors."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; write e.g. {full}.<key>=<value>")
            apply_values(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, kind, full))


_apply = apply_values


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, or a ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at position "
                          f"{err.start}); save it as UTF-8 (TOML files must be UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}); check the path and its "
                          "permissions") from None


def load_dataclass_config(config: Any, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults (the dataclass instance ``config``) < TOML file < ``key=value`` overrides; then
    ``config.validate()`` if it has one. Used by every study's config."""
    if path:
        apply_values(config, read_toml(path))
    apply_values(config, parse_overrides(overrides or []))
    if dataclasses.is_dataclass(config):
        check_finite(config)
    return config.validate() if hasattr(config, "validate") else config


def preset_path(study: str, preset: str, presets: tuple[str, ...] = ("quick", "full", "paper")) -> Path:
    """``configs/<study>-<preset>.toml`` in the working directory, else in the source checkout."""
    if preset not in presets:
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(presets)}")
    name = f"{study}-{preset}.toml"
    for base in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (base / name).is_file():
            return base / name
    raise ConfigError(f"preset file configs/{name} not found; run from the repository root or pass --config")


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.epochs=3", "seed=1"]`` -> nested dict (values stay strings; typed on apply)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key=value (e.g. train.epochs=3)")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.strip()
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: RunConfig | None = None) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``key=value`` overrides; validated."""
    return load_dataclass_config(base or RunConfig(), path, overrides)


def config_from_dict(values: dict) -> RunConfig:
    config = RunConfig()
    _apply(config, values)
    return config.validate()


def to_toml(values: dict) -> str:
    """Write a nested dict of scalars as TOML (top-level scalars first, then one table per section)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if v is None:
            return '""'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"{k} = {scalar(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for section, body in values.items():
        if isinstance(body, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {scalar(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


S = typing.TypeVar("S", bound="Settings")


class Settings:
    """Base of a component's settings dataclass (an attack's, an objective's): each setting is listed once,
    with its default and meaning, in the subclass; ``__post_init__`` validates it.

    ``Cls.build(config, **overrides)`` takes an instance, a mapping of settings (e.g. a config section)
    or None (the defaults), applies ``overrides`` and validates; an unknown name is a ConfigError that
    lists the valid ones. ``to_dict()`` gives the settings as plain values (tuples as lists), e.g. for a
    run folder's config.
    """

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def build(cls: type[S], config: S | typing.Mapping[str, Any] | None = None, **overrides: Any) -> S:
        if config is None:
            settings: dict[str, Any] = {}
        elif isinstance(config, cls):
            settings = {name: getattr(config, name) for name in cls.setting_names()}
        elif isinstance(config, typing.Mapping):
            settings = dict(config)
        else:
            raise ConfigError(f"settings must be a {cls.__name__}, a mapping of its settings or None, "
                              f"got {type(config).__name__}")
        settings.update(overrides)
        unknown = sorted(set(settings) - set(cls.setting_names()))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)}; "
                              f"its settings: {', '.join(cls.setting_names())}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if hasattr(value, "to_dict"):
                return value.to_dict()
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {name: plain(getattr(self, name)) for name in self.setting_names()}
