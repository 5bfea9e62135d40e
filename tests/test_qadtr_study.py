"""The QADT-R study end to end: the smoke preset through the CLI (files, tables, ASR ranges, resume),
the same numbers on the Ray executor, the paper preset for a few steps on synthetic data of CIFAR-10's
shape, config errors."""

import json
import math

import pytest
import torch

from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.experiment.engine import RUN_KEYS  # how, where and how fast it ran: differs by design
from qrobust.studies.qadtr import DEFENSES, load_study_config, preset_path, run_study

NAMES = ["none", "pbat", "dwq", "aqapa", "aqapa+dbwt", "qadtr"]
FACTORS = ("seen", "unseen_size", "unseen_shape", "unseen_place", "unseen_all")

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke preset (2 seeds, synthetic data) through the CLI, local executor."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        assert main(["run", "qadtr", "--preset", "smoke", "--no-progress", f"out_root={root}"]) == 0
    finally:
        torch.set_num_threads(threads)  # the preset's threads=1 applies to this process
    return root / "qadtr-smoke"


def _mean(cell):
    return cell["mean"] if isinstance(cell, dict) else cell


def _without(results):
    return {k: v for k, v in results.items() if k not in RUN_KEYS}


def _same(a, b):
    """Equal structure and numbers, NaN equal to NaN (an ASR with no eligible image is NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _rates(node):
    """Every ASR / accuracy leaf of a results subtree."""
    if isinstance(node, dict) and {"mean", "std"} <= set(node):
        yield node["mean"]
    elif isinstance(node, dict):
        for value in node.values():
            yield from _rates(value)


def test_study_writes_results_tables_and_figures(study):
    for name in ("config.toml", "results.json", "results.md", "transfer_matrix.png", "table2_asr.png",
                 "size_curve.png", "heatmap.png"):
        assert (study / name).is_file(), name
    seed = study / "seed-0"
    for name in ("feature_maps.png", "gradient_maps.png", "float_patches.pt", "cells.json", "results.json",
                 "timings.json"):
        assert (seed / name).is_file(), name
    assert set(json.loads((seed / "results.json").read_text())) == {"seed", "table1", "table2", "gradients", "features",
                                                                   "figures"}
    for model in ("fp32", "qat8", "qat4", "qat2", "defense-pbat", "defense-dwq", "defense-qadtr"):
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (study / "results.md").read_text()
    for text in ("Table 1", "Table 2", "Gradient analysis", "Feature maps", "QADT-R", "PBAT", "DWQ",
                 "A-QAPA+DBWT", "| patch from 2-bit |", "One 8-bit QAT model switched", "Adaptive ASR:",
                 "Adaptive ASR against Adam steps", "ASR against patch size", "ASR over patch positions",
                 "square 8x8 px = 8.2% of the image", "What each defense buys and costs", "- **QADT-R**: seen"):
        assert text in md, text


def test_table1_is_the_full_transfer_matrix_with_rates_in_unit_interval(study):
    t1 = json.loads((study / "results.json").read_text())["table1"]
    widths = {"32", "8", "4", "2"}
    assert set(t1["asr"]) == widths and all(set(row) == widths for row in t1["asr"].values())
    assert set(t1["clean_acc"]) == widths and _mean(t1["clean_acc"]["32"]) > 0.5
    values = list(_rates(t1["asr"])) + list(_rates(t1["random_patch_asr"]))
    assert len(values) == 20 and all(0 <= v <= 1 for v in values)


def test_switched_table1_is_the_8_bit_model_at_each_width(study):
    """At 8 bits the switched model is the 8-bit QAT model itself: the same patch, places and kernels
    give the same ASR exactly; at 4/2 bits it is another network than the QAT model of that width."""
    for seed in (0, 1):
        t1 = json.loads((study / f"seed-{seed}" / "results.json").read_text())["table1"]
        assert set(t1["asr_switched"]) == {"32", "8", "4", "2"} and set(t1["clean_acc_switched"]) == {"8", "4", "2"}
        assert t1["asr_switched"]["8"]["8"] == t1["asr"]["8"]["8"]
        assert t1["asr_switched"]["32"]["32"] == t1["asr"]["32"]["32"]
        assert t1["clean_acc_switched"]["8"] == t1["clean_acc"]["8"]
        assert all(0 <= v <= 1 for row in t1["asr_switched"].values() for v in row.values())


def test_table2_has_every_defense_width_and_metric(study):
    t2 = json.loads((study / "results.json").read_text())["table2"]
    assert list(t2) == NAMES
    for name, rows in t2.items():
        expected = {"8", "4", "2"} | ({"rand"} if DEFENSES[name].randomised else set())
        assert set(rows) == expected, name
        for row in rows.values():
            keys = ["clean_acc"] + [f"{a}_{f}" for a in ("transfer", "adaptive") for f in FACTORS]
            for key in keys:
                value = _mean(row[key])
                assert math.isnan(value) or 0 <= value <= 1, (name, key, value)
            assert set(row["per_spec"]) == {"seen:square@0.08", *FACTORS[1:]}


def test_accuracy_under_the_patch_is_clean_accuracy_times_one_minus_asr(study):
    """Per seed, patched_acc_<kind> = clean_acc x (1 - <kind> ASR) for every row; the report shows the table."""
    for seed in (0, 1):
        t2 = json.loads((study / f"seed-{seed}" / "results.json").read_text())["table2"]
        checked = 0
        for rows in t2.values():
            for row in rows.values():
                for kind in ("transfer_seen", "adaptive_seen", "adaptive_unseen_all"):
                    if math.isnan(row[kind]):
                        assert math.isnan(row[f"patched_acc_{kind}"])
                        continue
                    assert row[f"patched_acc_{kind}"] == pytest.approx(row["clean_acc"] * (1 - row[kind]), abs=1e-12)
                    assert 0 <= row[f"patched_acc_{kind}"] <= row["clean_acc"]
                    checked += 1
        assert checked > 0
    assert "Accuracy under the patch" in (study / "results.md").read_text()


def test_unseen_patches_change_one_factor_at_a_time_then_all():
    cfg = load_study_config(preset_path("quick"))
    seen, unseen = cfg.seen_specs()[0], cfg.unseen_specs()
    assert list(unseen) == list(FACTORS[1:])
    changed = {name: {f for f in ("shape", "size", "region") if getattr(spec, f) != getattr(seen, f)}
               for name, spec in unseen.items()}
    assert changed == {"unseen_size": {"size"}, "unseen_shape": {"shape"}, "unseen_place": {"region"},
                       "unseen_all": {"shape", "size", "region"}}


def test_adaptive_attack_gets_at_least_the_transfer_steps_and_its_curve_is_reported(study):
    for preset in ("smoke", "quick", "full", "paper"):
        a = load_study_config(preset_path(preset)).attack
        assert a.adaptive_steps >= a.steps, preset
    with pytest.raises(ConfigError, match=r"adaptive_steps \(99\) < attack.steps \(100\)"):
        load_study_config(None, ["attack.steps=100", "attack.adaptive_steps=99"])
    load_study_config(None, ["attack.steps=100", "attack.adaptive_steps=99", "attack.adaptive=false"])  # no adaptive
    figures = json.loads((study / "results.json").read_text())["figures"]
    steps = load_study_config(preset_path("smoke")).attack.adaptive_steps
    assert set(figures["steps_curve"]) == set(NAMES)
    for curve in figures["steps_curve"].values():
        assert {str(steps), str(2 * steps)} <= set(curve["asr"])  # the Table-2 budget and twice it
        assert all(0 <= _mean(v) <= 1 for v in curve["asr"].values())
    sizes = figures["size_curve"]["2"]
    assert [round(_mean(sizes[k]["area"]), 3) for k in sizes] == [0.046, 0.128]  # 6x6 and 10x10 px of 28x28
    heat = figures["heatmap"]
    assert set(heat["asr"]) == {"32", "8", "4", "2"} and len(heat["asr"]["2"]) == len(heat["rows"]) * len(heat["cols"])


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
    cells = study / "seed-0" / "cells.json"
    before = ckpt.stat().st_mtime_ns, cells.stat().st_mtime_ns, cells.read_text()
    results = json.loads((study / "results.json").read_text())
    threads = torch.get_num_threads()
    try:
        assert main(["run", "qadtr", "--preset", "smoke", "--no-progress", f"out_root={study.parent}"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (ckpt.stat().st_mtime_ns, cells.stat().st_mtime_ns, cells.read_text()) == before  # nothing recomputed
    again = json.loads((study / "results.json").read_text())
    assert _same(_without(again), _without(results))


def test_cells_lost_in_a_crash_are_recomputed_equal_on_the_loaded_models(study):
    """Resumed = uninterrupted: cells recomputed on models loaded from their run folders (not trained
    in this call) give the records of the first run exactly (same kernels, shapes and memory format)."""
    path = study / "seed-1" / "cells.json"
    cells = json.loads(path.read_text())
    lost = ["table2/qadtr/rand", "table2/dwq/2", "gradients/float", "gradients/alignment/aqapa+dbwt", "features"]
    path.write_text(json.dumps({k: v for k, v in cells.items() if k not in lost}))
    threads = torch.get_num_threads()
    try:
        assert main(["run", "qadtr", "--preset", "smoke", "--no-progress", f"out_root={study.parent}"]) == 0
    finally:
        torch.set_num_threads(threads)
    again = json.loads(path.read_text())
    assert set(again) == set(cells) and all(_same(again[k], cells[k]) for k in lost)


def test_presets_load_and_a_missing_config_file_is_a_clear_error(capsys):
    for preset in ("smoke", "quick", "full", "paper"):
        cfg = load_study_config(preset_path(preset))
        assert cfg.name == f"qadtr-{preset}"
    assert main(["run", "qadtr", "--config", "no-such-file.toml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("defense.names=['none','magic']", "unknown defense"),
        ("qat.bits=[8,9]", "2..8"),
        ("patches.unseen_shape=triangle", "unknown patch shape"),
        ("patches.size_curve=[1.5]", "larger than the image"),
        ("attack.heatmap_grid=1", "heatmap_grid"),
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


def test_ray_gives_the_same_numbers_as_the_local_run(study, tmp_path, ray_executor):
    """Cells on Ray workers, in whatever order they finish, give the local run's records exactly (the
    same kernels on the same shapes, one thread each: the preset sets threads=1, Ray gives a task its CPUs)."""
    cfg = load_study_config(preset_path("smoke"), [f"out_root={tmp_path}", "progress=false"])
    threads = torch.get_num_threads()
    try:
        remote = run_study(cfg, executor=ray_executor)
    finally:
        torch.set_num_threads(threads)
    local = json.loads((study / "results.json").read_text())
    assert remote["executor"] == "ray" and local["executor"] == "local"
    assert _same(_without(json.loads(json.dumps(remote))), _without(local))
    for seed in (0, 1):
        a, b = (json.loads((root / f"seed-{seed}" / "results.json").read_text()) for root in (study, tmp_path / "qadtr-smoke"))
        assert _same(a, b), seed


PAPER_FEW_STEPS = [
    "data.name=synthetic-cifar10", "data.train_subset=32", "data.attack_subset=8", "data.test_subset=8",
    "fp.epochs=1", "fp.batch_size=32", "qat.epochs=1", "defense.epochs=1", "defense.patch_steps=1",
    "defense.gir_batch=8", "attack.steps=1", "attack.adaptive_steps=1", "attack.batch_size=8", "attack.draws=1",
    "analysis.num_images=2", "analysis.pgd_steps=1", "seeds=[0]", "device=cpu", "progress=false",
    # one defense per code path (QADT-R's aqapa/dbwt/gir flags each on and off, GIR by bits and by noise)
    "defense.names=['none','pbat','dwq','aqapa','dbwt+gir','qadtr-noise']", "patches.size_curve=[0.08]",
    "attack.heatmap_grid=2",
]


def test_paper_preset_runs_end_to_end_on_data_of_cifar10s_shape(tmp_path):
    """The paper preset (ResNet-20, 3x32x32, 10 classes, its widths and settings) for a few steps on the
    CPU, so that its first failure is found here rather than by the first user with CIFAR-10 and a GPU."""
    cfg = load_study_config(preset_path("paper"), [*PAPER_FEW_STEPS, f"out_root={tmp_path}"])
    assert cfg.model.arch == "resnet20" and cfg.attack.table1_switched and cfg.qat.bits == [8, 4, 2]
    res = run_study(cfg)
    assert (tmp_path / "qadtr-paper" / "results.md").read_text().startswith("# QADT-R patch study: qadtr-paper")
    assert set(res["table1"]["asr"]) == {"32", "8", "4", "2"} and "asr_switched" in res["table1"]
    assert list(res["table2"]) == ["none", "pbat", "dwq", "aqapa", "dbwt+gir", "qadtr-noise"]
    assert set(res["table2"]["qadtr-noise"]) == {"8", "4", "2", "rand"}
