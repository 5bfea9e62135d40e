"""The study's models: the float model, its QAT twins, the Table-2 defenses (a registry), and the views
that give a defense's model at one evaluated width."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qrobust import data as datasets
from qrobust.defenses.patch_training import DWQ, PBAT, QADTR
from qrobust.models import model_for_data
from qrobust.quant import QuantConfig, RandomPrecision, get_bit_width, quantize, set_bit_width
from qrobust.studies.qadtr.config import StudyConfig, region_of
from qrobust.train.objectives import Objective


def build_float_model(cfg: StudyConfig, info: datasets.DatasetInfo) -> nn.Module:
    """The registered architecture ``model.arch`` sized for the data (``model.width``: the ConvNet's)."""
    settings = {"width": cfg.model.width} if cfg.model.arch == "convnet" else {}
    return model_for_data(cfg.model.arch, info, **settings)


def qat_model(float_model: nn.Module, bits: int, act_range: str = "ema") -> nn.Module:
    """The QAT twin at ``bits`` (weights and activations; first/last layers kept at 8, the default)."""
    return quantize(float_model, QuantConfig(weight_bits=bits, act_bits=bits, act_range=act_range))


# --------------------------------------------------------------------------------------------------
# Table-2 defenses: name -> how it is built
# --------------------------------------------------------------------------------------------------


def _never(cfg: StudyConfig) -> bool:
    return False


def _always(cfg: StudyConfig) -> bool:
    return True


def _qadtr_sbn(cfg: StudyConfig) -> bool:
    return cfg.defense.qadtr_switchable_bn


@dataclass(frozen=True)
class DefenseSpec:
    """How a Table-2 defense is built: its objective (None: the per-width QAT models), whether its BNs
    are per width, whether it is evaluated under random precision too (``rand``)."""

    make: Callable[[StudyConfig, int], Objective] | None
    switchable_bn: Callable[[StudyConfig], bool] = _never
    randomised: bool = False


def _qadtr(**parts) -> Callable[[StudyConfig, int], Objective]:
    """QADT-R with ``parts`` (aqapa/dbwt/gir switches, gir_mode) over the study's ``defense.*`` settings."""
    def make(cfg: StudyConfig, seed: int) -> Objective:
        d, p = cfg.defense, cfg.patches
        settings = dict(bit_widths=d.bit_widths, dbwt_mode=d.dbwt_mode, shapes=[p.shape], sizes=p.aqapa_sizes,
                        region=region_of(p.region, "patches.region"), asr_low=d.asr_low, asr_high=d.asr_high,
                        fraction=d.fraction, patch_steps=d.patch_steps, patch_lr=d.patch_lr,
                        gir_weight=d.gir_weight, gir_mode=d.gir_mode, gir_sigma=d.gir_sigma, gir_batch=d.gir_batch,
                        seed=seed)
        return QADTR(settings | parts)

    return make


def _pbat(cfg: StudyConfig, seed: int) -> Objective:
    d = cfg.defense
    return PBAT(specs=cfg.seen_specs(), fraction=d.fraction, patch_steps=d.patch_steps, patch_lr=d.patch_lr,
                seed=seed)


def _dwq(cfg: StudyConfig, seed: int) -> Objective:
    d = cfg.defense
    return DWQ(bit_widths=d.bit_widths, adversary=d.dwq_adversary, eps=d.dwq_eps, alpha=d.dwq_alpha, seed=seed)


DEFENSES: dict[str, DefenseSpec] = {
    "none": DefenseSpec(None),
    "pbat": DefenseSpec(_pbat),
    "dwq": DefenseSpec(_dwq, _always, randomised=True),
    "aqapa": DefenseSpec(_qadtr(dbwt=False, gir=False), _qadtr_sbn),
    "aqapa+dbwt": DefenseSpec(_qadtr(gir=False), _qadtr_sbn, randomised=True),
    "qadtr": DefenseSpec(_qadtr(), _qadtr_sbn, randomised=True),
    "dbwt": DefenseSpec(_qadtr(aqapa=False, gir=False), _qadtr_sbn, randomised=True),
    "dbwt+gir": DefenseSpec(_qadtr(aqapa=False), _qadtr_sbn, randomised=True),
    "aqapa+gir": DefenseSpec(_qadtr(dbwt=False), _qadtr_sbn),
    "qadtr-noise": DefenseSpec(_qadtr(gir_mode="noise"), _qadtr_sbn, randomised=True),
}
LABELS = {"none": "none (QAT per width)", "pbat": "PBAT", "dwq": "DWQ", "aqapa": "A-QAPA",
          "aqapa+dbwt": "A-QAPA+DBWT", "qadtr": "QADT-R", "dbwt": "DBWT", "dbwt+gir": "DBWT+GIR",
          "aqapa+gir": "A-QAPA+GIR", "qadtr-noise": "QADT-R (GIR noise)"}


# --------------------------------------------------------------------------------------------------
# Views: a defense's model at one evaluated width
# --------------------------------------------------------------------------------------------------


def evaluated_widths(cfg: StudyConfig, name: str) -> list[str]:
    """Table 2's widths of defense ``name``: each of ``qat.bits`` it can run at, + ``rand`` if randomised."""
    if name == "none":
        return [str(b) for b in cfg.qat.bits]
    spec = DEFENSES[name]
    widths = [str(b) for b in cfg.qat.bits if b in cfg.defense.bit_widths or not spec.switchable_bn(cfg)]
    return widths + (["rand"] if spec.randomised else [])


def view(ctx: dict, cfg: StudyConfig, name: str, width: str) -> Callable[[], nn.Module]:
    """A zero-argument callable giving defense ``name``'s model at ``width`` (called before every use,
    since the width is a switch on a shared model). ``rand``: random precision inference, its widths
    drawn from a generator seeded ``seed + 7`` that every use within one cell shares."""
    if name == "none":
        model = ctx["models"][width]
        return lambda: model
    model = ctx["defended"][name]
    if width == "rand":
        rp = RandomPrecision(model, cfg.defense.bit_widths, generator=torch.Generator().manual_seed(ctx["seed"] + 7))
        return lambda: rp
    bits = int(width)
    return lambda: set_bit_width(model, bits)


@contextlib.contextmanager
def widths_kept(models: dict[str, nn.Module]) -> Iterator[None]:
    """Restore each quantized model's bit width on exit (views switch shared models)."""
    saved = [(m, get_bit_width(m)) for m in models.values()]
    try:
        yield
    finally:
        for model, bits in saved:
            if bits is not None:
                set_bit_width(model, bits)
