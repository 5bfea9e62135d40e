"""What the card can be given: a model in Python, a ``qrobust train`` run folder, or a study's model stage.

Accepted folders (docs/card.md, "Which folders"):

* a run folder written by ``qrobust train`` (float or QAT at any width; the model is rebuilt by
  :func:`qrobust.pipeline.load_run`); a QAT run whose ``quant.init`` names a float run folder or
  checkpoint brings that float model along (the patch-transfer source);
* a trained-model stage of a study, ``<study>/seed-<s>/models/<stage>``: the model is rebuilt from the
  study's stored ``config.toml`` with the study's own constructors (divqat: ``fp32``, ``qat-<backend>``,
  ``divqat-<alpha>-<backend>``; qadtr: ``fp32``, ``qat<b>``, ``defense-<name>``; sq: ``fp32``, ``qat<b>``,
  ``sq``, ``sq-mi`` and the ablation variants, deployed as their N-draw ensemble); the seed's ``fp32``
  stage is the float model. A qadtr defense stage runs at its training width, or at another with
  ``FOLDER@<bits>``, or under random-precision inference with ``FOLDER@rand``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from qrobust.data import ImageData, load_dataset
from qrobust.errors import CheckpointError, ConfigError
from qrobust.experiment.settings import stored_study_config, stored_study_values
from qrobust.quant import QuantConfig, quantize, set_bit_width
from qrobust.runs import safe_load


@dataclass
class Subject:
    """One model as the card meets it (see :func:`qrobust.cards.card`)."""

    name: str
    model: nn.Module
    data: object  # ImageData or (x_train, y_train, x_test, y_test)
    float_model: nn.Module | None = None
    float_source: str = ""
    bpda_model: nn.Module | None = None
    source: str = "a model given in Python"
    describe: dict = field(default_factory=dict)


def _toml(path: Path) -> dict:
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is corrupt (not UTF-8 TOML); the folder cannot be read") from None
    values.pop("meta", None)
    return values


def _complete(folder: Path) -> None:
    results = folder / "results.json"
    done = json.loads(results.read_text()) if results.is_file() else {}
    if not done.get("complete"):
        raise ConfigError(f"{folder} holds no finished training (results.json says it is not complete); finish "
                          "the run with the command that started it, then make its card")


def split_width(spec: str) -> tuple[Path, str]:
    """``FOLDER@<bits>`` / ``FOLDER@rand`` -> (folder, width); no suffix -> (folder, "")."""
    text = str(spec)
    if "@" in Path(text).name:
        head, _, width = text.rpartition("@")
        if width != "rand" and not width.isdigit():
            raise ConfigError(f"'{text}': a width suffix is @<bits> (e.g. @4) or @rand")
        return Path(head), width
    return Path(text), ""


def from_folder(spec: str | Path) -> Subject:
    """The :class:`Subject` of a run folder or a study's model stage (module docstring)."""
    path, width = split_width(str(spec))
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give a run folder written by `qrobust train` or a study's "
                          "model stage (<study>/seed-<s>/models/<stage>)")
    if not (path / "config.toml").is_file():
        raise ConfigError(f"{path} is not a qrobust run folder (no config.toml); give the folder `qrobust train "
                          "--out` wrote or a study's model stage (<study>/seed-<s>/models/<stage>)")
    values = _toml(path / "config.toml")
    if "stage" in values:
        return _from_stage(path, values, width)
    if any(p.is_dir() for p in path.glob("seed-*/models")):
        stages = sorted(str(p) for p in path.glob("seed-*/models/*") if p.is_dir())[:4]
        raise ConfigError(f"{path} is a study folder; give one of its model stages, e.g. {', '.join(stages)}")
    if width:
        raise ConfigError(f"{spec}: a width suffix (@<bits>, @rand) is for a qadtr defense stage only")
    return _from_run(path)


def _from_run(path: Path) -> Subject:
    from qrobust.models import model_for_data
    from qrobust.pipeline import load_run, load_weights

    _complete(path)
    cfg, model, ds = load_run(path)
    q = cfg.quant
    kind = "float (fp32)" if q.bits == 32 else f"QAT {q.bits}-bit ({q.backend})"
    subject = Subject(path.name, model, ds, source=str(path),
                      describe={"kind": kind, "arch": cfg.model.arch, "data": cfg.data.name})
    if q.bits != 32 and q.init:
        init = Path(q.init)
        if not init.is_absolute() and not init.exists():
            init = path / init
        if init.is_dir() and (init / "config.toml").is_file():
            subject.float_model = load_run(init)[1]
        elif init.exists():
            subject.float_model = model_for_data(cfg.model.arch, ds.info)
            load_weights(subject.float_model, init)
            subject.float_model.eval()
        subject.float_source = f"quant.init = {q.init}" if subject.float_model is not None else ""
    return subject


_STUDY_SECTIONS = {"divqat": "divqat", "qadtr": "patches", "sq": "sq"}  # a section only that study has


def _study_config(root: Path):
    import importlib

    values = stored_study_values(root)
    study = next((s for s, section in _STUDY_SECTIONS.items() if section in values), None)
    if study is None:
        raise ConfigError(f"{root} is not a folder of a known study (divqat, qadtr, sq)")
    cfg = importlib.import_module(f"qrobust.studies.{study}.config").StudyConfig()
    return study, stored_study_config(cfg, root).validate()


def _load_state(model: nn.Module, folder: Path) -> nn.Module:
    state = safe_load(folder / "checkpoint.pt")
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{folder / 'checkpoint.pt'} is not a qrobust checkpoint (no 'model' entry)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{folder} does not fit the model its study config describes: "
                              f"{str(err).splitlines()[0][:200]}") from None
    return model.eval()


def _from_stage(path: Path, values: dict, width: str) -> Subject:
    seed_dir, root = path.parent.parent, path.parent.parent.parent
    if path.parent.name != "models" or not (root / "config.toml").is_file():
        raise ConfigError(f"{path} looks like a study's model stage but is not inside <study>/seed-<s>/models/")
    _complete(path)
    study, cfg = _study_config(root)
    data = load_dataset(cfg.data.name, data_dir=cfg.data.dir or None)
    stage = values["stage"]
    build = {"divqat": _divqat, "qadtr": _qadtr, "sq": _sq}[study]
    model, kind = build(cfg, data, stage, seed_dir, width)
    subject = Subject(f"{study} {stage}" + (f"@{width}" if width else ""), model, data, source=str(path) +
                      (f"@{width}" if width else ""), describe={"kind": kind, "study": study, "stage": stage,
                                                                 "arch": cfg.model.arch, "data": cfg.data.name})
    fp_dir = seed_dir / "models" / "fp32"
    if stage != "fp32" and (fp_dir / "results.json").is_file():
        _complete(fp_dir)
        subject.float_model = build(cfg, data, "fp32", seed_dir, "")[0]
        subject.float_source = f"the study's fp32 stage ({fp_dir})"
    return subject


def _unknown(study: str, stage: str) -> ConfigError:
    return ConfigError(f"{study} stage '{stage}' is not one the card can rebuild; see docs/card.md, 'Which folders'")


def _no_width(study: str, width: str) -> None:
    if width:
        raise ConfigError(f"a width suffix (@{width}) is for qadtr defense stages only, not {study} stages")


# Each study's builder: (cfg, data, stage, seed folder, width) -> (the stage's trained model in eval mode, kind)


def _divqat(cfg, data: ImageData, stage: str, seed_dir: Path, width: str):
    from qrobust.studies.divqat.data import build_model

    _no_width("divqat", width)
    folder, fp, bits = seed_dir / "models" / stage, build_model(cfg, cfg.model.arch, data.info), cfg.qat.bits
    if stage == "fp32":
        return _load_state(fp, folder), "float (fp32)"
    if stage.startswith("qat-"):
        backend = stage[len("qat-"):]
        return _load_state(quantize(fp, QuantConfig(bits, bits, backend=backend)), folder), \
            f"QAT {bits}-bit ({backend})"
    if stage.startswith("divqat-"):
        backend = cfg.divqat.backend
        return _load_state(quantize(fp, QuantConfig(bits, bits, backend=backend)), folder), \
            f"DivQAT {bits}-bit ({backend})"
    raise _unknown("divqat", stage)


def _qadtr(cfg, data: ImageData, stage: str, seed_dir: Path, width: str):
    from qrobust.quant import RandomPrecision, make_switchable_bn
    from qrobust.studies.qadtr.defenses import DEFENSES, LABELS, build_float_model, qat_model

    folder, fp, act_range = seed_dir / "models" / stage, build_float_model(cfg, data.info), cfg.qat.act_range
    if stage == "fp32" or (stage.startswith("qat") and stage[3:].isdigit()):
        _no_width("qadtr fp32/qat", width)
        if stage == "fp32":
            return _load_state(fp, folder), "float (fp32)"
        bits = int(stage[3:])
        return _load_state(qat_model(fp, bits, act_range), folder), f"QAT {bits}-bit"
    name = stage[len("defense-"):] if stage.startswith("defense-") else ""
    if name not in DEFENSES or DEFENSES[name].make is None:
        raise _unknown("qadtr", stage)
    d = cfg.defense
    model = qat_model(fp, d.train_bits, act_range)
    if DEFENSES[name].switchable_bn(cfg):
        make_switchable_bn(model, d.bit_widths)
    model = _load_state(model, folder)
    label = LABELS.get(name, name)
    if width == "rand":
        return RandomPrecision(model, d.bit_widths).eval(), f"{label}, random precision over {list(d.bit_widths)} bits"
    bits = int(width) if width else d.train_bits
    try:
        set_bit_width(model, bits)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"qadtr stage {stage} cannot run at {bits} bits: {err}") from None
    return model, f"{label}, {bits}-bit"


def _sq(cfg, data: ImageData, stage: str, seed_dir: Path, width: str):
    from qrobust.models import model_for_data
    from qrobust.quant.sq_model import build_sq_model
    from qrobust.quant.stochastic import EnsembleSQ
    from qrobust.studies.sq.spec import sq_variants

    _no_width("sq", width)
    folder, fp, bits = seed_dir / "models" / stage, model_for_data(cfg.model.arch, data.info), cfg.qat_bits
    if stage == "fp32":
        return _load_state(fp, folder), "float (fp32)"
    if stage == f"qat{bits}":
        qcfg = QuantConfig(weight_bits=bits, act_bits=bits, act_range=cfg.qat.act_range)
        return _load_state(quantize(fp, qcfg), folder), f"QAT {bits}-bit"
    settings = dict(sq_variants(cfg)).get(stage)
    ranges_file = seed_dir / "calibration.json"
    if settings is None or not ranges_file.is_file():
        raise _unknown("sq", stage)
    model = _load_state(build_sq_model(fp, json.loads(ranges_file.read_text()), settings, cfg.sq.at_input), folder)
    return EnsembleSQ(model, settings["n_draws"]).eval(), \
        f"SQ ensemble ({settings['n_draws']} draws, {settings['num_bins']} bins)"
