"""The study engine on a toy study: caching and resume, incomplete records, the same results on the local
and the Ray executor, errors that keep finished cells."""

import json
import sys
from dataclasses import dataclass, field

import pytest
import torch

from qrobust.config import TrainSection
from qrobust.data import BatchLoader, load_dataset
from qrobust.errors import ConfigError
from qrobust.experiment import Cell, StudyBase, StudySpec, cell_seed, make_executor, run_study
from qrobust.metrics import accuracy
from qrobust.models import model_for_data
from qrobust.train.objectives import CrossEntropy

CALLS: list[str] = []  # what ran in this process (local executor)


@dataclass
class ToyConfig(StudyBase):
    name: str = "toy"
    epochs: int = 1
    noise: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.5])

    def validate(self):
        return self


class Toy(StudySpec):
    name = "toy"
    config_cls = ToyConfig

    def __init__(self, fail_on: str = ""):
        self.fail_on = fail_on

    def describe(self, cfg):
        return {"toy": {"epochs": cfg.epochs}}

    def prepare(self, cfg, seed, stages):
        CALLS.append(f"prepare {seed}")
        data = load_dataset("synthetic")
        torch.manual_seed(seed)
        model = model_for_data("lenet5", data.info)
        train = TrainSection(epochs=cfg.epochs, batch_size=64, lr=0.05)
        x, y = data.test_x[:200], data.test_y[:200]
        model, res = stages.fit("fp32", model, CrossEntropy(), train, {}, lambda: BatchLoader(
            data.train_x, data.train_y, 64, shuffle=True, seed=seed, drop_last=True),
            lambda m: {"test_acc": accuracy(m, x, y)})
        return {"clean": res["test_acc"]}, {"model": model, "x": x.float() / 255, "y": y, "seed": seed}

    def cells(self, cfg, seed):
        return [Cell(f"noise-{n:g}", {"noise": n}) for n in cfg.noise]

    def run_cell(self, cfg, ctx, cell):
        CALLS.append(cell.key)
        if cell.key == self.fail_on:
            raise ConfigError(f"cell {cell.key} failed on purpose")
        g = torch.Generator().manual_seed(cell_seed(0, cell.key))
        x = (ctx["x"] + cell.params["noise"] * torch.randn(ctx["x"].shape, generator=g)).clamp(0, 1)
        return {"acc": accuracy(ctx["model"], x, ctx["y"]), "noise": cell.params["noise"]}

    def cell_complete(self, cfg, cell, record):
        return "noise" in record

    def report(self, cfg, results, root):
        rows = [f"| {k} | {v['acc']['mean']:.3f} |" for k, v in results["cells"].items()]
        return "| cell | acc |\n|---|---|\n" + "\n".join(rows) + "\n"


def _cfg(tmp_path, **kw):
    return ToyConfig(out_root=str(tmp_path), seeds=[0, 1], progress=False, **kw)


def test_local_run_writes_results_and_resumes_without_recomputing(tmp_path):
    CALLS.clear()
    res = run_study(Toy(), _cfg(tmp_path))
    assert CALLS == ["prepare 0", "prepare 1"] + ["noise-0", "noise-0.2", "noise-0.5"] * 2
    assert res["complete"] and set(res["cells"]) == {"noise-0", "noise-0.2", "noise-0.5"}
    assert res["cells"]["noise-0"]["acc"]["n"] == 2
    clean = [json.loads((tmp_path / "toy" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert all(c["clean"] == c["cells"]["noise-0"]["acc"] for c in clean)  # the same 200 test images
    assert (tmp_path / "toy" / "results.md").read_text().startswith("| cell | acc |")
    timings = res["seconds"]["0"]
    assert "prepare" in timings and "cell noise-0.5" in timings
    CALLS.clear()
    again = run_study(Toy(), _cfg(tmp_path))
    assert CALLS == ["prepare 0", "prepare 1"]  # models loaded from their run folders, no cell recomputed
    assert again["cells"] == res["cells"]


def test_results_record_the_environment_the_run_started_with(tmp_path, monkeypatch):
    """A long study may outlive the checkout it started from (commits land while it runs): results.json names
    the code the call started with, not the HEAD at the moment it is written."""
    import qrobust.experiment.engine as engine

    CALLS.clear()  # HEAD "moves" once the study has started work (prepared a seed or run a cell)
    monkeypatch.setattr(engine, "environment", lambda device: {
        "git_commit": "commit-later" if CALLS else "commit-at-start", "device": device})
    res = run_study(Toy(), _cfg(tmp_path))
    assert CALLS  # work was done after the start
    assert res["environment"]["git_commit"] == "commit-at-start"
    assert json.loads((tmp_path / "toy" / "results.json").read_text())["environment"]["git_commit"] == "commit-at-start"


def test_an_incomplete_or_missing_record_is_recomputed_and_only_that(tmp_path):
    run_study(Toy(), _cfg(tmp_path))
    path = tmp_path / "toy" / "seed-1" / "cells.json"
    cells = json.loads(path.read_text())
    del cells["noise-0.2"]["noise"]  # as written before the study asked for this key
    del cells["noise-0.5"]
    path.write_text(json.dumps(cells))
    CALLS.clear()
    run_study(Toy(), _cfg(tmp_path))
    assert CALLS == ["prepare 0", "prepare 1", "noise-0.2", "noise-0.5"]


def test_a_failing_cell_keeps_the_records_before_it(tmp_path):
    with pytest.raises(ConfigError, match="on purpose"):
        run_study(Toy(fail_on="noise-0.5"), _cfg(tmp_path))
    cells = json.loads((tmp_path / "toy" / "seed-0" / "cells.json").read_text())
    assert set(cells) == {"noise-0", "noise-0.2"}
    CALLS.clear()
    run_study(Toy(), _cfg(tmp_path))
    assert CALLS == ["prepare 0", "prepare 1", "noise-0.5", "noise-0", "noise-0.2", "noise-0.5"]  # seed 1 never ran


class _FailsOnSeed1(Toy):
    def run_cell(self, cfg, ctx, cell):
        if ctx["seed"] == 1:
            raise ConfigError("seed 1 fails on purpose")
        return super().run_cell(cfg, ctx, cell)


def test_a_finished_seed_keeps_its_result_when_a_later_seed_fails(tmp_path):
    with pytest.raises(ConfigError, match="seed 1 fails"):
        run_study(_FailsOnSeed1(), _cfg(tmp_path / "fails"))
    partial = tmp_path / "fails" / "toy" / "seed-0" / "results.json"
    assert partial.exists() and not (tmp_path / "fails" / "toy" / "seed-1" / "results.json").exists()
    run_study(Toy(), _cfg(tmp_path / "whole"))
    assert json.loads(partial.read_text()) == json.loads((tmp_path / "whole" / "toy" / "seed-0" / "results.json").read_text())


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ConfigError, match="local, ray"):
        make_executor("spark")


def test_ray_gives_the_same_results_as_local(tmp_path, ray_executor):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    local = run_study(Toy(), _cfg(tmp_path / "local"))
    remote = run_study(Toy(), _cfg(tmp_path / "ray"), ray_executor)
    assert remote["executor"] == "ray" and local["executor"] == "local"
    assert remote["cells"] == local["cells"]
    for seed in (0, 1):
        a, b = (json.loads((tmp_path / k / "toy" / f"seed-{seed}" / "results.json").read_text()) for k in ("local", "ray"))
        assert a == b
    with pytest.raises(ConfigError, match="on purpose"):  # a task's own error reaches the driver
        run_study(Toy(fail_on="noise-0.2"), _cfg(tmp_path / "ray2"), ray_executor)


class _WaitsForSeed0(Toy):
    """Seed 1's ``prepare`` waits until a cell of seed 0 has run: it can only finish if seed 0's cells
    start before every seed is prepared (with two CPUs, both ``prepare`` tasks hold one each)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def prepare(self, cfg, seed, stages):
        import pathlib
        import time

        if seed == 1:
            deadline = time.monotonic() + 120
            while not pathlib.Path(self.marker).exists():
                if time.monotonic() > deadline:
                    raise ConfigError("seed 0's cells never started while seed 1 was preparing")
                time.sleep(0.1)
        return super().prepare(cfg, seed, stages)

    def run_cell(self, cfg, ctx, cell):
        import pathlib

        if ctx["seed"] == 0:
            pathlib.Path(self.marker).touch()
        return super().run_cell(cfg, ctx, cell)


def test_ray_starts_a_seeds_cells_before_the_other_seeds_are_prepared(tmp_path, ray_executor):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = run_study(_WaitsForSeed0(str(tmp_path / "seed0-cell-ran")), _cfg(tmp_path / "ray"), ray_executor)
    assert (tmp_path / "seed0-cell-ran").exists()
    assert set(out["cells"]) == {"noise-0", "noise-0.2", "noise-0.5"}


def test_ray_reports_a_failed_prepare_with_its_own_error(tmp_path, ray_executor):
    import ray

    class FailsToPrepare(Toy):
        def prepare(self, cfg, seed, stages):
            if seed == 1:
                raise ConfigError("seed 1 cannot be prepared, on purpose")
            return super().prepare(cfg, seed, stages)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(ConfigError, match="seed 1 cannot be prepared"):
        run_study(FailsToPrepare(), _cfg(tmp_path / "ray"), ray_executor)


def test_every_call_is_logged_with_the_cpu_that_ran_each_cell(tmp_path, monkeypatch):
    """calls.json keeps one entry per call (environment, executor, each finished cell with its CPU); a study
    resumed on another CPU says so in results.json, results.md and `qrobust status`, not silently."""
    import qrobust.experiment.engine as engine
    from qrobust.experiment.status import format_status, study_status

    monkeypatch.setattr(engine, "cpu_name", lambda: "CPU A")
    first = run_study(Toy(), _cfg(tmp_path))
    folder = tmp_path / "toy"
    calls = json.loads((folder / "calls.json").read_text())
    assert len(calls) == 1 and calls[0]["executor"] == "local" and "finished" in calls[0]
    assert {"git_commit", "cpu", "torch"} <= set(calls[0]["environment"])
    assert sorted((c["seed"], c["cell"]) for c in calls[0]["cells"]) == sorted(
        (s, f"noise-{n:g}") for s in (0, 1) for n in (0.0, 0.2, 0.5))
    assert first["cells_by_cpu"] == {"CPU A": 6} and first["calls"][0]["cells_run"] == 6
    assert "## Where it ran" in (folder / "results.md").read_text()
    assert "different CPUs" not in (folder / "results.md").read_text()
    # seed 1 loses two records; the resume runs them on another machine
    path = folder / "seed-1" / "cells.json"
    cells = json.loads(path.read_text())
    del cells["noise-0.2"], cells["noise-0.5"]
    path.write_text(json.dumps(cells))
    monkeypatch.setattr(engine, "cpu_name", lambda: "CPU B")
    again = run_study(Toy(), _cfg(tmp_path))
    calls = json.loads((folder / "calls.json").read_text())
    assert [len(c["cells"]) for c in calls] == [6, 2]
    assert {c["cpu"] for c in calls[1]["cells"]} == {"CPU B"} and {c["seed"] for c in calls[1]["cells"]} == {1}
    assert again["cells_by_cpu"] == {"CPU A": 6, "CPU B": 2} and len(again["calls"]) == 2
    report = (folder / "results.md").read_text()
    assert "ran on 2 different CPUs" in report and "CPU A: 6, CPU B: 2" in report
    text = format_status("toy", study_status(Toy(), _cfg(tmp_path), folder))
    assert "calls so far: 2" in text and "more than one CPU" in text


def test_a_corrupt_call_log_stops_the_study_and_keeps_the_cells(tmp_path):
    """calls.json only records provenance: corrupt, it is reported as corrupt with the fix (delete it) and
    the finished cells are kept and reused after that."""
    run_study(Toy(), _cfg(tmp_path))
    folder = tmp_path / "toy"
    cells_before = (folder / "seed-0" / "cells.json").read_text()
    (folder / "calls.json").write_text("{not json")
    with pytest.raises(ConfigError, match="calls.json is corrupt.*delete it"):
        run_study(Toy(), _cfg(tmp_path))
    assert (folder / "seed-0" / "cells.json").read_text() == cells_before
    (folder / "calls.json").write_text('{"a": 1}')  # valid JSON, not a list of calls
    with pytest.raises(ConfigError, match="not a list of calls"):
        run_study(Toy(), _cfg(tmp_path))
    (folder / "calls.json").unlink()
    CALLS.clear()
    run_study(Toy(), _cfg(tmp_path))
    assert CALLS == ["prepare 0", "prepare 1"]  # no cell recomputed
    assert len(json.loads((folder / "calls.json").read_text())) == 1


def test_a_folder_holding_only_config_and_call_log_may_be_taken_over(tmp_path):
    """A start that failed before its first result leaves config.toml and calls.json: nothing to lose, so a
    corrected command runs there; a folder that also holds a result is refused."""
    from qrobust.errors import RunFolderError
    from qrobust.runs import RunDir

    RunDir(tmp_path / "run", {"lr": 0.1})
    (tmp_path / "run" / "calls.json").write_text("[]")
    RunDir(tmp_path / "run", {"lr": 0.2})  # taken over
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(RunFolderError, match="different run"):
        RunDir(tmp_path / "run", {"lr": 0.3})
