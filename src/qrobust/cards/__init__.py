"""The robustness card: one page on how a (quantized) model holds up against extraction, adversarial
patches and white-box attacks, and what a defense costs (issue 15; every number is defined in docs/card.md).

    import qrobust as qr
    card = qr.card(model, (x_train, y_train, x_test, y_test), budget="quick", out="my-card")   # your model
    card = qr.card({"QAT": qat, "DivQAT": div}, qr.load_dataset("fashion-mnist"), float_model=fp)  # two columns

    qrobust card RUN_FOLDER [RUN_FOLDER2] [--budget quick|standard] [--out DIR]

``card`` returns the content of ``card.json`` and, with ``out``, writes ``card.json``, ``card.md``,
``card.html`` (self-contained) and the figures there, atomically. Finished sections are cached in
``out/card-cache/`` (keyed by the models' weights, the budget and the data), so an interrupted card resumes.

The package is ``qrobust.cards`` (not ``qrobust.card``) so that ``qr.card`` stays the function even after
``import qrobust.cards``: importing a submodule named ``card`` would rebind ``qrobust.card`` to the module.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.runs import atomic_write_bytes, atomic_write_text, cpu_name, git_commit

from . import battery, render
from .budget import BUDGETS, USER_BUDGETS, Budget, get_budget
from .data import CardData, card_data
from .sources import Subject, from_folder, split_width

CARD_FORMAT = 2  # bump when a cached section's meaning or labels change


def environment() -> dict:
    import qrobust

    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "qrobust": qrobust.__version__, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _fingerprint(s: Subject, d: CardData, b: Budget) -> str:
    h = hashlib.sha1(f"{CARD_FORMAT}|{b.to_dict()}|{d.fingerprint()}".encode())
    for model in (s.model, s.float_model, s.bpda_model):
        if model is None:
            h.update(b"none")
            continue
        h.update(repr(model).encode())  # class, structure and bit widths (not in the state dict)
        for name, tensor in model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if tensor.numel() else b"")
    return h.hexdigest()[:20]


def _check_model(model, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} must be a torch nn.Module taking images in [0, 1], got {type(model).__name__}")
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ConfigError(f"{what} is on {device}; the card runs on the CPU: pass model.cpu()")
    return model


def model_card(s: Subject, b: Budget, cache_root: Path | None, bar=None) -> dict:
    """One model's part of the card: its profile, the four sections, warnings and seconds per section."""
    d = card_data(s.data, b)
    for model, what in ((s.model, "model"), (s.float_model, "float_model"), (s.bpda_model, "bpda_model")):
        if model is not None:
            _check_model(model, what)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(b.seed)
        p = battery.profile(s.model, d.eval_x, d.info.num_classes, s.bpda_model)
        torch.manual_seed(b.seed + 1)
        clean_ok = battery.correct_matrix(s.model, d.eval_x, d.eval_y, b.evaluations)
    folder = cache_root / _fingerprint(s, d, b) if cache_root is not None else None
    out = {"name": s.name, "source": s.source, "kind": s.describe.get("kind") or p.kind(), "describe": s.describe,
           "profile": {"randomised": p.randomised, "one_draw_per_forward": p.per_call, "quantized": p.quantized,
                       "bits": p.bits, "int8": p.int8_na or "yes", "bpda_stand_in": p.stand_in_na or "yes"},
           "float_model": s.float_source or None, "data": {"name": d.info.name, **d.sizes()}, "seconds": {}}
    def note(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)

    calls = {"deployment": lambda: battery.deployment(s, d, b, p, clean_ok, note),
             "extraction": lambda: battery.extraction(s, d, b, p, note),
             "patches": lambda: battery.patches(s, d, b, p, note),
             "whitebox": lambda: battery.whitebox(s, d, b, p, clean_ok, note)}
    for name, compute in calls.items():
        if bar is not None:
            bar.set_postfix_str("", refresh=False)
            bar.set_description(f"card {s.name}: {name}")
        cached = folder / f"{name}.json" if folder is not None else None
        if cached is not None and cached.is_file():
            section = json.loads(cached.read_text())
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.random.fork_rng(devices=[]):
                section = compute()
            section["seconds"] = time.perf_counter() - t0
            section["cpu_seconds"] = time.process_time() - c0  # below the wall time when the CPU is shared
            if cached is not None:
                atomic_write_text(cached, json.dumps(section) + "\n")
        out[name] = section
        out["seconds"][name] = section["seconds"]
        out.setdefault("cpu_seconds", {})[name] = section.get("cpu_seconds", math.nan)
        if bar is not None:
            bar.update(1)
    out["warnings"] = out["whitebox"]["warnings"] + out["patches"]["notes"]
    return out


def run_card(subjects: list[Subject], budget: str | Budget = "quick", out: str | Path | None = None,
             progress: bool = False) -> dict:
    """The card of one or two :class:`Subject` s (see :func:`card`)."""
    from tqdm.auto import tqdm

    b = get_budget(budget)
    if not 1 <= len(subjects) <= 2:
        raise ConfigError(f"a card shows one or two models side by side, got {len(subjects)}")
    if len(subjects) == 2 and subjects[0].name == subjects[1].name:
        subjects[1].name += " (2)"
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for card.md, card.html and card.json")
    t0, c0 = time.perf_counter(), time.process_time()
    models = []
    with tqdm(total=4 * len(subjects), disable=not progress, leave=False) as bar:
        for s in subjects:
            models.append(model_card(s, b, out / "card-cache" if out is not None else None, bar))
    result = {"qrobust_card": CARD_FORMAT, "budget": b.to_dict(), "environment": environment(), "models": models,
              "seconds_total": time.perf_counter() - t0, "cpu_seconds_total": time.process_time() - c0}
    if out is not None:
        write(result, out)
    return result


def write(result: dict, out: Path) -> None:
    """``card.json``, the figures ``card-<name>.png``, ``card.md`` and the self-contained ``card.html``."""
    pngs = render.figures(result)
    files = {name: f"card-{name}.png" for name in pngs}
    for name, data in pngs.items():
        atomic_write_bytes(out / files[name], data)
    atomic_write_text(out / "card.json", json.dumps(result, indent=1, allow_nan=True) + "\n")
    atomic_write_text(out / "card.md", render.markdown(result, files))
    atomic_write_text(out / "card.html", render.page(result, pngs))


def card(model, data, *, budget: str | Budget = "quick", float_model: nn.Module | dict | None = None,
         bpda_model: nn.Module | dict | None = None, name: str = "model", out: str | Path | None = None,
         progress: bool = False) -> dict:
    """The robustness card of ``model`` on ``data`` (see docs/card.md for every number).

    ``model``: an ``nn.Module`` taking images in [0, 1] (NCHW, normalisation inside) and returning logits,
    quantized with qrobust or not; or ``{name: module}`` with two entries for two columns side by side.
    ``data``: a qrobust :class:`~qrobust.data.ImageData` or ``(x_train, y_train, x_test, y_test)`` tensors
    (uint8 or float in [0, 1]). ``float_model``: the float model a quantized one came from (the patch-transfer
    source), or ``{name: module}``. ``bpda_model``: a differentiable stand-in for BPDA (default: for qrobust
    models the same weights with quantizers off; none for other models). ``budget``: ``quick`` (~1.5 min of CPU
    time for a Fashion-MNIST convnet) or ``standard`` (~7 min). The models are left as they were
    (mode, weights, global RNG). Returns ``card.json``'s content; ``out`` also writes the files there.
    """
    models = model if isinstance(model, dict) else {name: model}
    if not 1 <= len(models) <= 2:
        raise ConfigError(f"a card shows one or two models, got {len(models)}")

    def pick(value, key: str):
        return value.get(key) if isinstance(value, dict) else value

    subjects = [Subject(str(k), _check_model(m, f"model '{k}'"), data, float_model=pick(float_model, k),
                        float_source="float_model given in Python" if pick(float_model, k) is not None else "",
                        bpda_model=pick(bpda_model, k)) for k, m in models.items()]
    return run_card(subjects, budget, out, progress)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def card_folders(folders: list[str], budget: str = "quick", out: str | Path | None = None,
                 progress: bool = True) -> tuple[dict, Path]:
    """``qrobust card``: the card of one or two run folders / study stages, written into ``out`` (default:
    the run folder; for two, ``<first>/card-vs-<second>``). Returns the card and the folder."""
    get_budget(budget)  # a bad budget or count fails before any model is loaded
    if not 1 <= len(folders) <= 2:
        raise ConfigError(f"a card shows one or two models side by side, got {len(folders)} folders")
    subjects = [from_folder(f) for f in folders]
    if out is None:
        first = split_width(subjects[0].source)[0]
        out = first if len(subjects) == 1 else first / f"card-vs-{_slug(subjects[1].name)}"
    return run_card(subjects, budget, out, progress), Path(out)


__all__ = ["BUDGETS", "CARD_FORMAT", "USER_BUDGETS", "Budget", "Subject", "card", "card_folders", "environment",
           "run_card"]
