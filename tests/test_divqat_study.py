"""The DivQAT extraction study end to end: the smoke preset through the CLI (files, keys, value ranges,
ledger == queries, resume re-uses stored cells and models, mean ± std over its two seeds), the same
results on Ray, a cell that leaves its context as found, config errors, and the paper preset for a few
steps on synthetic data of the paper's shape."""

import json
import math
import statistics
from itertools import pairwise

import pytest
import torch

from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.experiment import Cell
from qrobust.experiment import stages as engine_stages
from qrobust.experiment.engine import RUN_KEYS, seed_stages
from qrobust.studies.divqat import SPEC, DivQATSpec, cell_plan, load_study_config, preset_path, run_study
from qrobust.studies.divqat.report import (
    _short_label,
    mean_error_gains,
    mean_gain_sentence,
    mean_history,
    query_panels,
    results_markdown,
)
from qrobust.studies.divqat.spec import aggregate
from qrobust.studies.divqat.victims import select_operating_point

VICTIMS = ["qat-server", "qat-mobile", "divqat-0.1-server", "divqat-op-server"]
N_CELLS = len(VICTIMS) * (5 + 4 + 4)  # none: 5 attacks; rs, dcp: knockoff, defense-aware, DFME, MAZE


def _numbers(results: dict) -> str:
    """``results.json`` without timing/executor keys, as text (NaN compares equal to NaN)."""
    return json.dumps({k: v for k, v in results.items() if k not in RUN_KEYS}, sort_keys=True)


def _smoke(out, *extra):
    return ["run", "divqat", "--preset", "smoke", "--no-progress", f"out_root={out}", "name=smoke", *extra]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke preset (2 seeds) through the CLI; returns its folder and results.json as written."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        assert main(_smoke(root)) == 0  # the preset's threads=1 applies to this process
    finally:
        torch.set_num_threads(threads)
    out = root / "smoke"
    return out, json.loads((out / "results.json").read_text())


def test_study_writes_results_tables_and_figures(study):
    out, _ = study
    for name in ("config.toml", "results.json", "results.md", "defender_vs_clone.png", "clone_vs_queries.png",
                 "divqat_transition.png"):
        assert (out / name).is_file(), name
    seed = out / "seed-0"
    for name in ("victims.json", "defenses.json", "cells.json", "results.json", "timings.json"):
        assert (seed / name).is_file(), name
    for model in ("fp32", *VICTIMS[:-1], "divqat-0.5-server"):  # the operating point is one of the sweep's
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (out / "results.md").read_text()
    for text in ("QAT (server)", "QAT (mobile)", "DivQAT(α=0.1, server)", "KnockoffNets (hard label)", "DFME",
                 "MAZE", "noise floor", "far below the papers'", "mean KL(f_q", "| dcp |", "| rs |",
                 "KnockoffNets (defense-aware)", "| ECE | NLL |", "DivQAT op. point", "## DivQAT's operating point"):
        assert text in md, text


def test_results_keys_and_value_ranges(study):
    _, res = study
    assert res["executor"] == "local" and res["transfer_set"] == "synthetic (attacker split)"
    assert res["splits"] == {"attacker": 153, "val": 51, "victim": 256, "test": 64}
    assert set(res["victims"]) == {"fp32", *VICTIMS}
    for name, meta in res["victims"].items():
        assert 0 <= meta["test_acc"]["mean"] <= 1
        assert meta["kl_to_fp"]["mean"] >= 0
        assert (meta["kl_to_fp"]["mean"] == 0) == (name == "fp32")
    cfg = load_study_config(preset_path("smoke"))
    plan = cell_plan(cfg)
    assert len(plan) == N_CELLS
    for victim, defense, attack in plan:
        cell = res["cells"][victim][defense][attack]
        for key in ("defender_acc", "clone_acc", "agreement"):
            assert 0 <= cell[key]["mean"] <= 1, (victim, defense, attack, key)
        assert 0 <= cell["l1"]["mean"] <= 2
        assert cell["ledger_matches_queries"]
        assert 0 < cell["queries_used"]["mean"] <= {"dfme": 48, "maze": 48}.get(attack, 64)
        if defense != "none" and attack != "knockoff-hard":
            assert cell["l1"]["mean"] <= 0.6 + 0.15  # calibrated on validation, measured on test
    for victim in VICTIMS:
        for defense in ("rs", "dcp"):
            assert res["defenses"][victim][defense]["l1_val"]["mean"] <= 0.6 + 1e-9
        for defense in ("none", "rs", "dcp"):
            row = res["defenses"][victim][defense]
            assert 0 <= row["ece"]["mean"] <= 1 and row["nll"]["mean"] > 0, (victim, defense)
    assert set(res["error_gain_over_qat"]) == {"divqat-0.1-server", "divqat-op-server"}
    gains = res["error_gain_over_qat"]["divqat-0.1-server"]["none"]
    assert set(gains) == {"knockoff", "knockoff-hard", "dfme", "maze", "noise"}
    assert all(-1 <= g <= 1 for g in gains.values())
    assert {"prepare", "victims", "defenses", "cell qat-server/none/knockoff"} <= set(res["seconds"]["0"])


def test_ledger_equals_queries_in_every_stored_cell(study):
    out, _ = study
    cells = json.loads((out / "seed-0" / "cells.json").read_text())
    assert len(cells) == N_CELLS
    for key, cell in cells.items():
        assert sum(cell["ledger"].values()) == cell["queries_used"] == cell["victim_ledger_total"], key
        counts = cell["independent_counts"]  # counted where the rows are computed, not from the ledger
        assert counts["model_rows"] == counts["defense_rows"] == cell["queries_used"] and cell["counts_agree"], key
        assert cell["queries_used"] <= cell["budget"]
        assert all(math.isfinite(a) for _, a in cell["history"] if a is not None)
    # KnockoffNets' curve: a ladder of budgets (knockoff.ladder = 1: half the budget, then all of it)
    assert [q for q, _ in cells["qat-server/none/knockoff"]["history"]] == [32, 64]


def test_the_query_count_check_can_fail(study):
    out, _ = study
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert aggregate(per_seed)["cells"]["qat-server"]["rs"]["dfme"]["ledger_matches_queries"]
    per_seed[1]["cells"]["qat-server"]["rs"]["dfme"]["counts_agree"] = False  # e.g. rows computed off the ledger
    agg = aggregate(per_seed)
    assert not agg["cells"]["qat-server"]["rs"]["dfme"]["ledger_matches_queries"]
    assert agg["cells"]["qat-server"]["rs"]["maze"]["ledger_matches_queries"]
    cfg = load_study_config(preset_path("smoke"))
    full = SPEC.aggregate(cfg, per_seed) | {"seconds": {}}
    md = results_markdown(cfg, full, full["error_gain_over_qat"], 2, 0.0, full["splits"], full["transfer_set"])
    assert "in every cell: **NO**" in md


def test_the_noise_floor_is_left_out_of_the_mean_error_gain():
    cfg = load_study_config(preset_path("smoke"))
    gains = {"divqat-0.1-server": {"none": {"knockoff": 0.02, "noise": 0.5}, "rs": {"knockoff": 0.04}}}
    mean = mean_error_gains(cfg, gains)
    assert mean == pytest.approx({"knockoff": 0.03}) and "noise" not in mean


def test_the_mean_gain_sentence_says_when_no_attack_gives_one():
    cfg = load_study_config(preset_path("smoke"))
    assert mean_gain_sentence(cfg, {"divqat-0.1-server": {"none": {"knockoff": 0.02, "noise": 0.5}}}).endswith(
        "in points: KnockoffNets +2.0.")
    only_noise = mean_gain_sentence(cfg, {"divqat-0.1-server": {"none": {"noise": 0.5}}})
    assert only_noise.endswith("none: no attack other than a reference ran on a DivQAT victim.")


def test_the_operating_point_is_the_largest_kl_within_the_accuracy_cost():
    sweep = [  # a tiny fake sweep: flat, then a run-away KL with a collapse of accuracy, epoch by epoch
        {"alpha": 0.1, "epoch": 1, "acc": 0.90, "kl": 0.010}, {"alpha": 0.1, "epoch": 2, "acc": 0.91, "kl": 0.011},
        {"alpha": 0.5, "epoch": 1, "acc": 0.89, "kl": 0.020}, {"alpha": 0.5, "epoch": 2, "acc": 0.875, "kl": 0.200},
        {"alpha": 0.6, "epoch": 1, "acc": 0.83, "kl": 0.900}, {"alpha": 0.6, "epoch": 2, "acc": 0.16, "kl": 5.000},
    ]
    op = select_operating_point(sweep, acc_qat=0.905, kl_qat=0.009, max_acc_cost=3.66)
    assert op == {"alpha": 0.5, "epoch": 2, "kl": 0.2, "kl_qat": 0.009, "acc": 0.875, "acc_qat": 0.905,
                  "within_cost": True}
    # a tighter cost excludes that checkpoint; a cost nothing meets returns the most accurate, flagged
    tight = select_operating_point(sweep, 0.905, 0.009, 2.0)
    assert (tight["alpha"], tight["epoch"], tight["within_cost"]) == (0.5, 1, True)
    none = select_operating_point(sweep, 0.99, 0.009, 1.0)
    assert (none["alpha"], none["epoch"], none["within_cost"]) == (0.1, 2, False)


def test_results_hold_the_operating_point_per_seed(study):
    out, res = study
    for seed in ("0", "1"):
        op = res["divqat_operating_point"][seed]
        assert set(op) == {"alpha", "epoch", "kl", "kl_qat", "acc", "acc_qat", "within_cost"}
        assert op["alpha"] in (0.1, 0.5) and op["epoch"] == 1
        sweep = res["divqat_sweep"][seed]
        assert {(r["alpha"], r["epoch"]) for r in sweep} == {(0.1, 1), (0.5, 1)}
        chosen = next(r for r in sweep if (r["alpha"], r["epoch"]) == (op["alpha"], op["epoch"]))
        assert (chosen["kl"], chosen["acc"]) == (op["kl"], op["acc"])
        per_seed = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert per_seed["divqat_operating_point"] == op
        assert per_seed["victims"]["divqat-op-server"]["alpha"] == op["alpha"]


def test_ray_gives_the_same_results_as_local(study, tmp_path, ray_executor):
    out, local = study
    cfg = load_study_config(preset_path("smoke"), [f"out_root={tmp_path}", "name=smoke", "progress=false"])
    threads = torch.get_num_threads()
    try:
        remote = run_study(cfg, executor=ray_executor)
    finally:
        torch.set_num_threads(threads)
    assert remote["executor"] == "ray"
    assert _numbers(remote) == _numbers(local)
    for seed in (0, 1):  # per seed: victims, defenses and every cell record (cells.json in arrival order)
        for name in ("results.json", "cells.json", "victims.json", "defenses.json"):
            ray_file, local_file = (root / f"seed-{seed}" / name for root in (tmp_path / "smoke", out))
            assert _numbers(json.loads(ray_file.read_text())) == _numbers(json.loads(local_file.read_text())), name


def test_a_cell_seeds_itself_and_leaves_its_context_and_the_rng_as_found(study):
    out, _ = study
    cfg = load_study_config(preset_path("smoke"), [f"out_root={out.parent}", "name=smoke", "progress=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels of the stored run
    try:
        _, ctx = SPEC.prepare(cfg, 0, seed_stages(SPEC, cfg, out, 0))  # the trained victims, loaded
        models = ctx["models"]
        state = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
        modes = {n: [m.training for m in model.modules()] for n, model in models.items()}
        rng = torch.get_rng_state()
        key = "qat-server/dcp/maze"
        record = SPEC.run_cell(cfg, ctx, Cell(key, dict(zip(("victim", "defense", "attack"), key.split("/"), strict=True))))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, model in models.items():
        assert [m.training for m in model.modules()] == modes[name], name
        assert all(torch.equal(v, state[name][k]) for k, v in model.state_dict().items()), name
    # the same record as in the uninterrupted run: per-cell seed, and loaded victims in training's memory format
    assert record == json.loads((out / "seed-0" / "cells.json").read_text())[key]


def test_resume_reuses_stored_cells_and_models(study, monkeypatch, capsys):
    out, _ = study
    cells_file = out / "seed-0" / "cells.json"
    cells = json.loads(cells_file.read_text())
    dropped = "qat-server/rs/dfme"
    kept = cells.pop(dropped)
    cells_file.write_text(json.dumps(cells))
    calls = []
    original = DivQATSpec.run_cell

    def spy(self, cfg, ctx, cell):
        calls.append(cell.key)
        return original(self, cfg, ctx, cell)

    monkeypatch.setattr(DivQATSpec, "run_cell", spy)
    monkeypatch.setattr(engine_stages, "fit", lambda *a, **k: pytest.fail("a finished victim was retrained"))
    threads = torch.get_num_threads()
    try:
        assert main(_smoke(out.parent)) == 0
    finally:
        torch.set_num_threads(threads)
    assert calls == [dropped]  # only the missing cell ran again
    printed = capsys.readouterr().out  # the report is printed, then where the files are
    assert "| victim | defense | defender acc |" in printed and printed.rstrip().endswith("PNGs)")
    assert json.loads(cells_file.read_text())[dropped] == kept  # per-cell seeds: the same clone again


def test_config_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="alphas must all be > 0"):
        load_study_config(preset_path("quick"), ["divqat.alphas=[0.0]"])
    with pytest.raises(ConfigError, match="add it to qat.backends"):
        load_study_config(preset_path("quick"), ["qat.backends=['mobile']"])
    with pytest.raises(ConfigError, match="unknown attack"):
        load_study_config(preset_path("quick"), ["attack.names=['jbda']"])
    with pytest.raises(ConfigError, match="sum to <= 1"):
        load_study_config(preset_path("quick"), ["data.victim_fraction=0.9"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_study_config(preset_path("quick"), ["divqat.alpha=0.1"])
    with pytest.raises(ConfigError, match="model.width must be >= 1"):
        load_study_config(preset_path("quick"), ["model.width=0"])
    assert main(["run", "divqat", "--preset", "quick", "divqat.alphas=[-1]", f"out_root={tmp_path}"]) == 2
    # a transfer set smaller than the KnockoffNets budget stops before any victim is trained
    assert main(_smoke(tmp_path, "knockoff.queries=1000")) == 2
    assert not list(tmp_path.glob("smoke/seed-0/models/*/checkpoint.pt"))
    for preset in ("smoke", "quick", "full", "paper"):
        assert load_study_config(preset_path(preset)).name == f"divqat-{preset}"


def test_a_study_folders_config_repeats_that_run(study):
    """``--config runs/<study>/config.toml``: the engine's additions ([meta], quant_edges) are dropped and the
    settings come back as the run used them (here: the smoke preset, with its out_root and name; threads
    and progress are how a run ran, not what it computed, and are not stored)."""
    out, _ = study
    text = (out / "config.toml").read_text()
    assert "quant_edges" in text and "[meta]" in text  # what would otherwise be unknown keys
    again = load_study_config(out / "config.toml")
    ran = load_study_config(preset_path("smoke"), [f"out_root={out.parent}", "name=smoke"])
    how = ("threads", "progress")
    assert {k: v for k, v in again.to_dict().items() if k not in how} == {
        k: v for k, v in ran.to_dict().items() if k not in how}
    with pytest.raises(ConfigError, match="unknown config key 'divqat.alpha'"):  # a user's typo is still caught
        load_study_config(out / "config.toml", ["divqat.alpha=0.1"])


def test_two_seeds_give_mean_and_std_of_the_per_seed_results(study, seed_statistics):
    out, res = study
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert res["seeds"] == [0, 1]
    assert seed_statistics(res["cells"], [r["cells"] for r in per_seed]) >= len(VICTIMS) * 3
    assert seed_statistics(res["victims"], [r["victims"] for r in per_seed]) >= len(VICTIMS)
    # the seeds really differ (else "± 0.0" would hide a seed that is ignored)
    accs = [r["victims"]["fp32"]["test_acc"] for r in per_seed]
    assert accs[0] != accs[1]
    assert "±" in (out / "results.md").read_text()
    # DivQAT-vs-QAT gains paired by seed: the bracket's std is that of the per-seed differences
    op, qat = ([r["cells"][v]["none"]["knockoff"]["clone_acc"] for r in per_seed] for v in ("divqat-op-server", "qat-server"))
    assert res["cells"]["divqat-op-server"]["none"]["knockoff"]["clone_acc_per_seed"] == op
    diffs = [100 * (q - d) for q, d in zip(qat, op, strict=True)]
    bracket = f"({statistics.fmean(diffs):+.1f} ± {statistics.stdev(diffs):.1f})"
    row = next(line for line in (out / "results.md").read_text().splitlines()
               if line.startswith("| DivQAT op. point") and "| none |" in line)
    assert bracket in row.split(" | ")[6], (bracket, row)  # the KnockoffNets column


# The paper preset (ResNet-18 victims and clones, CIFAR-10 victims, CIFAR-100 transfer set, DFME/MAZE
# generators of the paper's size, the float model attacked too) for a few steps on synthetic data of
# the paper's shape. Shrunk: epochs, batch sizes, data subsets, budgets; one seed, one alpha and no output
# defense: a fake-quantized ResNet-18 forward costs ~0.1 s on one CPU thread, every cell makes several,
# and the grid is a product (each defense would add 3 cells per victim). RS and DCP see only the victims'
# 10-class probabilities, whatever the architecture; the smoke preset runs both.
PAPER_ON_CPU = [
    "device=cpu", "seeds=[0]", "divqat.alphas=[0.1]", "defense.names=['none']",
    "data.name=synthetic-cifar10", "data.transfer=synthetic-cifar100", "data.transfer_subset=8",
    "data.victim_fraction=0.02", "data.attacker_fraction=0.01", "data.val_fraction=0.02", "data.test_subset=2",
    "fp.epochs=1", "fp.batch_size=8", "qat.epochs=1", "divqat.epochs=1", "divqat.max_acc_drop=1.0",
    "knockoff.queries=4", "knockoff.epochs=1", "knockoff.batch_size=4",
    "dfme.queries=6", "dfme.batch_size=2", "dfme.clone_steps=1",
    "maze.queries=24", "maze.batch_size=2", "maze.clone_steps=1", "maze.replay_steps=1",
]


def test_paper_preset_runs_end_to_end_on_synthetic_data_of_its_shape(tmp_path):
    cfg = load_study_config(preset_path("paper"), PAPER_ON_CPU)
    assert (cfg.model.arch, cfg.model.clone_arch, cfg.attack.attack_float) == ("resnet18", "resnet18", True)
    assert (cfg.dfme.generator_width, cfg.maze.num_directions, cfg.qat.backends) == (64, 10, ["server", "mobile"])
    threads = torch.get_num_threads()
    try:
        assert main(["run", "divqat", "--preset", "paper", "--no-progress", "--out", str(tmp_path / "p"),
                     *PAPER_ON_CPU]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(res["victims"]) == {"fp32", "qat-server", "qat-mobile", "divqat-0.1-server"}
    assert res["transfer_set"] == "synthetic-cifar100"
    assert sum(len(per_a) for per_d in res["cells"].values() for per_a in per_d.values()) == 4 * 5
    for attack in ("knockoff", "knockoff-hard", "dfme", "maze", "noise"):
        assert res["cells"]["fp32"]["none"][attack]["queries_used"]["mean"] > 0, attack
    assert "| float | none |" in (tmp_path / "p" / "results.md").read_text()


def test_the_hinge_variant_is_searched_and_attacked_at_the_same_accuracy_cost(tmp_path):
    """Beyond the paper: DivQAT-hinge (divqat.hinge_cap) over the same alphas and epochs, the same cost."""
    extra = ["seeds=[0]", "attack.names=['knockoff']", "defense.names=['none']", "divqat.hinge_cap=0.02"]
    threads = torch.get_num_threads()
    try:
        assert main(_smoke(tmp_path, *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())
    assert {"divqat-op-server", "divqat-hinge-op-server"} <= set(res["victims"])
    assert res["victims"]["divqat-hinge-op-server"]["kl_cap"] == 0.02
    hinge, paper = res["divqat_hinge_operating_point"]["0"], res["divqat_operating_point"]["0"]
    assert hinge["acc_qat"] == paper["acc_qat"] and hinge["kl_qat"] == paper["kl_qat"]  # one reference
    assert {(r["alpha"], r["epoch"]) for r in res["divqat_hinge_sweep"]["0"]} == {(0.1, 1), (0.5, 1)}
    assert (out / "seed-0" / "models" / "divqat-hinge-0.5-server" / "epoch-1.pt").is_file()
    assert res["cells"]["divqat-hinge-op-server"]["none"]["knockoff"]["queries_used"]["mean"] > 0
    md = (out / "results.md").read_text()
    assert "DivQAT-hinge op. point, beyond paper" in md and "| DivQAT-hinge (beyond paper) | 0 |" in md
    with pytest.raises(ConfigError, match="needs divqat.search_alphas"):
        load_study_config(preset_path("smoke"), ["divqat.search_alphas=[]", "divqat.hinge_cap=0.1"])


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_zeroth_order_budget_script_reuses_the_victims_and_leaves_the_study_alone(study, tmp_path):
    """benchmarks/zeroth_order_budget.py: at the study's own budget a DFME cell gives the study's numbers
    (same victims, same cell seed); at another budget the cells spend that budget; the study folder is
    not written; two shards together run every DFME/MAZE cell once."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zeroth_order_budget.py"
    spec = importlib.util.spec_from_file_location("zeroth_order_budget", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, _ = study
    before = _tree(out)
    threads = torch.get_num_threads()
    try:
        script.main([str(out), "--out", str(tmp_path / "same"), "attack.zeroth_order_victims=[\"qat-server\"]",
                     "attack.zeroth_order_defenses=[\"none\"]"])
        for shard in ("0/2", "1/2"):
            script.main([str(out), "--out", str(tmp_path / "more"), "--shard", shard, "dfme.queries=96",
                         "maze.queries=96"])
    finally:
        torch.set_num_threads(threads)
    assert _tree(out) == before
    same = json.loads((tmp_path / "same" / "records-0of1.json").read_text())
    assert sorted(same) == ["0@qat-server/none/dfme", "0@qat-server/none/maze", "1@qat-server/none/dfme",
                            "1@qat-server/none/maze"]
    stored = json.loads((out / "seed-0" / "cells.json").read_text())["qat-server/none/dfme"]
    # the same cell on the same victim: equal up to kernel rounding of a loaded vs trained model (one test image)
    assert abs(same["0@qat-server/none/dfme"]["clone_acc"] - stored["clone_acc"]) <= 1 / 64 + 1e-9
    assert same["0@qat-server/none/dfme"]["queries_used"] == stored["queries_used"]
    more = {}
    for shard in (0, 1):
        more |= json.loads((tmp_path / "more" / f"records-{shard}of2.json").read_text())
    zeroth_order_cells = [key for key in cell_plan(load_study_config(preset_path("smoke"))) if key[2] in ("dfme", "maze")]
    assert len(more) == 2 * len(zeroth_order_cells)  # two seeds, every cell once over the two shards
    assert all(r["queries_used"] > 48 and r["queries_used"] <= 96 and r["counts_agree"] for r in more.values())
    summary = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert all(row["seeds"] == 2 for row in summary.values())
    for cell, row in summary.items():  # mean +- sample std over the two seeds' records, in points
        values = [100 * more[f"{s}@{cell}"]["clone_acc"] for s in (0, 1)]
        assert row["clone_acc"]["values"] == pytest.approx(values) and row["clone_acc"]["n"] == 2
        assert row["clone_acc"]["mean"] == pytest.approx(sum(values) / 2)
        assert row["clone_acc"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    # every DivQAT victim's gain over QAT-server (the smoke study's backend), paired by seed from the records
    divqat_cells = [cell for cell in summary if cell.startswith("divqat-")]
    assert divqat_cells and all("gain" not in row for cell, row in summary.items() if cell.startswith("qat-server/"))
    for cell in divqat_cells:
        gain, rest = summary[cell]["gain"], cell.split("/", 1)[1]
        expected = [100 * (more[f"{s}@qat-server/{rest}"]["clone_acc"] - more[f"{s}@{cell}"]["clone_acc"]) for s in (0, 1)]
        assert gain["seeds"] == [0, 1] and gain["values"] == pytest.approx(expected)
        assert gain["mean"] == pytest.approx(sum(expected) / 2)
    assert "gain, paired (per seed)" in (tmp_path / "more" / "summary.md").read_text()
    # a study whose attacks held no DFME/MAZE: a clear error naming the fix, not an empty table
    with pytest.raises(SystemExit, match="attack.names"):
        script.main([str(out), "--out", str(tmp_path / "none"), "attack.names=[\"knockoff\"]"])
    assert not (tmp_path / "none" / "summary.json").exists()


def test_dcp_answers_script_reports_what_the_defense_does_to_each_probe_set(study, capsys):
    """benchmarks/dcp_answers.py on the smoke study: one row per probe set, rates in [0, 1], a reversed tail
    scores rho = -1, and a victim or seed the folder lacks is a clear error (exit 2), not a traceback."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dcp_answers.py"
    spec = importlib.util.spec_from_file_location("dcp_answers", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    reversed_tail = torch.tensor([[0.4, 0.1, 0.2, 0.3]], dtype=torch.float64)
    stats = script.answer_stats(p, reversed_tail, threshold=0.6)
    assert stats["tail_rho"] == pytest.approx(-1.0) and stats["flip"] == 0.0 and stats["gate"] == 1.0
    assert stats["margin_defended"] == pytest.approx(0.1) and stats["l1"] == pytest.approx(0.6)
    # the recorder answers as the defense does and weights each window's statistics by its rows
    recorder = script.RecordingDefense(lambda q: q.flip(1), threshold=0.6)
    assert torch.equal(recorder(p), p.flip(1))
    recorder(torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 3, dtype=torch.float64))
    windows = recorder.windows((0.0, 0.25, 1.0))
    assert [(w["from"], w["to"], w["rows"]) for w in windows] == [(0, 1, 1), (1, 4, 3)]
    assert windows[0]["gate"] == 1.0 and windows[1]["gate"] == 0.0
    out, _ = study
    threads = torch.get_num_threads()
    try:
        capsys.readouterr()
        assert script.main([str(out), "--seed", "1", "--victim", "qat-server"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
        assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["test images", "uniform noise", "test 0.5 + noise 0.5",
                                                             "DFME generator (untrained)", "MAZE generator (untrained)"]
        for row in rows[1:]:
            _, conf, gate, flip, l1, rho, _ = row.strip("| ").split(" | ")
            assert 0 <= float(gate) <= 1 and 0 <= float(flip) <= 1 and 0 <= float(l1) <= 2 and -1 <= float(rho) <= 1
        # --attack: the same statistics over the attack's own queries, in windows that cover all its rows
        assert script.main([str(out), "--seed", "1", "--victim", "qat-server", "--attack", "maze",
                            "--queries", "3000"]) == 0
        text = capsys.readouterr().out
        assert "MAZE on the dcp-defended victim, 3000 queries" in text and "clone accuracy" in text
        windows = [line for line in text.split("| its queries |")[1].splitlines() if line.startswith("| ")
                   and "---" not in line]
        spans = [tuple(int(x) for x in w.split(" | ")[0][2:].split("-")) for w in windows]
        assert len(spans) >= 2 and spans[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(spans))
        assert 0 < spans[-1][1] <= 3000
        assert script.main([str(out), "--seed", "1", "--victim", "qat-nowhere"]) == 2
        assert script.main([str(out), "--seed", "7"]) == 2
        assert "defenses.json" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_status_says_what_is_done_and_what_is_left(study, tmp_path, capsys):
    """``qrobust status``: a finished folder is complete; with cells removed (a run stopped midway) it lists
    them by kind and estimates their time from the finished cells of the same kind; it writes nothing; a
    folder without a study or with a corrupt cells.json is a clear error (exit 2)."""
    import shutil

    out, _ = study
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "study 'divqat'" in text and "complete:" in text
    assert text.count(f"{len(cell_plan(load_study_config(preset_path('smoke'))))}/") == 2  # n/n on both seeds
    partial = tmp_path / "smoke"
    shutil.copytree(out, partial)
    (partial / "results.json").unlink()
    cells = json.loads((partial / "seed-1" / "cells.json").read_text())
    removed = ["qat-server/none/dfme", "qat-server/rs/knockoff", "qat-mobile/none/knockoff"]
    for key in removed:
        del cells[key]
    (partial / "seed-1" / "cells.json").write_text(json.dumps(cells))
    before = _tree(partial)
    assert main(["status", str(partial), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert _tree(partial) == before
    assert not status["complete"]
    assert status["seeds"]["0"]["left"] == 0 and status["seeds"]["1"]["left"] == 3
    assert status["seeds"]["1"]["left_by_kind"] == {"dfme": 1, "knockoff": 2}
    per_kind = status["seconds_per_cell_by_kind"]
    assert status["estimated_seconds_left"] == pytest.approx(per_kind["dfme"] + 2 * per_kind["knockoff"])
    assert main(["status", str(partial)]) == 0
    assert "left: dfme 1, knockoff 2" in capsys.readouterr().out
    (partial / "seed-0" / "cells.json").write_text("{not json")
    assert main(["status", str(partial)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "no config.toml" in capsys.readouterr().err


def test_clone_vs_queries_has_a_panel_per_attack_and_defense_averaged_over_seeds(study):
    out, res = study
    cfg = load_study_config(out / "config.toml")
    panels = query_panels(cfg, res["cells"])
    # every attack x defense that ran, DCP-defended DFME/MAZE included; the noise floor is no attack
    assert ("dfme", "dcp") in panels and ("maze", "none") in panels and ("knockoff-adaptive", "rs") in panels
    assert ("knockoff-adaptive", "none") not in panels and not any(a == "noise" for a, _ in panels)
    assert len(panels) == len(set(panels)) == 3 * 4  # none: 4 attacks (not the floor); rs, dcp: 4 each
    # the curve: the mean over seeds at the budgets every seed evaluated at
    assert mean_history([[[0, 0.1], [10, 0.2], [20, 0.4]], [[10, 0.4], [20, None], [30, 0.5]]]) == [(10, pytest.approx(0.3))]


def test_a_per_seed_operating_point_is_labelled_per_seed():
    """The operating point's alpha and epoch are chosen per seed: the aggregate keeps them per seed (seed
    0's alpha would mislabel the others), a setting every seed shares stays one value."""
    def seed(alpha):
        meta = {"kind": "divqat-op", "backend": "server", "alpha": alpha, "epoch": 1, "test_acc": 0.8,
                "tie_rate": 0.0, "kl_to_fp": 0.05}
        return {"victims": {"divqat-op-server": meta}, "defenses": {}, "cells": {}}
    op = aggregate([seed(0.55), seed(0.55), seed(0.5)])["victims"]["divqat-op-server"]
    assert op["alpha"] == [0.55, 0.55, 0.5] and op["epoch"] == 1 and op["backend"] == "server"
    assert _short_label(op) == "op α=0.55/0.55/0.5 ep1"
    assert _short_label(aggregate([seed(0.5), seed(0.5)])["victims"]["divqat-op-server"]) == "op α=0.5 ep1"
