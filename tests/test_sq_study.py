"""The SQ white-box study end to end on its smoke preset (synthetic data, 2 seeds, through the CLI): result
files and keys, rates in [0, 1], robust <= clean, EOT <= single-gradient PGD (+ tolerance), AUROC in [0, 1],
resume, a recomputed cell equal to the first one, Ray == local, the paper preset on data of its shape,
config errors. The library pieces it is built from are tested in test_sq_parts.py."""

import json
import math

import pytest
import torch

import qrobust.experiment.stages as stages_module
from qrobust.attacks.whitebox import pgd, robust_accuracy
from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.experiment.engine import RUN_KEYS as ENGINE_RUN_KEYS
from qrobust.experiment.engine import seed_stages
from qrobust.studies.sq import ATTACKS, SPEC, SQSpec, load_study_config, preset_path, run_study

MODELS = ["fp32", "fp32-ft", "fp32-inq", "qat2", "sq", "sq-mi"]  # trained (a checkpoint each)
EVALUATED = MODELS + ["sq-mi-round"]  # + the sq-mi network with its SQs rounding (deterministic control)
CELLS = [f"eval/{m}" for m in EVALUATED] + ["adaptive", "ablation/sq-mi", "ablation/sq-mi-beta0.5"]
# What differs between two runs of the same study by design: timings and where/how it ran.
RUN_KEYS = (*ENGINE_RUN_KEYS, "train_seconds_this_call", "train_seconds_total")


def _keep_threads():
    """The smoke preset sets threads = 1 (what a 1-CPU Ray task has, so both executors run the same
    kernels): give the other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


keep_threads = pytest.fixture(autouse=True)(_keep_threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for _ in _keep_threads():
        assert main(["run", "sq", "--preset", "smoke", "--no-progress", f"out_root={root}", "name=tiny"]) == 0
    return root


def _leaves(node):
    if isinstance(node, dict) and {"mean", "std", "n"} <= set(node):
        yield node["mean"]  # a seed statistic: its std and seed count are not rates
    elif isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for value in node:
            yield from _leaves(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield float(node)


def _m(cell):
    return cell["mean"] if isinstance(cell, dict) else cell


def _without_run_keys(node):
    """``node`` without timing / executor / environment keys, NaN as a string (NaN != NaN)."""
    if isinstance(node, dict):
        return {k: _without_run_keys(v) for k, v in node.items() if k not in RUN_KEYS}
    if isinstance(node, list):
        return [_without_run_keys(v) for v in node]
    if isinstance(node, float) and math.isnan(node):
        return "nan"
    return node


def _read(path):
    return json.loads(path.read_text())


def test_study_writes_results_tables_and_figures(study):
    root = study / "tiny"
    for name in ("config.toml", "results.json", "results.md", "robust_accuracy.png", "aip.png"):
        assert (root / name).is_file(), name
    seed = root / "seed-0"
    for name in ("calibration.json", "cells.json", "timings.json", "results.json"):
        assert (seed / name).is_file(), name
    assert list(_read(seed / "cells.json")) == CELLS
    for model in MODELS + ["sq-mi-beta0.5"]:
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (root / "results.md").read_text()
    for text in ("Robust accuracy", "EOT-PGD", "transfer", "BPDA", "Square (black-box)", "worst case", "Attack-strength check", "AUROC",
                 "Adaptive attack", "Ablations", "| APGD-CE | BPDA | Square | worst case |", "APGD-CE (4 steps",
                 "Reading", "deterministic control", "rounding to the nearest bin", "rounds a black pixel up only past"):
        assert text in md, text


def test_accuracies_auroc_and_orderings(study):
    res = _read(study / "tiny" / "results.json")
    ev = res["evaluation"]
    assert set(ev) == set(EVALUATED) and res["adaptive_done"] and res["executor"] == "local"
    assert res["eps"] == ["0.05", "0.2"] and res["eps_values"] == [0.05, 0.2]
    assert _m(ev["fp32"]["clean_acc"]) > 0.3  # the float model learned something
    for name in EVALUATED:
        e = ev[name]
        clean = _m(e["clean_acc_all_draws"])
        assert set(e["robust"]) == set(ATTACKS)
        for attack in ATTACKS:
            for spec in ("0.05", "0.2"):
                r = _m(e["robust"][attack][spec])
                assert 0 <= r <= clean + 1e-9, (name, attack, spec)
                # EOT-PGD is at least as strong as the single-gradient attack, up to draw noise
                assert _m(e["robust"]["eot-pgd"][spec]) <= _m(e["robust"]["pgd"][spec]) + 0.15, (name, spec)
    for name in ("sq", "sq-mi"):
        d = ev[name]["detector"]
        values = list(_leaves({k: d[k] for k in ("auroc", "detection_rate", "fpr_val", "fpr_test")}))
        assert values and all(0 <= v <= 1 for v in values)
        assert _m(d["fpr_val"]) <= 0.05 + 1e-9
        rows = ev[name]["aip"]["eot-pgd"]
        assert [_m(r["eps"]) for r in rows] == [0.0, 0.05, 0.2]
        assert all(0 <= _m(r["accuracy"]) <= 1 and _m(r["mean_mi"]) >= 0 for r in rows)
    for label in ("eot-pgd", "adaptive"):
        row = res["adaptive"][label]
        assert all(0 <= _m(row[k]) <= 1 for k in ("robust_acc", "adv_acc", "auroc", "detection_rate",
                                                  "undetected_success"))
    assert res["ablation"]["eps"] == "0.2" and set(res["ablation"]["rows"]) == {"sq-mi", "sq-mi-beta0.5"}
    for row in res["ablation"]["rows"].values():
        assert {"pgd", "eot-pgd", "apgd-ce", "bpda", "square"} <= set(row)
        # the learned bin gaps of each SQ (what the spacing term acts on): one ratio per gap, K - 1 = 3
        assert set(row["sq_gaps"]) == set(ev["sq-mi"]["sq_gaps"]) and len(row["sq_gaps"]) == 2
        assert all(len(g) == 3 and all(_m(r) > 0 for r in g) for g in row["sq_gaps"].values())
        assert set(row["sq_shift"]) == set(row["sq_gaps"]) and all(abs(_m(v)) < 1 for v in row["sq_shift"].values())
        assert set(row["sq_first_boundary"]) == set(row["sq_gaps"]) and 0 < _m(row["sq_first_boundary"]["sq_input"]) < 1
    # the sq-mi row's model is the evaluated sq-mi model: the same gaps and shifts
    for key in ("sq_gaps", "sq_shift", "sq_first_boundary"):
        assert res["ablation"]["rows"]["sq-mi"][key] == ev["sq-mi"][key], key
    md = (study / "tiny" / "results.md").read_text()
    ablation_md = md[md.index("## Ablations"):md.index("## Reading")]
    assert "gaps / uniform gap" in ablation_md and "n/a" not in ablation_md


def test_one_counting_rule_for_every_model(study):
    # expected (mean over the evaluations) and strict (all evaluations) for every model and attack; a
    # deterministic model's evaluations agree; the worst case is per image, so it is at most every
    # attack's figure and can be below their minimum
    ev = _read(study / "tiny" / "seed-0" / "results.json")["evaluation"]
    some_gap = False
    for name in EVALUATED:
        e = ev[name]
        exp, strict = e["accuracy_expected"], e["accuracy_strict"]
        assert strict["attacks"] == e["robust"] and strict["clean"] == e["clean_acc_all_draws"]
        assert set(exp["attacks"]) == set(strict["attacks"]) == set(ATTACKS)
        for spec in ("0.05", "0.2"):
            per_attack = [strict["attacks"][k][spec] for k in ATTACKS]
            assert strict["worst"][spec] <= min(per_attack) + 1e-9
            assert exp["worst"][spec] <= min(exp["attacks"][k][spec] for k in ATTACKS) + 1e-9
            for k in ATTACKS:
                assert strict["attacks"][k][spec] <= exp["attacks"][k][spec] + 1e-9
                if name in ("fp32", "fp32-ft", "fp32-inq", "qat2", "sq-mi-round"):
                    assert strict["attacks"][k][spec] == exp["attacks"][k][spec]
                some_gap |= exp["attacks"][k][spec] > strict["attacks"][k][spec]
        if name in ("sq", "sq-mi"):
            assert 0 <= e["diversity"]["h_t_given_x"] <= e["diversity"]["h_t"] + 1e-6 <= 1.3863 + 1e-6  # log K
            assert 0 <= e["diversity"]["disagreement"] <= 1 and e["sq_gaps"]
            for attack, by_eps in e["detector"]["auroc_successful"].items():
                assert all(math.isnan(v) or 0 <= v <= 1 for v in by_eps.values()), attack
    assert some_gap  # randomised models do pay for lucky draws in the strict count


def test_resume_reuses_models_and_cells(study, monkeypatch):
    seed = study / "tiny" / "seed-0"
    kept = ("cells.json", "calibration.json")
    before = {name: (seed / name).stat().st_mtime_ns for name in kept}
    ckpt = {m: (seed / "models" / m / "checkpoint.pt").stat().st_mtime_ns for m in MODELS}
    results = _read(study / "tiny" / "results.json")

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(SQSpec, "run_cell", boom)
    monkeypatch.setattr(stages_module, "fit", boom)
    assert main(["run", "sq", "--preset", "smoke", "--no-progress", f"out_root={study}", "name=tiny"]) == 0
    assert {name: (seed / name).stat().st_mtime_ns for name in kept} == before
    assert ckpt == {m: (seed / "models" / m / "checkpoint.pt").stat().st_mtime_ns for m in MODELS}
    assert _without_run_keys(_read(study / "tiny" / "results.json")) == _without_run_keys(results)


def test_a_record_written_before_an_attack_was_added_is_recomputed_and_the_same(study, monkeypatch):
    # eval/sq-mi draws SQ noise: recomputed alone, after a call that loaded the models instead of
    # training them, it is the same record only because the cell seeds its own RNG. Same process, same
    # kernels, same shapes: an exact comparison.
    path = study / "tiny" / "seed-0" / "cells.json"
    cells = _read(path)
    original = json.loads(json.dumps(cells["eval/sq-mi"]))
    for key in ("robust", "adv_acc"):
        del cells["eval/sq-mi"][key]["apgd-ce"]
    path.write_text(json.dumps(cells))
    ran = []
    run_cell = SQSpec.run_cell
    monkeypatch.setattr(SQSpec, "run_cell", lambda self, cfg, ctx, cell: ran.append(cell.key) or run_cell(self, cfg, ctx, cell))
    assert main(["run", "sq", "--preset", "smoke", "--no-progress", f"out_root={study}", "name=tiny"]) == 0
    assert ran == ["eval/sq-mi"]
    fresh = _read(path)
    assert "apgd-ce" in fresh["eval/sq-mi"]["robust"]
    assert _without_run_keys(fresh["eval/sq-mi"]) == _without_run_keys(original)
    assert fresh["eval/qat2"] == cells["eval/qat2"]


def test_robust_accuracy_matches_whitebox_robust_accuracy_for_deterministic_models(study):
    # The study attacks every image once (to reuse the examples); robust_accuracy attacks the clean-correct
    # ones only, so from the first clean-wrong image on the random starts come from other stretches of
    # the generator's stream (and batches of other shapes): the two agree up to a few images.
    cfg = load_study_config(preset_path("smoke"), ["progress=false", f"out_root={study}", "name=tiny"])
    _, ctx = SPEC.prepare(cfg, 0, seed_stages(SPEC, cfg, study / "tiny", 0))
    ours = _read(study / "tiny" / "seed-0" / "cells.json")["eval/fp32"]["robust"]["pgd"]["0.05"]
    fp = ctx["models"]["fp32"].net
    gen = torch.Generator().manual_seed(17)
    ref = robust_accuracy(fp, ctx["test_x"], ctx["test_y"], pgd, eps=0.05, steps=3, generator=gen, batch_size=32)
    assert 0 < ref < 1 and ours == pytest.approx(ref, abs=2.5 / 32)


def test_ray_gives_the_same_results_as_local(study, tmp_path, ray_executor):
    cfg = load_study_config(preset_path("smoke"), ["progress=false", f"out_root={tmp_path}", "name=tiny"])
    remote = run_study(cfg, executor=ray_executor)
    local = _read(study / "tiny" / "results.json")
    assert remote["executor"] == "ray"
    assert _without_run_keys(remote) == _without_run_keys(local)
    for seed in (0, 1):
        a, b = (_read(root / "tiny" / f"seed-{seed}" / "results.json") for root in (study, tmp_path))
        assert _without_run_keys(a) == _without_run_keys(b)


def test_paper_preset_runs_end_to_end_on_data_of_its_shape(tmp_path):
    # the paper's architecture (ResNet-20), SQ placement, budgets and attack set on synthetic 3x32x32
    # images, every size shrunk to a few: the first failure of `--preset paper` should be ours
    overrides = ["data.name=synthetic-cifar10", "device=cpu", "progress=false", f"out_root={tmp_path}",
                 "data.train_subset=128", "data.val_subset=16", "data.test_subset=4", "fp.epochs=1", "qat.epochs=1",
                 "sq.epochs=1", "sq.n_draws=2", "attack.eot=2", "attack.draws=2", "attack.steps=1",
                 "attack.apgd_steps=1", "attack.square_queries=4"]
    cfg = load_study_config(preset_path("paper"), overrides)
    assert cfg.model.arch == "resnet20" and cfg.attack.eps == ["2/255", "5/255", "8/255"]
    res = run_study(cfg)
    assert res["complete"] and set(res["evaluation"]) == set(EVALUATED) and res["adaptive_done"]
    assert set(res["evaluation"]["sq-mi"]["robust"]) == set(ATTACKS)
    md = (tmp_path / "sq-paper" / "results.md").read_text()
    assert "model resnet20" in md and "eps=5/255" in md


@pytest.mark.parametrize("override, match", [
    ("sq.num_bins=1", "num_bins >= 2"),
    ("sq.tau=0", "tau"),
    ("sq.n_draws=0", "draws"),
    ("attack.eps=['-0.1']", "eps"),
    ("attack.eps=['l2:0.5']", "l2 budget"),
    ("attack.eot=0", "attack.eot"),
    ("attack.square_queries=-1", "square_queries"),
    ("attack.apgd_steps=-1", "apgd_steps"),
    ("attack.square_p_init=0", "square_p_init"),
    ("attack.square_p_init=1.5", "square_p_init"),
    ("qat.act_range=minmax", "act_range"),
    ("ablation.num_bins=[1]", "num_bins >= 2"),
    ("ablation.tau=[-1.0]", "tau"),
    ("ablation.spacing_weight=[-1.0]", "spacing_weight"),
    ("sq.percentile=30", "percentile"),
    ("attack.detector_direction=sideways", "detector_direction"),
])
def test_bad_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_study_config(preset_path("quick"), [override])


def test_spacing_weight_ablation_changes_only_the_spacing_term():
    cfg = load_study_config(preset_path("quick"), ["ablation.spacing_weight=[0, 1.0]"])
    variants = dict(cfg.ablation_variants())
    assert list(variants) == ["sq-mi-spacing0", "sq-mi-spacing1"]
    base = cfg.sq_settings()
    for name, weight in (("sq-mi-spacing0", 0.0), ("sq-mi-spacing1", 1.0)):
        assert variants[name] == base | {"spacing_weight": weight} and base["spacing_weight"] == 0.01


def test_bad_setting_through_the_cli_is_a_clean_error(capsys):
    assert main(["run", "sq", "sq.num_bins=1"]) == 2
    assert "num_bins >= 2" in capsys.readouterr().err


def test_two_seeds_give_mean_and_std_of_the_per_seed_results(study, seed_statistics):
    out = study / "tiny"
    per_seed = [_read(out / f"seed-{s}" / "results.json") for s in (0, 1)]
    res = _read(out / "results.json")
    assert res["seeds"] == [0, 1]
    for key in ("evaluation", "ablation"):
        assert seed_statistics(res[key], [r[key] for r in per_seed]) > 0, key
    assert per_seed[0]["evaluation"] != per_seed[1]["evaluation"]
    assert "±" in (out / "results.md").read_text()


def test_bpda_attacks_the_float_twin_and_is_pgd_for_the_float_model(study):
    ev = _read(study / "tiny" / "seed-0" / "results.json")["evaluation"]
    # no quantizers: the study copies PGD's numbers into BPDA's column (not recomputed), so exact
    assert ev["fp32"]["robust"]["bpda"] == ev["fp32"]["robust"]["pgd"]
    for name in ("qat2", "sq", "sq-mi"):
        assert set(ev[name]["robust"]["bpda"]) == {"0.05", "0.2"}
