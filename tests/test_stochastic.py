"""Stochastic quantizer (SQ), its ensemble, the MI ensemble objective and MI detection (arXiv:2312.00105).

Tiny models and synthetic data only; run with OMP_NUM_THREADS=1.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.detection import (
    MIDetector,
    auroc,
    information_plane,
    mutual_information,
    plot_information_plane,
)
from qrobust.errors import ConfigError
from qrobust.quant.stochastic import (
    EnsembleSQ,
    SQConfig,
    StochasticQuantizer,
    deterministic_sq,
    ensemble_entropies,
    ensemble_forward,
    ensemble_predict,
    insert_stochastic_quantizers,
    rounded_copy,
    spacing_penalty,
    stochastic_quantizers,
)
from qrobust.registry import DEFENSES, OBJECTIVES
from qrobust.train.sq_objective import MIEnsembleLoss

BINS4 = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])


def hand_probs(v: float, bins: torch.Tensor, alpha: float) -> torch.Tensor:
    """The documented law: softmax_k(-alpha (v - b_k)^2 / D^2), D the mean gap."""
    gap = (bins[-1] - bins[0]) / (len(bins) - 1)
    return torch.softmax(-alpha * (v - bins) ** 2 / gap**2, dim=0)


def frequencies(sq: StochasticQuantizer, v: float, n: int = 20000) -> torch.Tensor:
    with torch.no_grad():
        out = sq(torch.full((n,), v))
        bins = sq.bin_centres()
    index = (out.unsqueeze(-1) == bins).float().argmax(-1)
    return torch.bincount(index, minlength=len(bins)).float() / n


def blobs(n: int, seed: int):
    """Three Gaussian blobs in [0, 1]^2, labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = (centres[y] + 0.08 * torch.randn(n, 2, generator=g)).clamp(0, 1)
    return x, y


def tiny_sq_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    return insert_stochastic_quantizers(net, after=["1"], at_input=True, num_bins=8, low=0.0, high=1.0)


@pytest.fixture(scope="module")
def trained():
    """A tiny SQ network trained with the MI ensemble objective; the loss and accuracy history."""
    torch.manual_seed(0)
    x, y = blobs(300, seed=1)
    model = tiny_sq_net()
    objective = MIEnsembleLoss(beta=0.05, spacing_weight=0.01, n_draws=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    history = []
    for _ in range(80):
        loss, metrics = objective(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return model.eval(), history


# --- the quantizer -----------------------------------------------------------------------------------


def test_forward_outputs_exactly_bin_values():
    torch.manual_seed(0)
    sq = StochasticQuantizer(num_bins=4, low=0.0, high=1.0, learnable=False)
    v = torch.linspace(-0.5, 1.5, 401).reshape(1, 401)
    bins = sq.bin_centres()
    assert torch.equal(bins, BINS4)
    for deterministic in (False, True):
        sq.deterministic = deterministic
        out = sq(v)
        assert out.shape == v.shape
        assert (out.unsqueeze(-1) == bins).any(-1).all(), "an output is not exactly a bin centre"
    # Deterministic mode is nearest-bin rounding, written out by hand.
    nearest = BINS4[(v.unsqueeze(-1) - BINS4).abs().argmin(-1)]
    assert torch.equal(sq(v), nearest)


def test_gradients_flow_to_input_and_learnable_bins():
    torch.manual_seed(0)
    sq = StochasticQuantizer(num_bins=4, learnable=True)
    v = torch.rand(64, requires_grad=True)
    (sq(v) * torch.randn(64)).sum().backward()
    for name, grad in (("input", v.grad), ("gaps", sq.raw_gaps.grad), ("shift", sq.shift.grad)):
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    fixed = StochasticQuantizer(num_bins=4, learnable=False)
    assert list(fixed.parameters()) == []


@pytest.mark.parametrize("tau", [0.2, 1.0, 5.0])
def test_input_gradient_is_the_gumbel_softmax_relaxation_at_temperature_tau(tau):
    # Reference: the same Gumbel noise (same seed), relaxed value sum_k softmax((l + g) / tau)_k b_k.
    sq = StochasticQuantizer(num_bins=4, alpha=4.0, tau=tau, learnable=False)
    v = torch.linspace(0.05, 0.95, 19, requires_grad=True)
    torch.manual_seed(1)
    sq(v).sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    noise = -torch.empty(4, 19).exponential_().log().T  # the SQ draws its noise as [K, *v.shape]
    logits = -4.0 * (v_ref.unsqueeze(-1) - BINS4) ** 2 / (1 / 3) ** 2
    (torch.softmax((logits + noise) / tau, -1) * BINS4).sum().backward()
    assert torch.allclose(v.grad, v_ref.grad, atol=1e-5, rtol=1e-4)


def test_sampling_is_random_and_deterministic_mode_repeatable():
    torch.manual_seed(0)
    sq = StochasticQuantizer(num_bins=4).eval()  # eval mode: still random (the defense)
    v = torch.full((1000,), 0.5)  # half-way between 1/3 and 2/3
    assert not torch.equal(sq(v), sq(v))
    with deterministic_sq(sq):
        first = sq(v)
        assert torch.equal(first, sq(v))
    assert not sq.deterministic, "the context must restore sampling"


def test_rounded_copy_rounds_and_leaves_the_network_sampling():
    torch.manual_seed(0)
    net = nn.Sequential(StochasticQuantizer(num_bins=4), nn.Linear(1000, 3),
                        StochasticQuantizer(num_bins=4, low=-1.0, high=1.0)).eval()
    with torch.no_grad():
        net[0].raw_gaps.add_(torch.tensor([0.2, -0.1, 0.0]))  # a learned, non-uniform grid
        net[0].shift.fill_(-0.05)
    v = torch.rand(2, 1000)
    rounded = rounded_copy(net)
    assert torch.equal(rounded(v), rounded(v))  # one deterministic forward
    with deterministic_sq(net):
        assert torch.equal(rounded(v), net(v))  # nearest-bin rounding on the same weights and grid
    assert not any(sq.deterministic for sq in stochastic_quantizers(net))
    assert not torch.equal(net(v), net(v))  # the original still samples
    for (name, p), (_, q) in zip(net.named_parameters(), rounded.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name  # a copy, not shared


@pytest.mark.parametrize("tau", [0.3, 3.0])
def test_sample_law_is_softmax_of_distance_logits_for_any_tau(tau):
    torch.manual_seed(0)
    sq = StochasticQuantizer(num_bins=4, alpha=2.0, tau=tau, learnable=False)
    freq = frequencies(sq, 0.4)
    expected = hand_probs(0.4, BINS4, alpha=2.0)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_distribution_concentrates_on_nearest_bin_as_alpha_grows():
    torch.manual_seed(0)
    nearest = []
    for alpha in (0.5, 2.0, 8.0, 32.0):
        freq = frequencies(StochasticQuantizer(num_bins=4, alpha=alpha, learnable=False), 0.4)
        nearest.append(freq[1].item())  # 1/3 is the bin nearest to 0.4
    assert all(a < b for a, b in zip(nearest, nearest[1:], strict=False)), nearest
    assert nearest[0] < 0.5 and nearest[-1] > 0.99, nearest


def test_spacing_regulariser_zero_on_grid_penalises_collapse_and_stretch():
    sq = StochasticQuantizer(num_bins=4, learnable=True)
    assert sq.spacing_regulariser().item() == 0.0
    with torch.no_grad():
        sq.raw_gaps[0] = -6.0  # gap ~0.0025: bins 0 and 1 collapse
    collapsed = sq.spacing_regulariser()
    assert collapsed.item() > 1.0
    collapsed.backward()
    assert sq.raw_gaps.grad[0] < 0, "descending the penalty must widen the collapsed gap"
    stretched = StochasticQuantizer(num_bins=4, learnable=True)
    with torch.no_grad():
        stretched.raw_gaps[1] = 3.0
        stretched.shift.fill_(0.5)
    assert stretched.spacing_regulariser().item() > 0.5
    shifted = StochasticQuantizer(num_bins=4, low=0.0, high=2.0)
    with torch.no_grad():
        shifted.shift.fill_(0.5)  # a quarter of the range, gaps untouched: (0.5 / 2)^2
    assert shifted.spacing_regulariser().item() == pytest.approx(0.0625)
    net = nn.Sequential(sq, nn.Linear(1, 1), stretched)
    expected = collapsed.detach() + stretched.spacing_regulariser().detach()
    assert torch.allclose(spacing_penalty(net), expected)
    assert StochasticQuantizer(learnable=False).spacing_regulariser().item() == 0.0


def test_insert_stochastic_quantizers_places_them_and_keeps_the_model_working():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 3))
    out = insert_stochastic_quantizers(net, after=["0", "1.1"], at_input=True, num_bins=3, high=2.0)
    assert isinstance(out.sq_input, StochasticQuantizer) and out.net is net
    assert isinstance(net[0][1], StochasticQuantizer) and isinstance(net[1][1][1], StochasticQuantizer)
    sqs = list(stochastic_quantizers(out))
    assert len(sqs) == 3 and len({id(s.config) for s in sqs}) == 3  # own bins and flags each
    assert all(s.config.num_bins == 3 and s.config.high == 2.0 for s in sqs)
    assert out(torch.rand(5, 2)).shape == (5, 3)
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    insert_stochastic_quantizers(nested, after=["0", "0.1"])  # a module and its child
    assert isinstance(nested[0][1], StochasticQuantizer)
    assert isinstance(nested[0][0][1], nn.Sequential) and isinstance(nested[0][0][1][0], nn.ReLU)
    assert len(list(stochastic_quantizers(nested))) == 2
    plain = insert_stochastic_quantizers(nn.Sequential(nn.Linear(2, 3)), after=["0"])
    assert isinstance(plain, nn.Sequential) and isinstance(plain[0][1], StochasticQuantizer)


# --- the ensemble ------------------------------------------------------------------------------------


def test_ensemble_forward_is_one_batched_forward_call():
    torch.manual_seed(0)
    model = tiny_sq_net()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    logits = ensemble_forward(model, torch.rand(5, 2), n_draws=7)
    assert logits.shape == (7, 5, 3)
    assert calls == [35], "the N draws must be one forward pass over the repeated batch"


def test_ensemble_forward_matches_separate_forwards():
    torch.manual_seed(0)
    model = tiny_sq_net()
    x = torch.rand(4, 2)
    with deterministic_sq(model):  # the same numbers when nothing is random ...
        batched, separate = ensemble_forward(model, x, 3), torch.stack([model(x) for _ in range(3)])
    # ... up to float rounding: the batched pass runs nn.Linear on 12 rows, the separate ones on 4, and
    # the CPU's GEMM kernel may sum in another order for another row count (seen: 1.2e-7 on an Intel
    # AVX-512 CPU). Logits here are O(0.1-1); a wrong draw layout would be off by O(0.1).
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)
    # Random: each draw follows the SQ law. An SQ-only model outputs the quantized values themselves.
    sq = StochasticQuantizer(num_bins=4, alpha=2.0, learnable=False)
    v = torch.tensor([[0.1, 0.4, 0.5, 0.9]])
    expected = (torch.stack([hand_probs(float(t), BINS4, 2.0) for t in v[0]]) * BINS4).sum(-1)
    with torch.no_grad():
        batched = ensemble_forward(sq, v, 4000)  # [N, 1, 4]
        looped = torch.stack([sq(v) for _ in range(4000)])
    assert batched.shape == looped.shape == (4000, 1, 4)
    assert torch.allclose(batched.mean(0)[0], expected, atol=0.015)
    assert torch.allclose(looped.mean(0)[0], expected, atol=0.015)
    assert torch.allclose(batched.std(0), looped.std(0), atol=0.02)


def test_ensemble_predict_and_ensemble_sq_average_draw_probabilities():
    torch.manual_seed(0)
    model = tiny_sq_net()
    x = torch.rand(6, 2)
    with deterministic_sq(model):
        single = torch.softmax(model(x), -1)
        assert torch.allclose(ensemble_predict(model, x, 5), single, atol=1e-6)
        assert torch.allclose(torch.softmax(EnsembleSQ(model, 5)(x), -1), single, atol=1e-6)
    p = ensemble_predict(model, x, 9)
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)


def test_ensemble_entropies_hand_example():
    # Two confident draws that disagree: H(T) = log 2, H(T|X) ~ 0, I ~ log 2; two agreeing: I = 0.
    logits = torch.tensor([[[30.0, -30.0], [0.0, 0.0]], [[-30.0, 30.0], [0.0, 0.0]]])  # [N=2, B=2, C=2]
    h_t, h_cond, mi = ensemble_entropies(logits)
    assert torch.allclose(h_t, torch.tensor([math.log(2), math.log(2)]), atol=1e-6)
    assert torch.allclose(h_cond, torch.tensor([0.0, math.log(2)]), atol=1e-6)
    assert torch.allclose(mi, torch.tensor([math.log(2), 0.0]), atol=1e-6)


def test_mutual_information_nonnegative_and_zero_for_deterministic_models():
    torch.manual_seed(0)
    model = tiny_sq_net()
    with torch.no_grad():  # make the hidden layer land between bins so draws disagree
        model.net[2].weight.mul_(20)
    x = torch.rand(32, 2)
    mi = mutual_information(model, x, n_draws=16)
    assert mi.shape == (32,) and (mi >= 0).all() and mi.max() > 1e-3
    with deterministic_sq(model):
        assert torch.allclose(mutual_information(model, x, 16), torch.zeros(32), atol=1e-6)
    plain = nn.Sequential(nn.Linear(2, 3))
    assert torch.allclose(mutual_information(plain, x, 8), torch.zeros(32), atol=1e-6)


# --- the objective -----------------------------------------------------------------------------------


def test_mi_loss_trains_a_tiny_sq_model(trained):
    model, history = trained
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    x_test, y_test = blobs(300, seed=2)
    accuracy = (ensemble_predict(model, x_test, 8).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 1/3
    assert all(math.isfinite(v) for h in history for v in h.values())


def test_mi_loss_is_ce_minus_beta_mi_plus_spacing():
    torch.manual_seed(0)
    model = tiny_sq_net()
    with torch.no_grad():
        next(stochastic_quantizers(model)).raw_gaps.add_(0.3)  # nonzero spacing term
        model.net[2].weight.mul_(20)  # draws that disagree clearly, so the two CE forms differ
    x, y = blobs(16, seed=3)
    for ce_on in ("draws", "mean"):
        torch.manual_seed(5)
        loss, m = MIEnsembleLoss(beta=0.5, spacing_weight=2.0, n_draws=4, ce_on=ce_on)(model, x, y)
        torch.manual_seed(5)  # the same draws again (the same gradient-path sampler), for a hand computation
        p = torch.softmax(ensemble_forward(model, x, 4), -1).detach()  # [N, B, C]
        p_y = p.gather(-1, y.expand(4, -1).unsqueeze(-1)).squeeze(-1)  # [N, B]
        ce = -p_y.log().mean() if ce_on == "draws" else -p_y.mean(0).log().mean()
        mean_p = p.mean(0)
        mi = (-(mean_p * mean_p.log()).sum(-1) + (p * p.log()).sum(-1).mean(0)).mean()
        assert m["ce"] == pytest.approx(ce.item(), rel=1e-5)
        assert m["mi"] == pytest.approx(mi.item(), rel=1e-3, abs=1e-6)
        assert m["spacing"] > 0 and m["mi"] >= 0
        assert math.isclose(loss.item(), m["ce"] - 0.5 * m["mi"] + 2.0 * m["spacing"], rel_tol=1e-5)
        assert math.isclose(m["mi"], m["h_t"] - m["h_t_given_x"], abs_tol=1e-6)
    # beta > 0 rewards disagreement: the MI term's gradient on the logits raises the MI.
    logits = torch.randn(4, 8, 3, requires_grad=True)
    (-ensemble_entropies(logits)[2].mean()).backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert ensemble_entropies(stepped)[2].mean() > ensemble_entropies(logits)[2].mean()


# --- detection ---------------------------------------------------------------------------------------


def test_auroc_matches_hand_computed_values():
    clean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    adv = torch.tensor([2.0, 4.0, 5.0])
    # Pairs (adv > clean, ties count 1/2): 2 -> 1 + .5, 4 -> 3 + .5, 5 -> 4; 9 of 12.
    assert auroc(clean, adv) == pytest.approx(0.75)
    assert auroc(adv, clean) == pytest.approx(0.25)
    assert auroc(clean, clean.clone()) == pytest.approx(0.5)
    assert auroc(torch.zeros(5), torch.zeros(3)) == pytest.approx(0.5)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.9, 0.5])) == pytest.approx(1.0)


def test_detector_threshold_gives_the_requested_false_positive_rate():
    g = torch.Generator().manual_seed(0)
    clean_fit = torch.empty(4000).exponential_(generator=g)
    clean_new = torch.empty(4000).exponential_(generator=g)
    detector = MIDetector(fpr=0.1).fit_scores(clean_fit)
    assert detector.flag(clean_fit).float().mean().item() <= 0.1
    assert detector.flag(clean_new).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert detector.flag(clean_new + 3.0).float().mean().item() > 0.9
    below = MIDetector(fpr=0.2, direction="below").fit_scores(clean_fit)
    assert below.flag(clean_new).float().mean().item() == pytest.approx(0.2, abs=0.025)


def fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(EnsembleSQ(model, 4)(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def test_information_plane_detector_and_plot_with_fgsm(trained, tmp_path):
    model, _ = trained
    torch.manual_seed(0)
    x, y = blobs(200, seed=4)
    rows = information_plane(model, x, y, fgsm, [0.0, 0.1, "3/10"], n_draws=8, batch_size=64)
    assert [r["eps"] for r in rows] == [0.0, 0.1, 0.3]
    assert all(0 <= r["all_draws_accuracy"] <= r["accuracy"] + 1e-9 <= 1 + 1e-9 for r in rows)
    assert all(r["mean_mi"] >= 0 for r in rows)
    assert rows[0]["accuracy"] > 0.8 and rows[-1]["accuracy"] < rows[0]["accuracy"] - 0.2, rows
    detector = MIDetector(fpr=0.1, n_draws=8).fit(model, x)
    assert detector.threshold is not None
    assert detector.detect(model, x).float().mean().item() <= 0.15
    path = plot_information_plane(rows, tmp_path / "aip" / "plane.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# --- settings and registries -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 0, -3, 2.5, True])
def test_fewer_than_two_bins_is_a_config_error(k):
    with pytest.raises(ConfigError, match="num_bins >= 2"):
        StochasticQuantizer(num_bins=k)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_temperature_is_a_config_error(tau):
    with pytest.raises(ConfigError, match="tau must be a finite number > 0"):
        SQConfig(tau=tau)


@pytest.mark.parametrize("n", [0, -2, 1.5])
def test_bad_number_of_draws_is_a_config_error(n):
    model = tiny_sq_net()
    for call in (
        lambda: ensemble_forward(model, torch.rand(2, 2), n),
        lambda: ensemble_predict(model, torch.rand(2, 2), n),
        lambda: EnsembleSQ(model, n),
        lambda: MIEnsembleLoss(n_draws=n),
        lambda: mutual_information(model, torch.rand(2, 2), n),
    ):
        with pytest.raises(ConfigError, match="draws must be an integer >= 1"):
            call()


def test_other_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="at least 2 draws"):
        MIEnsembleLoss(beta=0.1, n_draws=1)
    MIEnsembleLoss(beta=0.0, n_draws=1)  # plain CE on one draw is fine
    with pytest.raises(ConfigError, match="ce_on"):
        MIEnsembleLoss(ce_on="average")
    with pytest.raises(ConfigError, match="low < high"):
        SQConfig(low=1.0, high=1.0)
    with pytest.raises(ConfigError, match="no such submodule.*valid names include: 0"):
        insert_stochastic_quantizers(nn.Sequential(nn.Linear(2, 2)), after=["fc"])
    with pytest.raises(ConfigError, match="fpr"):
        MIDetector(fpr=0.0)
    with pytest.raises(ConfigError, match="attack strengths"):
        information_plane(nn.Linear(2, 3), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), fgsm, ["8/0"])
    with pytest.raises(ConfigError, match="no threshold"):
        MIDetector().flag(torch.zeros(3))


def test_registered_by_name():
    assert OBJECTIVES.get("mi-ensemble") is MIEnsembleLoss
    assert DEFENSES.get("mi-detector") is MIDetector


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    torch.manual_seed(0)
    model = tiny_sq_net().cuda()
    x, y = (t.cuda() for t in blobs(32, seed=5))
    loss, metrics = MIEnsembleLoss(n_draws=4)(model, x, y)
    loss.backward()
    assert math.isfinite(metrics["loss"])
    assert next(stochastic_quantizers(model)).raw_gaps.grad.is_cuda
    mi = mutual_information(model, x, 4)
    assert mi.is_cuda and (mi >= 0).all()
    detector = MIDetector(fpr=0.1, n_draws=4).fit(model, x)
    assert detector.detect(model, x).is_cuda
    assert ensemble_predict(model, x, 4).is_cuda


# --- the shared deterministic prefix ------------------------------------------------------------------


def test_ensemble_forward_runs_the_prefix_before_the_first_sq_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    model = insert_stochastic_quantizers(net, after=["1"], num_bins=8, low=0.0, high=1.0)
    rows = {}
    model[0].register_forward_hook(lambda m, i, o: rows.update(prefix=i[0].shape[0]))
    model[2].register_forward_hook(lambda m, i, o: rows.update(suffix=i[0].shape[0]))
    x = torch.rand(5, 2, requires_grad=True)
    out = ensemble_forward(model, x, 7)
    assert out.shape == (7, 5, 3) and rows == {"prefix": 5, "suffix": 35}
    # The draws are still independent (the SQ after the prefix gets 7 x 5 noise draws) ...
    assert not torch.equal(out[0], out[1])
    # ... and the values and gradients equal the repeated-input path when nothing is random.
    with deterministic_sq(model):
        shared = ensemble_forward(model, x, 3)
        (g_shared,) = torch.autograd.grad(shared.square().sum(), x)
        plain = ensemble_forward(model, x, 3, share_prefix=False)
        (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    # (a tolerance: the prefix runs on 5 rows in one path and on 15 in the other, so GEMM rounding may differ)
    assert torch.allclose(shared, plain, atol=1e-6) and torch.allclose(g_shared, g_plain, atol=1e-6)
    # A model without SQs gives N copies of its output: one forward on the same 5 rows, so bit-equal.
    assert torch.equal(ensemble_forward(net[0], x, 4), net[0](x).expand(4, 5, 16))


def test_ensemble_forward_skip_around_the_first_sq_fails_loudly_unless_not_shared():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(3, 3), StochasticQuantizer(num_bins=4))

        def forward(self, x):
            return x + self.inner(x)  # x bypasses the SQ

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), Skip())
    x = torch.rand(4, 2)
    with pytest.raises(RuntimeError):
        ensemble_forward(model, x, 3)
    assert ensemble_forward(model, x, 3, share_prefix=False).shape == (3, 4, 3)


@pytest.mark.parametrize("v", [0.4, 0.5, 0.93])
def test_sampling_with_and_without_gradient_follows_the_same_law(v):
    # Without a gradient the SQ samples by inverse CDF, with one by Gumbel-max: two samplers, one law.
    torch.manual_seed(3)
    sq = StochasticQuantizer(num_bins=4, alpha=2.0, learnable=False)
    expected = hand_probs(v, BINS4, alpha=2.0)
    fast = frequencies(sq, v)
    x = torch.full((20000,), v, requires_grad=True)
    slow_out = sq(x).detach()
    slow = torch.bincount((slow_out.unsqueeze(-1) == BINS4).float().argmax(-1), minlength=4).float() / 20000
    assert torch.allclose(fast, expected, atol=0.015), (fast, expected)
    assert torch.allclose(slow, expected, atol=0.015), (slow, expected)


def test_ensemble_forward_splits_large_eval_batches_and_keeps_the_law():
    torch.manual_seed(0)
    model = tiny_sq_net().eval()
    rows = []
    model.net.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    x = torch.rand(10, 2)
    out = ensemble_forward(model, x, 4, max_rows=16)  # 40 rows -> sub-batches of 4 images
    assert out.shape[:2] == (4, 10) and max(rows) <= 16 and len(rows) == 3
    with deterministic_sq(model):  # without sampling, split and unsplit are the same numbers ...
        split = ensemble_forward(model, x, 4, max_rows=16)
        whole = ensemble_forward(model, x, 4, max_rows=None)
    # ... up to float rounding: 16-row and 40-row passes may use different GEMM summation orders
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    rows.clear()
    model.train()
    ensemble_forward(model, x, 4, max_rows=16)  # train mode: BatchNorm statistics need the whole batch
    assert rows == [40]
