"""The study engine: a study is a specification (:class:`StudySpec`: settings, trained models, a grid of
cells, a report); :func:`run_study` owns caching and resume, scheduling (local or Ray), timings,
progress, seed aggregation and atomic writes. See docs/ARCHITECTURE.md, "How to add a study"."""

from qrobust.experiment.aggregate import aggregate_seeds, is_stat, mean_std
from qrobust.experiment.engine import run_study
from qrobust.experiment.executors import EXECUTORS, LocalExecutor, RayExecutor, make_executor
from qrobust.experiment.settings import (
    PRESETS,
    QAT_EDGES,
    DataSection,
    FloatSection,
    StudyBase,
    act_range_tag,
    load_study,
    open_study,
    study_preset,
    study_toml,
)
from qrobust.experiment.spec import Cell, StudySpec, cell_seed
from qrobust.experiment.stages import CellStore, Stages

__all__ = [
    "EXECUTORS", "PRESETS", "QAT_EDGES", "Cell", "CellStore", "DataSection", "FloatSection", "LocalExecutor", "RayExecutor", "Stages", "StudyBase", "StudySpec",
    "act_range_tag", "aggregate_seeds", "cell_seed", "is_stat", "load_study", "make_executor", "mean_std", "open_study",
    "run_study", "study_preset", "study_toml",
]
