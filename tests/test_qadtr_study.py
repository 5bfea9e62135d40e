"""The QADT-R study end to end on a tiny synthetic set (through the CLI): files, tables, ASR ranges,
resume, config errors."""

import json
import math

import pytest

from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.studies.qadtr import DEFENSES, load_study_config, preset_path

TINY = [
    "data.name=synthetic", "data.train_subset=384", "data.attack_subset=128", "data.test_subset=128",
    "model.width=8", "fp.epochs=2", "fp.batch_size=64", "qat.epochs=1", "defense.epochs=1",
    "attack.steps=5", "attack.adaptive_steps=3", "attack.batch_size=64", "attack.draws=1",
    "analysis.num_images=16", "analysis.pgd_steps=2", "progress=false", "threads=0", "name=tiny",
    "patches.unseen=['circle:0.1']", "seeds=[0,1]",
]
NAMES = ["none", "pbat", "dwq", "aqapa", "aqapa+dbwt", "qadtr"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "qadtr", "--preset", "quick", *TINY, f"out_root={root}"]) == 0
    return root / "tiny"


def _mean(cell):
    return cell["mean"] if isinstance(cell, dict) else cell


def _rates(node):
    """Every ASR / accuracy leaf of a results subtree."""
    if isinstance(node, dict) and {"mean", "std"} <= set(node):
        yield node["mean"]
    elif isinstance(node, dict):
        for value in node.values():
            yield from _rates(value)


def test_study_writes_results_tables_and_figures(study):
    for name in ("config.toml", "results.json", "results.md", "transfer_matrix.png", "table2_asr.png"):
        assert (study / name).is_file(), name
    seed = study / "seed-0"
    for name in ("feature_maps.png", "gradient_maps.png", "table1.json", "table2.json", "gradients.json"):
        assert (seed / name).is_file(), name
    for model in ("fp32", "qat8", "qat4", "qat2", "defense-pbat", "defense-dwq", "defense-qadtr"):
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (study / "results.md").read_text()
    for text in ("Table 1", "Table 2", "Gradient analysis", "Feature maps", "QADT-R", "PBAT", "DWQ",
                 "A-QAPA+DBWT", "| patch from 2-bit |"):
        assert text in md, text


def test_table1_is_the_full_transfer_matrix_with_rates_in_unit_interval(study):
    t1 = json.loads((study / "results.json").read_text())["table1"]
    widths = {"32", "8", "4", "2"}
    assert set(t1["asr"]) == widths and all(set(row) == widths for row in t1["asr"].values())
    assert set(t1["clean_acc"]) == widths and _mean(t1["clean_acc"]["32"]) > 0.5
    values = list(_rates(t1["asr"])) + list(_rates(t1["random_patch_asr"]))
    assert len(values) == 20 and all(0 <= v <= 1 for v in values)


def test_table2_has_every_defense_width_and_metric(study):
    t2 = json.loads((study / "results.json").read_text())["table2"]
    assert list(t2) == NAMES
    for name, rows in t2.items():
        expected = {"8", "4", "2"} | ({"rand"} if DEFENSES[name].randomised else set())
        assert set(rows) == expected, name
        for row in rows.values():
            for key in ("clean_acc", "transfer_seen", "transfer_unseen", "adaptive_seen", "adaptive_unseen"):
                value = _mean(row[key])
                assert math.isnan(value) or 0 <= value <= 1, (name, key, value)
            assert set(row["per_spec"]) == {"seen:square@0.08", "unseen:circle@0.1"}


def test_gradient_and_feature_tables(study):
    res = json.loads((study / "results.json").read_text())
    g = res["gradients"]["float_vs_quantized"]
    assert set(g) == {"clean", "patch", "pixel"}
    for per in g.values():
        for bits in ("8", "4", "2"):
            assert -1 <= _mean(per[bits]["cos"]) <= 1 and _mean(per[bits]["mse"]) >= 0
    assert set(res["features"]["relative_shift"]) == {"32", "8", "4", "2"}
    assert "qadtr" in res["gradients"]["defense_width_alignment"]


def test_rerun_skips_finished_stages(study):
    ckpt = study / "seed-0" / "models" / "defense-qadtr" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns, (study / "seed-0" / "table2.json").read_text()
    assert main(["run", "qadtr", "--preset", "quick", *TINY, f"out_root={study.parent}"]) == 0
    assert (ckpt.stat().st_mtime_ns, (study / "seed-0" / "table2.json").read_text()) == before


def test_presets_load_and_a_missing_config_file_is_a_clear_error(capsys):
    for preset in ("quick", "full", "paper"):
        cfg = load_study_config(preset_path(preset))
        assert cfg.name == f"qadtr-{preset}"
    assert main(["run", "qadtr", "--config", "no-such-file.toml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("defense.names=['none','magic']", "unknown defense"),
        ("qat.bits=[8,9]", "2..8"),
        ("patches.unseen=['circle']", "shape:size"),
        ("patches.region=[0.5]", r"\[lo, hi\]"),
        ("patches.unseen_region=[0.9,0.1]", "region"),
        ("attack.steps=0", "attack.steps"),
        ("defense.lr=0", "defense.lr"),
        ("fp.epochs=two", "expects a int"),
        ("model.depth=3", "unknown config key 'model.depth'"),
        ("qat.act_range=minmax", "act_range"),
    ],
)
def test_bad_study_config_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(None, [override])


def test_bad_config_exits_with_a_message_not_a_traceback(capsys):
    assert main(["run", "qadtr", "--preset", "quick", "defense.names=['pbatt']"]) == 2
    assert "unknown defense" in capsys.readouterr().err


def test_two_seeds_give_mean_and_std_of_the_per_seed_results(study, seed_statistics):
    per_seed = [json.loads((study / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    res = json.loads((study / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    for key in ("table1", "table2", "gradients"):
        assert seed_statistics(res[key], [r[key] for r in per_seed]) > 0, key
    assert per_seed[0]["table1"] != per_seed[1]["table1"]
    assert "±" in (study / "results.md").read_text()


def test_qat_models_can_learn_their_activation_ranges():
    import torch

    from qrobust.models import build_model
    from qrobust.quant import ActQuant
    from qrobust.studies.qadtr import qat_model

    fp = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28))
    for act_range, learned in (("ema", False), ("learned", True)):
        acts = [m for m in qat_model(fp, 2, act_range).modules() if isinstance(m, ActQuant)]
        assert acts and all(a.learned is learned for a in acts)
        assert all(isinstance(a.hi, torch.nn.Parameter) is learned for a in acts)
