"""The SQ white-box study end to end on a tiny synthetic set (through the CLI): result files and keys,
rates in [0, 1], robust <= clean, EOT <= single-gradient PGD (+ tolerance), AUROC in [0, 1], resume,
config errors."""

import json

import pytest
import torch

from qrobust.attacks.whitebox import pgd, robust_accuracy
from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.studies import common
from qrobust.studies.sq import ATTACKS, calibrate_ranges, load_study_config, preset_path

TINY = [
    "data.name=synthetic", "data.train_subset=384", "data.val_subset=64", "data.test_subset=48",
    "fp.epochs=4", "fp.batch_size=32", "fp.lr=0.05", "qat.epochs=1", "sq.epochs=1", "sq.n_draws=2",
    "attack.steps=3", "attack.eot=2", "attack.draws=2", "attack.batch_size=48", "progress=false", "threads=0",
    "name=tiny", "attack.eps=['0.05','0.2']", "ablation.beta=[0.5]", "attack.square_queries=40", "seeds=[0,1]",
    "attack.apgd_steps=5",
]
MODELS = ["fp32", "qat2", "sq", "sq-mi"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "sq", "--preset", "quick", *TINY, f"out_root={root}"]) == 0
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


def test_study_writes_results_tables_and_figures(study):
    root = study / "tiny"
    for name in ("config.toml", "results.json", "results.md", "robust_accuracy.png", "aip.png"):
        assert (root / name).is_file(), name
    seed = root / "seed-0"
    for name in ("calibration.json", "adaptive.json", "ablation.json", *(f"eval-{m}.json" for m in MODELS)):
        assert (seed / name).is_file(), name
    for model in MODELS + ["sq-mi-beta0.5"]:
        assert (seed / "models" / model / "checkpoint.pt").is_file(), model
    md = (root / "results.md").read_text()
    for text in ("Robust accuracy", "EOT-PGD", "transfer", "BPDA", "Square (black-box)", "worst case", "Attack-strength check", "AUROC",
                 "Adaptive attack", "Ablations", "| APGD-CE | BPDA | Square | worst case |", "APGD-CE (5 steps",
                 "Reading"):
        assert text in md, text


def test_accuracies_auroc_and_orderings(study):
    res = json.loads((study / "tiny" / "results.json").read_text())
    ev = res["evaluation"]
    assert set(ev) == set(MODELS) and res["adaptive_done"]
    assert _m(ev["fp32"]["clean_acc"]) > 0.3  # the float model learned something
    for name in MODELS:
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
    assert set(res["ablation"]["rows"]) == {"sq-mi", "sq-mi-beta0.5"}
    for row in res["ablation"]["rows"].values():
        assert {"pgd", "eot-pgd", "apgd-ce", "bpda", "square"} <= set(row)


def test_resume_reuses_models_and_stages(study, monkeypatch):
    seed = study / "tiny" / "seed-0"
    before = {p.name: p.stat().st_mtime_ns for p in seed.glob("*.json") if p.name not in ("models.json", "results.json")}
    ckpt = {m: (seed / "models" / m / "checkpoint.pt").stat().st_mtime_ns for m in MODELS}
    import qrobust.studies.sq as sq

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(sq.SQStudy, "evaluate_model", boom)
    monkeypatch.setattr(sq.SQStudy, "adaptive", boom)
    monkeypatch.setattr(sq.SQStudy, "ablation", boom)
    monkeypatch.setattr(common, "fit", boom)
    assert main(["run", "sq", "--preset", "quick", *TINY, f"out_root={study}"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in seed.glob("*.json") if p.name not in ("models.json", "results.json")}
    assert after == before
    assert ckpt == {m: (seed / "models" / m / "checkpoint.pt").stat().st_mtime_ns for m in MODELS}


def test_a_stage_written_before_an_attack_was_added_is_recomputed(study):
    seed = study / "tiny" / "seed-0"
    stale = json.loads((seed / "eval-fp32.json").read_text())
    for key in ("robust", "adv_acc"):
        stale[key].pop("apgd-ce")
    (seed / "eval-fp32.json").write_text(json.dumps(stale))
    untouched = (seed / "eval-qat2.json").stat().st_mtime_ns
    assert main(["run", "sq", "--preset", "quick", *TINY, f"out_root={study}"]) == 0
    fresh = json.loads((seed / "eval-fp32.json").read_text())
    assert "apgd-ce" in fresh["robust"] and (seed / "eval-qat2.json").stat().st_mtime_ns == untouched


def test_robust_accuracy_matches_whitebox_robust_accuracy_for_deterministic_models(study):
    # The study attacks every image once (to reuse the examples); for a deterministic model and the same
    # random start this is exactly robust_accuracy's number.
    from qrobust.studies.sq import SQStudy

    cfg = load_study_config(preset_path("quick"), TINY + [f"out_root={study}"])
    s = SQStudy(cfg, study / "tiny" / "seed-0", 0)
    s.train_models()
    ours = s.evaluate_model("fp32")["robust"]["pgd"]["0.05"]
    fp = s.models["fp32"].net
    gen = torch.Generator().manual_seed(17)
    ref = robust_accuracy(fp, s.data.test_x, s.data.test_y, pgd, eps=0.05, steps=3, generator=gen, batch_size=48)
    assert ours == pytest.approx(ref, abs=0.03)  # random starts differ only on the clean-wrong images


def test_calibrated_ranges_cover_the_activations():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    x = torch.rand(200, 4)
    (low, high), = calibrate_ranges(net, x, ["1"], 99.9).values()
    with torch.no_grad():
        acts = net(x)
    assert low == 0.0 and 0 < high <= float(acts.max()) + 1e-6
    assert float((acts <= high).float().mean()) >= 0.99
    with pytest.raises(ConfigError, match="unknown module"):
        calibrate_ranges(net, x, ["7"], 99.9)


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
    ("sq.percentile=30", "percentile"),
    ("attack.detector_direction=sideways", "detector_direction"),
])
def test_bad_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_study_config(preset_path("quick"), [override])


def test_bad_setting_through_the_cli_is_a_clean_error(capsys):
    assert main(["run", "sq", "sq.num_bins=1"]) == 2
    assert "num_bins >= 2" in capsys.readouterr().err


def test_two_seeds_give_mean_and_std_of_the_per_seed_results(study, seed_statistics):
    out = study / "tiny"
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    for key in ("evaluation", "ablation"):
        assert seed_statistics(res[key], [r[key] for r in per_seed]) > 0, key
    assert per_seed[0]["evaluation"] != per_seed[1]["evaluation"]
    assert "±" in (out / "results.md").read_text()


def test_bpda_attacks_the_float_twin_and_is_pgd_for_the_float_model(study):
    ev = json.loads((study / "tiny" / "seed-0" / "results.json").read_text())["evaluation"]
    # no quantizers: the study copies PGD's numbers into BPDA's column (not recomputed), so exact
    assert ev["fp32"]["robust"]["bpda"] == ev["fp32"]["robust"]["pgd"]
    for name in ("qat2", "sq", "sq-mi"):
        assert set(ev[name]["robust"]["bpda"]) == {"0.05", "0.2"}


def test_float_twin_has_no_quantizer_and_matches_the_float_forward():
    from qrobust.models import build_model
    from qrobust.quant import quantize, set_quantization_enabled
    from qrobust.quant.stochastic import StochasticQuantizer, insert_stochastic_quantizers
    from qrobust.studies.sq import float_twin

    torch.manual_seed(0)
    net = build_model("lenet5", channels=1, num_classes=10, image_size=(28, 28)).eval()
    qat = quantize(net, inplace=False)
    x = torch.rand(8, 1, 28, 28)
    qat(x)  # observe activation ranges
    twin = float_twin(qat)
    # two module structures for one computation: a tolerance for kernels that may round differently
    # (logits are O(0.1); fake quantization changes them by far more than 1e-5)
    assert torch.allclose(twin(x), set_quantization_enabled(qat, False)(x), rtol=1e-5, atol=1e-6)
    set_quantization_enabled(qat, True)
    assert not torch.allclose(twin(x), qat(x), rtol=1e-5, atol=1e-6), "the twin must differ from the quantized model"
    sq_net = insert_stochastic_quantizers(copy_of(net), at_input=True, num_bins=4)
    sq_twin = float_twin(sq_net)
    assert not any(isinstance(m, StochasticQuantizer) for m in sq_twin.modules())
    assert any(isinstance(m, StochasticQuantizer) for m in sq_net.modules()), "the original is left alone"
    assert torch.allclose(sq_twin(x), net(x), rtol=1e-5, atol=1e-6)


def copy_of(module):
    import copy

    return copy.deepcopy(module)
