"""The robustness card (issue 15) on tiny models and synthetic data, at the internal ``test`` budget:
card.json keys and value ranges, a self-contained HTML page, two models side by side, run folders and
study stages as inputs, the expected/strict rule on a randomised model, the gradient-masking warning,
resume from the section cache, and one-line errors."""

import dataclasses
import json
import re

import pytest
import torch
from torch import nn

import qrobust as qr
from qrobust.cards import BUDGETS, battery
from qrobust.cards.sources import from_folder
from qrobust.cli import main
from qrobust.errors import ConfigError

FAST = ["data.name=synthetic", "model.arch=lenet5", "train.epochs=3", "train.batch_size=64", "--no-progress"]
SECTIONS = ("deployment", "extraction", "patches", "whitebox")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A float run and an 8-bit QAT run started from it (quant.init), as `qrobust train` writes them."""
    root = tmp_path_factory.mktemp("card-runs")
    assert main(["train", *FAST, "--out", str(root / "fp")]) == 0
    assert main(["train", *FAST, "quant.bits=8", "train.epochs=1", "train.lr=0.01", f"quant.init={root / 'fp'}",
                 "--out", str(root / "q8")]) == 0
    return root


@pytest.fixture(scope="module")
def side_by_side(runs, tmp_path_factory):
    """`qrobust card fp q8 --budget test`: two run folders, one card."""
    out = tmp_path_factory.mktemp("card-out")
    assert main(["card", str(runs / "fp"), str(runs / "q8"), "--budget", "test", "--out", str(out),
                 "--no-progress"]) == 0
    return out, json.loads((out / "card.json").read_text())


def _rows(model: dict):
    for section in SECTIONS:
        yield from ((section, r) for r in model[section]["rows"])


def test_card_json_has_every_section_with_budgets_and_values_in_range(side_by_side):
    _, card = side_by_side
    assert card["budget"] == json.loads(json.dumps(dataclasses.asdict(BUDGETS["test"])))
    assert {"cpu", "threads", "torch", "git_commit"} <= set(card["environment"])
    fp, q8 = card["models"]
    assert fp["kind"] == "float (fp32)" and q8["kind"] == "QAT 8-bit (server)"
    checked = 0
    for model in (fp, q8):
        assert set(SECTIONS) <= set(model) and set(model["seconds"]) == set(SECTIONS)
        for section, r in _rows(model):
            assert {"key", "label", "value", "unit", "attack", "budget", "rule"} <= set(r), (section, r)
            if r.get("na"):
                assert r["value"] is None and len(r["na"]) > 10
                continue
            v = r["value"]
            if r["unit"] == "share":
                assert 0.0 <= v <= 1.0, r
                checked += 1
            elif r["unit"] in ("bytes", "ms", "images/s"):
                assert v > 0, r
            if "strict" in r:  # deterministic models: the expected/strict rule gives equal figures
                assert r["strict"] == pytest.approx(v, abs=0), r
    assert checked > 20
    rows = {r["key"]: r for _, r in _rows(q8)}
    assert rows["int8_agreement_torch"]["value"] >= 0.9 and rows["int8_agreement_onnx"]["value"] >= 0.9
    assert rows["int8_path"]["value"] in ("torch.ao", "ONNX Runtime")
    assert rows["size_int8"]["value"] < rows["size_twin"]["value"] / 2
    assert rows["asr_transfer_0"]["value"] is not None  # the float model came from quant.init
    assert "quant.init" in rows["asr_transfer_0"]["attack"]
    assert rows["dcp_l1_heldout"]["value"] <= 0.6 + 1e-6
    assert rows["worst_1"]["value"] <= min(rows[k]["value"] for k in ("apgd_1", "square_1", "bpda_1")) + 1e-9
    fp_rows = {r["key"]: r for _, r in _rows(fp)}
    assert "float model" in fp_rows["size_int8"]["na"] and "BPDA would equal" in fp_rows["bpda_0"]["na"]


def test_html_is_one_self_contained_page_with_both_models(side_by_side):
    out, card = side_by_side
    page = (out / "card.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "url(" not in page and "@import" not in page
    assert page.count('src="data:image/png;base64,') == 5
    for m in card["models"]:
        assert page.count(m["name"]) >= 5  # a column in every section's table
    md = (out / "card.md").read_text()
    assert "| | fp | q8 | attack; budget; rule |" in md
    assert all((out / f"card-{name}.png").is_file() for name in (*SECTIONS, "examples"))


def test_a_second_run_reuses_the_cached_sections(side_by_side, runs):
    out, card = side_by_side
    again, _ = qr.cards.card_folders([str(runs / "fp"), str(runs / "q8")], "test", out, progress=False)
    for old, new in zip(card["models"], again["models"], strict=True):
        assert new["seconds"] == old["seconds"]  # read back, not recomputed
        assert new["whitebox"]["rows"] == old["whitebox"]["rows"]


class HardRound(nn.Module):
    """8-bit input rounding without a straight-through estimator: zero input gradients (masking)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


def test_masking_warning_fires_on_a_masking_model_and_not_on_a_plain_one(runs, synthetic):
    from qrobust.pipeline import load_run

    net = load_run(runs / "fp")[1]
    budget = dataclasses.replace(BUDGETS["test"], eps=(0.15, 0.3), eps_labels=("0.15", "0.3"), square_queries=40,
                                 eval_images=48)
    data = (synthetic.train_x, synthetic.train_y, synthetic.test_x, synthetic.test_y)  # tensors, not ImageData
    card = qr.card({"plain": net, "masked": HardRound(net)}, data, budget=budget, bpda_model={"masked": net})
    plain, masked = card["models"]
    assert not any("masking suspected" in w for w in plain["warnings"]), plain["warnings"]
    assert any("masking suspected" in w for w in masked["warnings"]), masked["warnings"]
    assert any("set-up check" in w and "gradients" in w for w in masked["warnings"])
    rows = {r["key"]: r["value"] for r in masked["whitebox"]["rows"]}
    assert rows["square_1"] < rows["apgd_1"] and rows["worst_1"] <= rows["square_1"]
    assert rows["bpda_1"] is not None  # the stand-in given for the masking model


class Noisy(nn.Module):
    """Gaussian input noise in eval mode too: a randomised model (per-sample draws)."""

    def __init__(self, net: nn.Module, std: float):
        super().__init__()
        self.net, self.std = net, std

    def forward(self, x):
        return self.net((x + self.std * torch.randn_like(x)).clamp(0, 1))


class RandomScale(nn.Module):
    """One random logit scale and shift per forward pass: randomness per call, not per sample."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * (1 + torch.rand(())) + torch.randn(()) * torch.arange(10.0)


def test_profile_finds_randomness_per_sample_and_per_call(runs, synthetic):
    from qrobust.pipeline import load_run

    net = load_run(runs / "fp")[1]
    x = synthetic.test_x[:8].float() / 255
    plain, noisy, per_call = (battery.profile(m, x, 10, None) for m in (net, Noisy(net, 0.3), RandomScale(net)))
    assert (plain.randomised, noisy.randomised, per_call.randomised) == (False, True, True)
    assert (noisy.per_call, per_call.per_call) == (False, True)
    with pytest.raises(ConfigError, match="logits"):
        battery.profile(nn.Sequential(net, nn.Linear(10, 3)), x, 10, None)


def test_randomised_model_reports_expected_at_least_strict(runs, synthetic):
    from qrobust.pipeline import load_run

    net = load_run(runs / "fp")[1]
    budget = dataclasses.replace(BUDGETS["test"], evaluations=4)
    card = qr.card(Noisy(net, 0.35), synthetic, budget=budget)
    model = card["models"][0]
    assert model["profile"]["randomised"] and model["whitebox"]["eot"] == budget.eot
    pairs = [(r["value"], r["strict"]) for _, r in _rows(model) if "strict" in r]
    assert len(pairs) >= 7 and all(e >= s for e, s in pairs)
    assert any(e > s for e, s in pairs)  # the noise does flip some images between evaluations
    assert "randomised" in model["profile"]["int8"] or "not a qrobust" in model["profile"]["int8"]


def _study(root, study: str):
    """The study's smoke config, its top-level folder opened as the engine opens it."""
    from qrobust.experiment import open_study

    module = __import__(f"qrobust.studies.{study}.config", fromlist=["config"])
    cfg = module.load_study_config(module.preset_path("smoke"), [f"out_root={root}", f"name={study}"])
    open_study(cfg)
    return cfg


def _fake_stage(root, study: str, stage: str, model: nn.Module, extra: dict | None = None):
    """A study's model stage as the engine lays it out (Stages.model_run), holding ``model``'s weights."""
    from qrobust.experiment import Stages
    from qrobust.runs import atomic_torch_save
    from qrobust.train.objectives import CrossEntropy

    stages = Stages(root / study / "seed-0", 0)
    run = stages.model_run(stage, CrossEntropy(), qr.TrainSection(epochs=1), {})
    atomic_torch_save({"model": model.state_dict()}, run.checkpoint_path)
    run.write_json("results.json", {"complete": True})
    for name, value in (extra or {}).items():
        stages.write_json(name, value)
    return run.path


def test_study_stages_are_rebuilt_from_their_stored_config(tmp_path, synthetic):
    from qrobust.quant import RandomPrecision, make_switchable_bn
    from qrobust.quant.sq_model import build_sq_model
    from qrobust.studies.divqat.data import build_model
    from qrobust.studies.qadtr.defenses import DEFENSES, build_float_model, qat_model

    cfg = _study(tmp_path, "divqat")
    fp = build_model(cfg, cfg.model.arch, synthetic.info)
    _fake_stage(tmp_path, "divqat", "fp32", fp)
    qat = _fake_stage(tmp_path, "divqat", "qat-mobile", qr.quantize(fp, qr.QuantConfig(8, 8, backend="mobile")))
    s = from_folder(qat)
    assert s.describe["kind"] == "QAT 8-bit (mobile)" and s.float_model is not None
    key = next(k for k in fp.state_dict() if k.endswith("weight"))
    assert torch.equal(s.model.state_dict()[key], fp.state_dict()[key])  # the stage's weights, loaded

    cfg = _study(tmp_path, "qadtr")
    model = qat_model(build_float_model(cfg, synthetic.info), cfg.defense.train_bits)
    qr.calibrate(model, synthetic.train_x[:64].float() / 255)
    if DEFENSES["qadtr"].switchable_bn(cfg):
        make_switchable_bn(model, cfg.defense.bit_widths)
    stage = _fake_stage(tmp_path, "qadtr", "defense-qadtr", model)
    assert from_folder(stage).describe["kind"].startswith("QADT-R, ")
    rand = from_folder(f"{stage}@rand")
    assert isinstance(rand.model, RandomPrecision) and rand.float_model is None  # no fp32 stage written here
    torch.manual_seed(0)  # random precision draws its widths from the global RNG
    assert battery.profile(rand.model, synthetic.test_x[:8].float() / 255, 10, None).per_call
    with pytest.raises(ConfigError, match="width suffix"):
        from_folder(f"{qat}@rand")

    cfg = _study(tmp_path, "sq")
    ranges = {"body.0": [0.0, 2.0]}
    fp = qr.model_for_data(cfg.model.arch, synthetic.info)
    sq = build_sq_model(fp, ranges, cfg.sq_settings(), cfg.sq.at_input)
    stage = _fake_stage(tmp_path, "sq", "sq-mi", sq, {"calibration.json": ranges})
    s = from_folder(stage)
    assert isinstance(s.model, qr.EnsembleSQ) and s.describe["kind"].startswith("SQ ensemble")
    with pytest.raises(ConfigError, match="study folder"):
        from_folder(tmp_path / "sq")


def test_bad_inputs_are_one_line_config_errors(runs, synthetic, tmp_path, capsys):
    from qrobust.pipeline import load_run

    net = load_run(runs / "fp")[1]
    cases = [
        (lambda: qr.card("model", synthetic, budget="test"), "nn.Module"),
        (lambda: qr.card(net, "data", budget="test"), "ImageData"),
        (lambda: qr.card(net, synthetic, budget="huge"), "budget 'huge' is unknown"),
        (lambda: qr.card(net, (synthetic.train_x.float(), synthetic.train_y, synthetic.test_x.float(),
                                synthetic.test_y), budget="test"), r"\[0, 1\]"),
        (lambda: qr.card({"a": net, "b": net, "c": net}, synthetic, budget="test"), "one or two"),
        (lambda: from_folder(tmp_path / "nothing"), "not a folder"),
        (lambda: from_folder(tmp_path), "no config.toml"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert main(["card", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrobust: error:") and "\n" not in err
    assert main(["card", str(runs / "fp"), "--budget", "huge"]) == 2
