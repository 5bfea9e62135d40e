"""The QADT-R study as a :class:`~qrobust.experiment.StudySpec`: trained models in ``prepare``, a grid
of cells (Table 1 rows, Table 2 per defense and width, the gradient and feature analysis), the seed's
tables assembled from the cells' records, the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrobust.experiment import Cell, StudySpec, aggregate_seeds
from qrobust.experiment import run_study as run_engine
from qrobust.studies.qadtr import cells as compute
from qrobust.studies.qadtr.config import StudyConfig
from qrobust.studies.qadtr.defenses import evaluated_widths
from qrobust.studies.qadtr.prepare import prepare
from qrobust.studies.qadtr.report import KINDS, results_markdown, study_figures

TABLES = ("table1", "table2", "gradients", "features", "figures")  # the keys of results.json the cells fill


def _table1_row(ctx: dict, cfg: StudyConfig, source: str, switched: bool = False) -> dict:
    return compute.transfer_row(ctx, cfg, source, cfg.attack.steps, switched)


# What a cell computes, by its ``kind``: ``fn(ctx, cfg, **params) -> record``.
CELL_KINDS: dict[str, Callable[..., dict]] = {
    "table1-clean": compute.table1_clean,
    "table1-row": _table1_row,
    "table1-switched-clean": compute.table1_switched_clean,
    "table2": compute.table2_row,
    "gradients-float": compute.gradients_float,
    "gradients-alignment": compute.gradients_alignment,
    "features": compute.features,
    "steps-curve": compute.steps_curve,
    "size-curve": compute.size_curve,
    "heatmap": compute.heatmap,
}


def _switched(cfg: StudyConfig) -> bool:
    return cfg.attack.table1_switched and 8 in cfg.qat.bits


class QADTRSpec(StudySpec):
    name = "qadtr"
    config_cls = StudyConfig

    def describe(self, cfg: StudyConfig) -> dict:
        return {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data)}

    def prepare(self, cfg: StudyConfig, seed: int, stages: Any) -> tuple[dict, dict]:
        return prepare(cfg, seed, stages)

    def cells(self, cfg: StudyConfig, seed: int) -> list[Cell]:
        grid = [Cell("table1/clean", {"kind": "table1-clean"})]
        grid += [Cell(f"table1/asr/{w}", {"kind": "table1-row", "source": w}) for w in cfg.widths()]
        if _switched(cfg):
            grid.append(Cell("table1/switched/clean", {"kind": "table1-switched-clean"}))
            grid += [Cell(f"table1/switched/asr/{w}", {"kind": "table1-row", "source": w, "switched": True})
                     for w in cfg.widths()]
        grid += [Cell(f"table2/{name}/{width}", {"kind": "table2", "name": name, "width": width})
                 for name in cfg.defense.names for width in evaluated_widths(cfg, name)]
        grid.append(Cell("gradients/float", {"kind": "gradients-float"}))
        grid += [Cell(f"gradients/alignment/{name}", {"kind": "gradients-alignment", "name": name})
                 for name in cfg.defense.names]
        grid.append(Cell("features", {"kind": "features"}))
        if cfg.attack.adaptive and cfg.attack.steps_curve:
            grid += [Cell(f"steps-curve/{name}", {"kind": "steps-curve", "name": name}) for name in cfg.defense.names]
        if cfg.patches.size_curve:
            grid += [Cell(f"size-curve/{w}", {"kind": "size-curve", "width": w}) for w in cfg.widths()]
        if cfg.attack.heatmap_grid:
            grid.append(Cell("heatmap", {"kind": "heatmap"}))
        return grid

    def run_cell(self, cfg: StudyConfig, ctx: dict, cell: Cell) -> dict:
        params = dict(cell.params)
        return CELL_KINDS[params.pop("kind")](ctx, cfg, **params)

    def cell_complete(self, cfg: StudyConfig, cell: Cell, record: dict) -> bool:
        """A Table-2 record must hold every patch spec and attack asked for today (e.g. a record written
        with ``attack.adaptive=false`` lacks the adaptive ASRs)."""
        if cell.params["kind"] != "table2":
            return True
        specs = list(cfg.table2_specs())
        per_spec = record.get("per_spec", {})
        return all(k in per_spec and all(a in per_spec[k] for a in compute.table2_attacks(cfg)) for k in specs)

    def seed_result(self, cfg: StudyConfig, seed: int, summary: dict, records: dict[str, dict]) -> dict:
        """The old per-seed layout: ``table1``, ``table2`` (defense -> width -> row), ``gradients``, ``features``."""
        clean = records["table1/clean"]
        table1 = {"patch": cfg.seen_specs()[0].to_dict(), "image_hw": clean.get("image_hw", [28, 28]),
                  "clean_acc": clean["clean_acc"], "tie_rate": clean["tie_rate"],
                  "asr": {w: records[f"table1/asr/{w}"] for w in cfg.widths()},
                  "random_patch_asr": clean["random_patch_asr"]}
        if _switched(cfg):
            table1["asr_switched"] = {w: records[f"table1/switched/asr/{w}"] for w in cfg.widths()}
            table1 |= records["table1/switched/clean"]
        table2 = {name: {w: with_patched_accuracy(records[f"table2/{name}/{w}"]) for w in evaluated_widths(cfg, name)}
                  for name in cfg.defense.names}
        grads = records["gradients/float"]
        gradients = {"float_vs_quantized": grads["float_vs_quantized"],
                     "defense_width_alignment": {n: records[f"gradients/alignment/{n}"] for n in cfg.defense.names},
                     "num_images": grads["num_images"]}
        figures: dict[str, Any] = {}
        if cfg.attack.adaptive and cfg.attack.steps_curve:
            figures["steps_curve"] = {n: records[f"steps-curve/{n}"] for n in cfg.defense.names}
        if cfg.patches.size_curve:
            figures["size_curve"] = {w: records[f"size-curve/{w}"] for w in cfg.widths()}
        if cfg.attack.heatmap_grid:
            figures["heatmap"] = records["heatmap"]
        return {"seed": seed, **summary, "table1": table1, "table2": table2, "gradients": gradients,
                "features": records["features"], "figures": figures}

    def aggregate(self, cfg: StudyConfig, per_seed: list[dict]) -> dict:
        return {k: aggregate_seeds([r[k] for r in per_seed], average_lists=False) for k in TABLES}

    def report(self, cfg: StudyConfig, results: dict, root: Path) -> str:
        study_figures(cfg, results, root)
        return results_markdown(cfg, results)


SPEC = QADTRSpec()


def with_patched_accuracy(row: dict) -> dict:
    """``row`` plus ``patched_acc_<kind>`` = clean accuracy x (1 - ASR of <kind>): the share of all test images a
    model gets right both clean and under that patch. ASR alone is measured on each model's own clean-correct
    images, so it cannot compare a model that lost clean accuracy with one that did not; this can."""
    return row | {f"patched_acc_{k}": row["clean_acc"] * (1 - row[k]) for k in KINDS if k in row}


def run_study(cfg: StudyConfig, executor: Any = None) -> dict:
    """Run (or resume) every seed of the study on ``executor`` (default: in this process); writes
    ``results.json``, ``results.md`` and the figures."""
    return run_engine(SPEC, cfg, executor)
