"""The SQ study's library pieces on their own: range calibration and SQ insertion, the float twin,
per-input ensemble evaluation, the MI-adaptive attack and the ensemble objective of the training loop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.adaptive import mi_adaptive_pgd
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import quantize, set_quantization_enabled
from qrobust.quant.sq_model import build_sq_model, calibrate_ranges, float_twin, has_quantizers, input_rounded
from qrobust.quant.stochastic import (
    StochasticQuantizer,
    correct_per_draw,
    deterministic_sq,
    disagreement_rate,
    diversity_stats,
    ensemble_entropies,
    ensemble_forward,
    ensemble_log_probs,
    ensemble_stats,
    insert_stochastic_quantizers,
    mi_sqs,
    representation_entropies,
    stochastic_quantizers,
)
from qrobust.registry import ATTACKS, EVASION
from qrobust.studies.sq.evaluate import counts, sq_first_boundaries, sq_gap_ratios, sq_shifts
from qrobust.train.sq_objective import MIEnsembleLoss, SQEnsembleObjective

SETTINGS = {"num_bins": 4, "alpha": 4.0, "tau": 1.0, "learnable": True}


def _lenet():
    torch.manual_seed(0)
    return build_model("lenet5", channels=1, num_classes=10, image_size=(28, 28)).eval()


def _sq_classifier(alpha=1.0):
    """A linear classifier on 2x4x4 images with a noisy SQ on its input: a quick randomised model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, 5))
    return insert_stochastic_quantizers(net, at_input=True, num_bins=4, alpha=alpha).eval()


def test_calibrated_ranges_cover_the_activations_and_leave_the_mode():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).train()
    x = torch.rand(200, 4)
    (low, high), = calibrate_ranges(net, x, ["1"], 99.9).values()
    with torch.no_grad():
        acts = net(x)
    assert low == 0.0 and 0 < high <= float(acts.max()) + 1e-6
    assert float((acts <= high).float().mean()) >= 0.99
    assert net.training and net[0].training
    with pytest.raises(ConfigError, match="unknown module"):
        calibrate_ranges(net, x, ["7"], 99.9)
    dead = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)  # every ReLU output is 0
    with pytest.raises(ConfigError, match="constant"):
        calibrate_ranges(dead, x, ["1"], 99.9)


def test_build_sq_model_inserts_calibrated_sqs_into_a_copy():
    fp = _lenet()
    x = torch.rand(64, 1, 28, 28)
    ranges = calibrate_ranges(fp, x, ["body.0"], 99.0)
    sq = build_sq_model(fp, ranges, {**SETTINGS, "beta": 0.5}, at_input=True)
    sqs = list(stochastic_quantizers(sq))
    assert len(sqs) == 2 and not has_quantizers(fp), "two SQs in the copy, none in the float model"
    assert isinstance(sq.sq_input, StochasticQuantizer)
    assert (sq.sq_input.config.low, sq.sq_input.config.high) == (0.0, 1.0)
    inner = sq.net.get_submodule("body.0")[1]
    assert isinstance(inner, StochasticQuantizer) and [inner.config.low, inner.config.high] == ranges["body.0"]
    assert all(q.config.num_bins == 4 and q.config.learnable for q in sqs)
    # the same weights: with the SQs as identities the copy computes the float model's function
    assert torch.equal(float_twin(sq)(x), fp(x))
    without_input = build_sq_model(fp, ranges, SETTINGS, at_input=False)
    assert len(list(stochastic_quantizers(without_input))) == 1


def test_float_twin_has_no_quantizer_and_matches_the_float_forward():
    net = _lenet()
    qat = quantize(net, inplace=False)
    x = torch.rand(8, 1, 28, 28)
    qat(x)  # observe activation ranges
    twin = float_twin(qat)
    # two module structures for one computation: a tolerance for kernels that may round differently
    # (logits are O(0.1); fake quantization changes them by far more than 1e-5)
    assert torch.allclose(twin(x), set_quantization_enabled(qat, False)(x), rtol=1e-5, atol=1e-6)
    set_quantization_enabled(qat, True)
    assert not torch.allclose(twin(x), qat(x), rtol=1e-5, atol=1e-6), "the twin must differ from the quantized model"
    assert has_quantizers(qat) and not has_quantizers(net)
    sq_net = insert_stochastic_quantizers(copy.deepcopy(net), at_input=True, num_bins=4)
    sq_twin = float_twin(sq_net)
    assert not any(isinstance(m, StochasticQuantizer) for m in sq_twin.modules())
    assert any(isinstance(m, StochasticQuantizer) for m in sq_net.modules()), "the original is left alone"
    assert torch.allclose(sq_twin(x), net(x), rtol=1e-5, atol=1e-6)
    assert has_quantizers(sq_net) and not has_quantizers(sq_twin)


def test_input_rounded_is_the_float_net_on_pixels_rounded_to_fixed_levels():
    net = _lenet()
    before = copy.deepcopy(net.state_dict())
    inq = input_rounded(net, 4).train()
    x = torch.rand(8, 1, 28, 28)
    by_hand = (x * 3).round() / 3  # levels 0, 1/3, 2/3, 1 (no value of torch.rand sits on a tie)
    with torch.no_grad():
        net.train()
        ref = net(by_hand)
        assert torch.equal(inq(x), inq(x)), "deterministic: no sampling, also in training"
        # the same weights on the rounded pixels; one tolerance for the two module structures' kernels
        assert torch.allclose(inq(x), ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(inq(x), net(x), rtol=1e-3, atol=1e-3), "the rounding must change the input"
    sq = next(m for m in inq.modules() if isinstance(m, StochasticQuantizer))
    assert sq.deterministic and not list(sq.parameters()), "a fixed grid: nothing of it is trained"
    x_adv = x.clone().requires_grad_()
    inq(x_adv).sum().backward()  # attacks get the straight-through relaxed gradient, not zero
    assert x_adv.grad is not None and x_adv.grad.abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "fp is left as it was"


def test_ensemble_evaluation_per_input():
    net = _lenet()
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    plain = net(x).argmax(1) == y
    # a deterministic model: every draw is the same, the MI is 0, the ensemble is the model
    per_draw = correct_per_draw(net, x, y, 3, 4)
    assert per_draw.shape == (3, 10) and all(torch.equal(row, plain) for row in per_draw)
    ok, all_ok, mi = ensemble_stats(net, x, y, 4, 3)
    assert torch.equal(ok, plain) and torch.equal(all_ok, plain) and torch.equal(mi, torch.zeros(10))
    # a randomised model: all draws correct implies the first draw correct (one batch: the first draw
    # comes first in the RNG stream either way)
    sq = _sq_classifier()
    xs, ys = torch.rand(200, 2, 4, 4), torch.randint(0, 5, (200,))
    torch.manual_seed(1)
    first = correct_per_draw(sq, xs, ys, 1, 256).all(0)
    torch.manual_seed(1)
    every = correct_per_draw(sq, xs, ys, 6, 256).all(0)
    assert every.sum() < first.sum() and not (every & ~first).any()
    torch.manual_seed(2)
    ok, all_ok, mi = ensemble_stats(sq, xs, ys, 4, 64)
    torch.manual_seed(2)
    with torch.no_grad():  # the SQ samples by another path (same law, other stream) when a gradient is wanted
        logits = torch.cat([ensemble_forward(sq, xs[s : s + 64], 4) for s in range(0, 200, 64)], dim=1)
    assert torch.equal(ok, ensemble_log_probs(logits).argmax(1) == ys)
    assert torch.equal(all_ok, (logits.argmax(-1) == ys).all(0)) and not (all_ok & ~ok).any()
    assert torch.equal(mi, ensemble_entropies(logits)[2].clamp_min(0.0)) and mi.max() > 0


def _attack_loss(model, x, y, n, lam):
    torch.manual_seed(5)
    logits = ensemble_forward(model, x.repeat(8, 1, 1, 1), n)
    ce = F.nll_loss(ensemble_log_probs(logits), y.repeat(8))
    return float((ce - lam * ensemble_entropies(logits)[2].mean()).detach())


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mi_adaptive_pgd_stays_in_the_ball_and_raises_its_objective(lam):
    model = _sq_classifier()
    x, y = torch.rand(64, 2, 4, 4), torch.randint(0, 5, (64,))
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    x_adv = mi_adaptive_pgd(model, x, y, 0.1, n_draws=4, steps=5, eot=2, lam=lam,
                            generator=torch.Generator().manual_seed(3))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert _attack_loss(model, x_adv, y, 4, lam) > _attack_loss(model, x, y, 4, lam) + 0.05
    torch.manual_seed(0)  # the same seeds, the same examples
    again = mi_adaptive_pgd(model, x, y, 0.1, n_draws=4, steps=5, eot=2, lam=lam,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, x_adv)
    assert torch.equal(mi_adaptive_pgd(model, x, y, 0.0, n_draws=4), x)
    assert ATTACKS.get("mi-adaptive-pgd") is mi_adaptive_pgd and EVASION.get("mi-adaptive-pgd") is mi_adaptive_pgd


def test_sq_ensemble_objective_is_the_mi_loss_with_a_correct_count():
    model = _sq_classifier(alpha=4.0)
    x, y = torch.rand(16, 2, 4, 4), torch.randint(0, 5, (16,))
    loss = MIEnsembleLoss(beta=0.3, spacing_weight=0.02, n_draws=3, ce_on="mean")
    objective = SQEnsembleObjective(loss)
    torch.manual_seed(4)
    value, metrics = objective(model, x, y)
    torch.manual_seed(4)
    ref_value, ref_metrics = loss(model, x, y)
    assert torch.equal(value, ref_value) and metrics == {**ref_metrics, "correct": ref_metrics["accuracy"] * 16}
    assert objective.config() == {"name": "mi-ensemble", "beta": 0.3, "spacing_weight": 0.02, "n_draws": 3,
                                  "ce_on": "mean", "mi_on": "output"}


def _two_sq_classifier(alpha=1.0):
    """Input SQ -> linear features -> SQ -> linear classifier (the paper's pipeline, in miniature)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 5))
    net = insert_stochastic_quantizers(net, after=["2"], num_bins=4, low=0.0, high=2.0, alpha=alpha)
    return insert_stochastic_quantizers(net, at_input=True, num_bins=4, alpha=alpha).eval()


def test_representation_entropies_by_hand():
    # one value, K = 2, two images, two draws: image 0's draws give laws (1, 0) and (0, 1) -> (0.5, 0.5);
    # image 1's both (1, 0). H(T|x0) = log 2, H(T|x1) = 0; the marginal is (0.75, 0.25).
    probs = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])  # [N=2, B=2, E=1, K=2]
    h_t, h_cond, kl = representation_entropies([probs])
    h_marg = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert torch.allclose(h_cond, torch.tensor([math.log(2), 0.0]))
    assert torch.allclose(h_t, torch.full((2,), h_marg))
    # the batch mean of the pointwise KL is H(T) - mean H(T|X): the plug-in MI
    assert kl.mean().item() == pytest.approx(h_marg - math.log(2) / 2, abs=1e-6)
    with pytest.raises(ConfigError, match="at least one SQ"):
        representation_entropies([])


def test_mi_sqs_picks_the_sq_before_the_classifier():
    model = _two_sq_classifier()
    sqs = list(stochastic_quantizers(model))
    assert mi_sqs(model, "last-sq") == sqs[-1:] and mi_sqs(model, "every-sq") == sqs and mi_sqs(model, "output") == []
    assert sqs[-1] is model.net[2][1]  # after the features, before the classifier
    with pytest.raises(ConfigError, match="needs a model with stochastic quantizers"):
        mi_sqs(nn.Linear(2, 2), "last-sq")
    with pytest.raises(ConfigError, match="MI reading must be one of"):
        mi_sqs(model, "logits")


@pytest.mark.parametrize("mi_on", ["last-sq", "every-sq"])
def test_representation_mi_loss_is_ce_plus_beta_i_and_reaches_the_features(mi_on):
    model = _two_sq_classifier().train()
    x, y = torch.rand(16, 2, 4, 4), torch.randint(0, 5, (16,))
    results = {}
    for beta in (0.0, 2.0):
        torch.manual_seed(5)
        loss, m = MIEnsembleLoss(beta=beta, spacing_weight=0.0, n_draws=4, mi_on=mi_on)(model, x, y)
        results[beta] = (loss, m)
    (l0, m0), (l2, m2) = results[0.0], results[2.0]
    assert m0["mi"] == pytest.approx(m2["mi"]) and 0 < m2["mi"] <= math.log(4)  # same draws: same I
    assert 0 < m2["h_t_given_x"] <= m2["h_t"] <= math.log(4) + 1e-6 and 0 <= m2["disagreement"] <= 1
    assert l2.item() == pytest.approx(l0.item() + 2.0 * m2["mi"], rel=1e-5)  # L = CE + beta I(X; T)
    model.zero_grad()
    torch.manual_seed(5)
    MIEnsembleLoss(beta=2.0, spacing_weight=0.0, n_draws=4, ce_on="mean", mi_on=mi_on)(model, x, y)[0].backward()
    # the MI term's gradient reaches the feature layer and the last SQ's bins
    assert model.net[1].weight.grad.abs().sum() > 0 and model.net[2][1].raw_gaps.grad.abs().sum() > 0
    assert "mi_on" in SQEnsembleObjective(MIEnsembleLoss(mi_on=mi_on)).config()


def test_diversity_stats_of_a_deterministic_and_a_noisy_sq_model():
    model = _two_sq_classifier(alpha=0.5)
    x = torch.rand(20, 2, 4, 4)
    torch.manual_seed(0)
    noisy = diversity_stats(model, x, 8, batch_size=7)
    assert 0 < noisy["h_t_given_x"] <= noisy["h_t"] + 1e-6 and noisy["disagreement"] > 0 and noisy["output_mi"] > 0
    assert noisy["mi"] == pytest.approx(noisy["h_t"] - noisy["h_t_given_x"])
    for sq in stochastic_quantizers(model):
        sq.deterministic = True
    still = diversity_stats(model, x, 8, batch_size=7)
    assert still["disagreement"] == 0 and still["output_mi"] == pytest.approx(0, abs=1e-6)
    # the Rao-Blackwellised law still has entropy (the SQ law is soft); it no longer varies across draws,
    # and a sharper law (larger alpha) has less
    assert still["h_t_given_x"] > 0
    assert disagreement_rate(torch.zeros(3, 4, 5)).tolist() == [0.0] * 4


def test_counts_expected_and_strict():
    correct = torch.tensor([[True, True, False, True], [True, False, False, True]])  # [E=2, B=4]
    assert counts(correct) == (pytest.approx(5 / 8), pytest.approx(2 / 4))
    same = torch.tensor([[True, False, True]] * 3)  # a deterministic model: its evaluations agree
    assert counts(same)[0] == pytest.approx(counts(same)[1])


def test_grid_records_gaps_shift_and_first_boundary_by_hand():
    # input SQ on [0, 1], K = 4 (uniform gap 1/3): shifted down by 0.1 with its first gap 1.2x uniform
    net = nn.Sequential(StochasticQuantizer(num_bins=4), nn.Linear(3, 3),
                        StochasticQuantizer(num_bins=4, low=-2.0, high=2.0))
    with torch.no_grad():
        target = torch.tensor([0.4, 1 / 3, 1 / 3])
        net[0].raw_gaps.copy_(torch.log(torch.expm1(target)))  # softplus^-1
        net[0].shift.fill_(-0.1)
    gaps, shifts, bounds = sq_gap_ratios(net), sq_shifts(net), sq_first_boundaries(net)
    assert gaps["0"] == pytest.approx([1.2, 1.0, 1.0], abs=1e-5) and gaps["2"] == pytest.approx([1.0] * 3, abs=1e-6)
    assert shifts == pytest.approx({"0": -0.1, "2": 0.0}, abs=1e-6)
    # first boundary = (b0 + b1) / 2 - low: (-0.1 + 0.3) / 2 = 0.1 for the input; half a gap (4/3 / 2) for the other
    assert bounds == pytest.approx({"0": 0.1, "2": 2 / 3}, abs=1e-5)
    with deterministic_sq(net[0]):  # a black pixel rounds up exactly past that boundary
        v = torch.tensor([0.0, 0.099, 0.101])
        assert net[0](v).tolist() == pytest.approx([-0.1, -0.1, 0.3], abs=1e-5)
