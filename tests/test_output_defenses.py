"""Output perturbation defenses: valid outputs, argmax behaviour, parameter checks, l1 calibration."""

from __future__ import annotations

import math

import pytest
import torch

from qrobust.defenses.output import (
    Defense,
    calibrate_defense,
    dcp,
    label_only,
    make_defense,
    mean_l1,
    reverse_sigmoid,
    rounding,
    top_k,
)
from qrobust.errors import ConfigError
from qrobust.registry import DEFENSES


def probability_batches(num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A sweep of probability vectors: flat to peaked softmaxes, Dirichlet, one-hot, uniform, exact zeros."""
    g = torch.Generator().manual_seed(num_classes)
    rows = [
        torch.softmax(torch.randn(200, num_classes, generator=g) * t, dim=1) for t in (0.05, 1, 4, 20, 80)
    ]
    with torch.random.fork_rng():  # Dirichlet sampling takes no generator; keep the global RNG untouched
        torch.manual_seed(num_classes)
        for alpha in (0.05, 0.5, 5.0):
            rows.append(torch.distributions.Dirichlet(torch.full((num_classes,), alpha)).sample((200,)))
    rows.append(torch.eye(num_classes))
    rows.append(torch.full((1, num_classes), 1.0 / num_classes))
    half = torch.zeros(1, num_classes)
    half[0, :2] = 0.5  # an exact tie and exact zeros
    rows.append(half)
    p = torch.cat(rows).to(dtype)
    return p / p.sum(dim=1, keepdim=True)  # rows sum to 1 in the final dtype


ALL_DEFENSES = [
    ("none", {}),
    ("rs", {"beta": 0.1, "gamma": 0.2}),
    ("rs", {"beta": 0.7, "gamma": 1.0}),
    ("rs", {"beta": 3.0, "gamma": 0.5}),
    ("rs", {"beta": 50.0, "gamma": 10.0}),
    ("rs", {"beta": 0.5, "gamma": 1e-3}),
    ("dcp", {"beta": 0.6, "gamma": 0.3}),
    ("dcp", {"beta": 2.0, "gamma": 0.3, "nu": 5.0, "threshold": 0.9}),
    ("round", {"decimals": 0}),
    ("round", {"decimals": 1}),
    ("round", {"decimals": 3}),
    ("topk", {"k": 1}),
    ("topk", {"k": 2}),
    ("label", {}),
]


@pytest.mark.parametrize("num_classes", [2, 10, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "params"), ALL_DEFENSES, ids=lambda v: str(v))
def test_defended_outputs_are_probability_vectors(name, params, num_classes, dtype):
    p = probability_batches(num_classes, dtype)
    y = make_defense(name, **params)(p)
    assert y.shape == p.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(dim=1), torch.ones(len(p), dtype=dtype), atol=1e-5, rtol=0)


def test_registry_holds_the_six_defenses():
    assert {"none", "rs", "dcp", "round", "topk", "label"} <= set(DEFENSES.names())
    assert DEFENSES.get("rs") is reverse_sigmoid


def test_reverse_sigmoid_matches_the_formula():
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    beta, gamma = 0.4, 0.7
    s = torch.sigmoid(gamma * torch.log(p / (1 - p)))
    expected = p - beta * (s - 0.5)
    expected = expected / expected.sum()
    torch.testing.assert_close(reverse_sigmoid(p, beta, gamma), expected, atol=1e-9, rtol=0)


def distinct_rows(num_classes: int) -> torch.Tensor:
    p = probability_batches(num_classes, torch.float64)
    top2 = p.topk(2, dim=1).values
    return p[(top2[:, 0] - top2[:, 1]) > 1e-9]  # no ties at the top


@pytest.mark.parametrize("gamma", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_rs_keeps_argmax_when_beta_gamma_below_one(gamma, num_classes):
    # f(p) = p - beta (sigmoid(gamma logit p) - 1/2) is strictly increasing iff beta*gamma < 1 (gamma >= 1)
    p = distinct_rows(num_classes)
    for beta in (0.1 / gamma, 0.5 / gamma, 0.99 / gamma):
        assert torch.equal(reverse_sigmoid(p, beta, gamma).argmax(1), p.argmax(1)), beta
        assert torch.equal(dcp(p, beta, gamma, threshold=1.0).argmax(1), p.argmax(1)), beta


def test_rs_flips_argmax_for_large_beta():
    # gamma = 1: f(p) = (1 - beta) p + beta / 2 is decreasing for beta > 1, so the argmax becomes the argmin
    p = distinct_rows(10)
    # distinct entries (a unique argmin), none inside the logit clamp [0, 1e-6] where f is increasing
    p = p[(p.sort(dim=1).values.diff(dim=1) > 1e-6).all(dim=1) & (p.min(dim=1).values > 1e-5)]
    assert len(p) > 100
    y = reverse_sigmoid(p, beta=1.5, gamma=1.0)
    assert torch.equal(y.argmax(1), p.argmin(1))


def test_rs_with_small_gamma_can_flip_argmax_below_beta_one():
    # gamma < 1: f is not monotone near p = 0, so a low-confidence row with a zero class can flip
    p = torch.tensor([[0.112] * 8 + [0.104, 0.0]])
    assert reverse_sigmoid(p, beta=0.5, gamma=0.2).argmax().item() == 9
    assert reverse_sigmoid(p, beta=0.2, gamma=0.2).argmax().item() == 0  # below the worst case (~0.28)


def test_dcp_gate_acts_below_the_threshold_only():
    p = probability_batches(10, torch.float64)
    confidence = p.max(dim=1).values
    beta, gamma, tau = 0.8, 0.5, 0.6
    y = dcp(p, beta, gamma, nu=1000.0, threshold=tau)
    confident, unsure = confidence > tau + 0.05, confidence < tau - 0.05
    assert confident.sum() > 10 and unsure.sum() > 10
    torch.testing.assert_close(y[confident], p[confident], atol=1e-12, rtol=0)
    torch.testing.assert_close(y[unsure], reverse_sigmoid(p[unsure], beta, gamma), atol=1e-12, rtol=0)


def test_dcp_at_studys_operating_point_keeps_top_class_but_reverses_the_tail():
    # The mechanism behind DCP's effect on DFME/MAZE (docs/divqat.md): at the beta the study calibrates
    # (~0.95 for l1 0.6, gamma 0.2) a low-confidence answer keeps its argmax, but its other classes come
    # back in reverse order and nearly flat, so an attacker fitting all log-probabilities learns a wrong tail.
    p = torch.tensor([[0.6, 0.25, 0.1, 0.03, 0.01, 0.005, 0.003, 0.001, 0.0007, 0.0003]], dtype=torch.float64)
    y = dcp(p, beta=0.9486, gamma=0.2, nu=1000.0)
    assert y.argmax().item() == 0
    assert y[0, 1:].argmax().item() == 8  # the least likely class is now the runner-up
    rare = y[0, 3:]  # the classes with p <= 0.03 come back in exactly reversed order
    assert torch.equal(rare.argsort(), p[0, 3:].argsort().flip(0))
    assert y[0, 0] - y[0, 1:].max() < 0.15 < p[0, 0] - p[0, 1]  # the top margin shrinks from 0.35 to < 0.15
    confident = torch.tensor([[0.97] + [0.03 / 9] * 9], dtype=torch.float64)  # a test image's typical answer
    # 0.02 above the threshold the gate is sigmoid(-21) ~ 5e-10: the answer moves by ~1e-9 at most
    torch.testing.assert_close(dcp(confident, beta=0.9486, gamma=0.2, nu=1000.0), confident, atol=1e-8, rtol=0)


def test_dcp_threshold_defaults_to_beta():
    p = probability_batches(10, torch.float64)
    torch.testing.assert_close(dcp(p, 0.7, 0.3), dcp(p, 0.7, 0.3, threshold=0.7), atol=0, rtol=0)
    assert not torch.allclose(dcp(p, 0.7, 0.3), dcp(p, 0.7, 0.3, threshold=0.3))


@pytest.mark.parametrize("decimals", [0, 1, 2, 4])
def test_rounding_stays_on_the_grid_and_keeps_argmax_up_to_ties(decimals):
    p = probability_batches(10, torch.float64)
    y = rounding(p, decimals)
    units = y * 10**decimals
    torch.testing.assert_close(units, units.round(), atol=1e-4, rtol=0)
    top = y.gather(1, p.argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.equal(top, y.max(dim=1).values)


def test_rounding_examples():
    p = torch.tensor([[0.46, 0.34, 0.20], [0.34, 0.33, 0.33]])
    torch.testing.assert_close(rounding(p, 1), torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]]))
    torch.testing.assert_close(rounding(p, 0), label_only(p))


def test_top_k_keeps_the_k_largest_in_proportion():
    p = distinct_rows(10)
    p = p[p.min(dim=1).values > 0]
    y = top_k(p, 3)
    assert ((y > 0).sum(dim=1) == 3).all()
    kept = p.topk(3, dim=1)
    torch.testing.assert_close(y.gather(1, kept.indices), kept.values / kept.values.sum(1, keepdim=True))
    torch.testing.assert_close(top_k(p, 10), p)


def test_label_only_is_one_hot_argmax():
    p = probability_batches(10)
    y = label_only(p)
    assert torch.equal(y.argmax(1), p.argmax(1)) and torch.equal(y.sum(1), torch.ones(len(p)))
    assert set(y.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("rs", {"beta": 0.0, "gamma": 1.0}),
        ("rs", {"beta": -0.5, "gamma": 1.0}),
        ("rs", {"beta": math.nan, "gamma": 1.0}),
        ("rs", {"beta": math.inf, "gamma": 1.0}),
        ("rs", {"beta": "0.5", "gamma": 1.0}),
        ("rs", {"beta": True, "gamma": 1.0}),
        ("rs", {"beta": 0.5, "gamma": 0.0}),
        ("rs", {"beta": 0.5}),
        ("rs", {"beta": 0.5, "gamma": 1.0, "nu": 3.0}),
        ("dcp", {"beta": 0.5, "gamma": 1.0, "nu": -1.0}),
        ("dcp", {"beta": 0.5, "gamma": 1.0, "threshold": 1.5}),
        ("round", {"decimals": -1}),
        ("round", {"decimals": 1.5}),
        ("round", {"decimals": 40}),
        ("round", {}),
        ("topk", {"k": 0}),
        ("topk", {"k": 2.0}),
        ("label", {"k": 1}),
        ("gaussian", {}),
    ],
    ids=str,
)
def test_bad_parameters_raise_config_error(name, params):
    with pytest.raises(ConfigError):
        make_defense(name, **params)


def test_make_defense_rejects_registry_entries_that_are_not_output_defenses():
    DEFENSES.register("test-detector-entry")(object())
    try:
        with pytest.raises(
            ConfigError, match="not an output defense; choose one of: dcp, label, none, round, rs, topk"
        ):
            make_defense("test-detector-entry")
    finally:
        DEFENSES._items.pop("test-detector-entry")


def test_bad_parameters_raise_in_the_pure_functions_too():
    p = probability_batches(10)
    with pytest.raises(ConfigError, match="k must be in 1..10"):
        make_defense("topk", k=11)(p)
    with pytest.raises(ConfigError, match="beta"):
        reverse_sigmoid(p, beta=-1.0, gamma=1.0)
    with pytest.raises(ConfigError, match=r"\[B, K\]"):
        label_only(torch.ones(5))


def test_make_defense_returns_a_validated_callable():
    d = make_defense("rs", beta=1, gamma=2)
    assert isinstance(d, Defense) and d.params == {"beta": 1.0, "gamma": 2.0}
    p = probability_batches(10)
    torch.testing.assert_close(d(p), reverse_sigmoid(p, 1.0, 2.0))
    assert repr(d) == "rs(beta=1.0, gamma=2.0)"


def test_mean_l1_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert mean_l1(a, b) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def val_probs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(2000, 10, generator=g) * 3, dim=1)


@pytest.mark.parametrize(
    ("name", "fixed", "param"),
    [
        ("rs", {"gamma": 0.2}, "beta"),
        ("dcp", {"gamma": 0.5}, "beta"),
        ("round", {}, "decimals"),
        ("topk", {}, "k"),
    ],
)
def test_calibrate_respects_budget_and_picks_stronger_for_larger_budget(val_probs, name, fixed, param):
    found = {}
    for budget in (0.2, 0.6, 1.0):
        params, l1 = calibrate_defense(name, val_probs, l1_budget=budget, fixed=fixed)
        assert l1 <= budget
        assert l1 == pytest.approx(mean_l1(val_probs, make_defense(name, **params)(val_probs)))
        assert {k: v for k, v in params.items() if k in fixed} == fixed
        found[budget] = params[param]
    stronger = (lambda a, b: a > b) if param == "beta" else (lambda a, b: a < b)
    assert stronger(found[1.0], found[0.2]), found
    if name in ("rs", "dcp"):  # continuous: bisection leaves the l1 just under the budget
        assert found[0.2] < found[0.6] < found[1.0]
        assert calibrate_defense(name, val_probs, l1_budget=0.6, fixed=fixed)[1] > 0.6 - 0.01


def test_calibrate_rejects_unreachable_budget_and_bad_requests(val_probs):
    with pytest.raises(ConfigError, match="no beta in the grid"):
        calibrate_defense("rs", val_probs, l1_budget=1e-6, fixed={"gamma": 0.2})
    with pytest.raises(ConfigError):
        calibrate_defense("label", val_probs)
    with pytest.raises(ConfigError):
        calibrate_defense("rs", val_probs, param="gamma", fixed={"beta": 0.5})
    with pytest.raises(ConfigError):
        calibrate_defense("rs", val_probs, l1_budget=0.0, fixed={"gamma": 0.2})
