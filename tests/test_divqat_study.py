"""The DivQAT extraction study end to end on a tiny synthetic set (through the CLI): files, keys, value
ranges, ledger == queries, resume re-uses stored cells, config errors."""

import json
import math

import pytest

from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.studies import common
from qrobust.studies import divqat as study_mod
from qrobust.studies.divqat import cell_plan, load_study_config, preset_path

TINY = [
    "data.name=synthetic", "data.victim_fraction=0.5", "data.attacker_fraction=0.3", "data.val_fraction=0.1",
    "data.test_subset=0", "model.width=8", "fp.epochs=2", "fp.batch_size=64", "qat.epochs=1",
    "divqat.alphas=[0.1]", "divqat.epochs=1", "divqat.max_acc_drop=1.0",
    "knockoff.queries=96", "knockoff.epochs=1", "knockoff.batch_size=32",
    "dfme.queries=48", "dfme.batch_size=8", "dfme.clone_steps=1", "dfme.eval_every=1",
    "maze.queries=48", "maze.batch_size=8", "maze.num_directions=2", "maze.clone_steps=1", "maze.replay_steps=1",
    "maze.eval_every=1", "progress=false", "threads=0", "name=tiny", "seeds=[0,1]",
]
VICTIMS = ["qat-server", "qat-mobile", "divqat-0.1-server"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "divqat", "--preset", "quick", *TINY, f"out_root={root}"]) == 0
    return root


def test_study_writes_results_tables_and_figures(study):
    out = study / "tiny"
    for name in ("config.toml", "results.json", "results.md", "defender_vs_clone.png", "clone_vs_queries.png"):
        assert (out / name).is_file(), name
    seed = out / "seed-0"
    for name in ("victims.json", "defenses.json", "cells.json", "results.json", "timings.json"):
        assert (seed / name).is_file(), name
    for model in ("fp32", *VICTIMS):
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (out / "results.md").read_text()
    for text in ("QAT (server)", "QAT (mobile)", "DivQAT(α=0.1, server)", "KnockoffNets (hard label)", "DFME",
                 "MAZE", "noise floor", "far below the papers'", "mean KL(f_q", "| dcp |", "| rs |"):
        assert text in md, text


def test_results_keys_and_value_ranges(study):
    res = json.loads((study / "tiny" / "results.json").read_text())
    assert set(res["victims"]) == {"fp32", *VICTIMS}
    for name, meta in res["victims"].items():
        assert 0 <= meta["test_acc"]["mean"] <= 1
        assert meta["kl_to_fp"]["mean"] >= 0
        assert (meta["kl_to_fp"]["mean"] == 0) == (name == "fp32")
    cfg = load_study_config(preset_path("quick"), TINY)
    plan = cell_plan(cfg)
    assert len(plan) == 3 * (3 * 3 + 2)
    for victim, defense, attack in plan:
        cell = res["cells"][victim][defense][attack]
        for key in ("defender_acc", "clone_acc", "agreement"):
            assert 0 <= cell[key]["mean"] <= 1, (victim, defense, attack, key)
        assert 0 <= cell["l1"]["mean"] <= 2
        assert cell["ledger_matches_queries"]
        assert 0 < cell["queries_used"]["mean"] <= {"dfme": 48, "maze": 48}.get(attack, 96)
        if defense != "none" and attack != "knockoff-hard":
            assert cell["l1"]["mean"] <= 0.6 + 0.15  # calibrated on validation, measured on test
    for victim in VICTIMS:
        for defense in ("rs", "dcp"):
            assert res["defenses"][victim][defense]["l1_val"]["mean"] <= 0.6 + 1e-9
    assert set(res["error_gain_over_qat"]) == {"divqat-0.1-server"}
    gains = res["error_gain_over_qat"]["divqat-0.1-server"]["none"]
    assert set(gains) == {"knockoff", "knockoff-hard", "dfme", "maze", "noise"}
    assert all(-1 <= g <= 1 for g in gains.values())


def test_ledger_equals_queries_in_every_stored_cell(study):
    cells = json.loads((study / "tiny" / "seed-0" / "cells.json").read_text())
    for key, cell in cells.items():
        assert sum(cell["ledger"].values()) == cell["queries_used"] == cell["victim_ledger_total"], key
        assert cell["queries_used"] <= cell["budget"]
        assert all(math.isfinite(a) for _, a in cell["history"] if a is not None)


def test_resume_reuses_stored_cells_and_models(study, monkeypatch, capsys):
    cells_file = study / "tiny" / "seed-0" / "cells.json"
    cells = json.loads(cells_file.read_text())
    dropped = "qat-server/rs/dfme"
    kept = cells.pop(dropped)
    cells_file.write_text(json.dumps(cells))
    calls = []
    original = study_mod.DivQATStudy.attack_cell

    def spy(self, victim, defense, attack, params):
        calls.append((victim, defense, attack))
        return original(self, victim, defense, attack, params)

    monkeypatch.setattr(study_mod.DivQATStudy, "attack_cell", spy)
    monkeypatch.setattr(common, "fit", lambda *a, **k: pytest.fail("a finished victim was retrained"))
    assert main(["run", "divqat", "--preset", "quick", *TINY, f"out_root={study}"]) == 0
    assert calls == [("qat-server", "rs", "dfme")]  # only the missing cell ran again
    printed = capsys.readouterr().out  # the report is printed, then where the files are
    assert "| victim | defense | defender acc |" in printed and printed.rstrip().endswith("PNGs)")
    again = json.loads(cells_file.read_text())[dropped]
    assert again["queries_used"] == kept["queries_used"]
    assert again["clone_acc"] == pytest.approx(kept["clone_acc"])  # per-cell seeds: same clone again


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
    assert main(["run", "divqat", "--preset", "quick", "divqat.alphas=[-1]", f"out_root={tmp_path}"]) == 2
    for preset in ("quick", "full", "paper"):
        assert load_study_config(preset_path(preset)).name == f"divqat-{preset}"


def test_two_seeds_give_mean_and_std_of_the_per_seed_results(study, seed_statistics):
    out = study / "tiny"
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    assert seed_statistics(res["cells"], [r["cells"] for r in per_seed]) >= len(VICTIMS) * 3
    assert seed_statistics(res["victims"], [r["victims"] for r in per_seed]) >= len(VICTIMS)
    # the seeds really differ (else "± 0.0" would hide a seed that is ignored)
    accs = [r["victims"]["fp32"]["test_acc"] for r in per_seed]
    assert accs[0] != accs[1]
    assert "±" in (out / "results.md").read_text()
