"""Square Attack: budget and box constraints, query accounting, and the reason it exists: it finds
adversarial inputs where gradients are zero (a quantizer without straight-through gradient)."""

import pytest
import torch
from torch import nn

from qrobust.attacks.blackbox import margin, square_attack
from qrobust.attacks.whitebox import pgd
from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS, load_builtin_components


class RoundedLinear(nn.Module):
    """A linear classifier on inputs rounded to 4 levels: its input gradient is exactly zero."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        q = torch.round(x * 3) / 3
        return q.flatten(1) @ self.weight.T


def _problem(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 64, generator=g)
    model = RoundedLinear(weight)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    model.rows = 0
    return model, x, y


def test_margin_is_negative_exactly_when_misclassified():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert margin(logits, torch.tensor([0, 0])).tolist() == [1.0, -3.0]


def test_square_stays_in_the_box_and_the_budget_and_counts_queries():
    model, x, y = _problem()
    g = torch.Generator().manual_seed(1)
    x_adv = square_attack(model, x, y, 0.1, queries=50, generator=g)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert model.rows <= 50 * len(x)  # one query = one image forward, at most `queries` per image


def test_square_finds_what_zero_gradient_pgd_cannot():
    model, x, y = _problem(n=128)
    eps = 0.2
    g = torch.Generator().manual_seed(0)
    with pytest.warns(Warning):  # the gradient check sees the zero gradients
        x_pgd = pgd(model, x, y, eps, steps=20, generator=g)
    x_sq = square_attack(model, x, y, eps, queries=300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acc_pgd = (model(x_pgd).argmax(1) == y).float().mean().item()
        acc_sq = (model(x_sq).argmax(1) == y).float().mean().item()
    assert acc_sq < acc_pgd - 0.3, (acc_sq, acc_pgd)


def test_square_bad_input_is_a_clear_error():
    model, x, y = _problem(n=4)
    with pytest.raises(ConfigError, match="L-inf"):
        square_attack(model, x, y, 0.1, norm="l2")
    with pytest.raises(ConfigError, match="queries"):
        square_attack(model, x, y, 0.1, queries=0)
    with pytest.raises(ConfigError, match="p_init"):
        square_attack(model, x, y, 0.1, p_init=0.0)


def test_square_is_registered():
    load_builtin_components()
    assert ATTACKS.get("square") is square_attack


class NoisyLinear(nn.Module):
    """A linear classifier whose logits carry large Gaussian noise from the global RNG (a randomised
    model): a single query's margin says little about the input."""

    def __init__(self, weight: torch.Tensor, noise: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.noise = noise
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        logits = x.flatten(1) @ self.weight.T
        return logits + self.noise * torch.randn_like(logits)


def test_common_noise_makes_square_work_on_a_randomised_model():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 64, generator=g)
    x = torch.rand(128, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ weight.T).argmax(1)
    model = NoisyLinear(weight, noise=1.0)
    eps = 0.1

    def clean_model_acc(x_adv):  # judged on the noise-free logits
        return ((x_adv.flatten(1) @ weight.T).argmax(1) == y).float().mean().item()

    torch.manual_seed(0)
    plain = square_attack(model, x, y, eps, queries=400, generator=torch.Generator().manual_seed(1))
    model.rows = 0
    paired = square_attack(model, x, y, eps, queries=400, common_noise=True,
                           generator=torch.Generator().manual_seed(1))
    assert model.rows <= 400 * len(x)  # two queries per step, the budget still holds
    assert (paired - x).abs().max() <= eps + 1e-6 and paired.min() >= 0 and paired.max() <= 1
    acc_plain, acc_paired = clean_model_acc(plain), clean_model_acc(paired)
    assert acc_plain > 0.8 and acc_paired < acc_plain - 0.5, (acc_paired, acc_plain)  # measured 0.94 vs 0.16


def test_common_noise_leaves_the_callers_rng_alone():
    model, x, y = _problem(n=8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    square_attack(model, x, y, 0.1, queries=20, common_noise=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)
