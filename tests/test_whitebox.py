"""Tests for qrobust.attacks.whitebox: budgets, attack strength, EOT, set-up checks, robust accuracy.

A tiny CNN is trained in a session fixture on synthetic 8x8 images of three stripe/checker patterns, so
the attacks have a real model to break. Run with OMP_NUM_THREADS=1; the whole file takes seconds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.whitebox import (
    GradientMaskingWarning,
    apgd_ce,
    apgd_checkpoints,
    check_attack_setup,
    fgsm,
    input_gradient,
    parse_eps,
    pgd,
    robust_accuracy,
)
from qrobust.errors import ConfigError
from qrobust.metrics import accuracy
from qrobust.registry import ATTACKS

ATTACK_NAMES = ["fgsm", "pgd", "apgd-ce"]
FAST = {"fgsm": {}, "pgd": {"steps": 5}, "apgd-ce": {"steps": 10}}  # keeps the sweeps cheap


# --------------------------------------------------------------------------------------------------
# Fixtures: synthetic pattern data and a small trained CNN
# --------------------------------------------------------------------------------------------------


def make_patterns(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 8, 8) images in [0, 1]: horizontal stripes, vertical stripes or a checkerboard, + noise."""
    y = torch.randint(0, 3, (n,), generator=generator)
    rows = (torch.arange(8) // 2 % 2).float().view(8, 1).expand(8, 8)
    patterns = torch.stack([rows, rows.t(), (rows + rows.t()) % 2]) * 0.5 + 0.25
    x = patterns[y] + 0.3 * torch.randn(n, 8, 8, generator=generator)
    return x.clamp(0, 1).unsqueeze(1), y


@pytest.fixture(scope="session")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_patterns(192, torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def model() -> nn.Module:
    torch.manual_seed(0)
    x, y = make_patterns(384, torch.Generator().manual_seed(0))
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 3),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def clean_acc(model, data) -> float:
    """Clean accuracy of the fixture model. ``accuracy`` and ``robust_accuracy`` run the model on other
    batch shapes and memory formats (other CPU kernels: last-bit differences), so comparing their
    numbers is only sound if no prediction hangs on a near tie: the model's top-1 margin is checked."""
    x, y = data
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # >> the ~1e-6 kernels may differ by
    return accuracy(model, x, y)


class NoisyInput(nn.Module):
    """A randomised model: independent Gaussian noise on every input element at every forward pass."""

    def __init__(self, base: nn.Module, sigma: float):
        super().__init__()
        self.base, self.sigma = base, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.sigma * torch.randn_like(x))


class RandomPhase(nn.Module):
    """A randomised model whose input gradients are dominated by zero-mean noise at every draw.

    Adds ``amplitude * mean_i sin(frequency * x_i + phi_ic)`` to logit c with fresh uniform phases
    ``phi`` per sample, element and class: small in value (predictions barely change), large and random
    in gradient, with expectation zero, so only the mean over draws (EOT) points along the base gradient.
    """

    def __init__(self, base: nn.Module, amplitude: float, frequency: float):
        super().__init__()
        self.base, self.amplitude, self.frequency = base, amplitude, frequency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        flat = x.flatten(1).unsqueeze(2)
        phase = 2 * torch.pi * torch.rand(*flat.shape[:2], logits.shape[1])
        return logits + self.amplitude * torch.sin(self.frequency * flat + phase).mean(1)


class RoundInput(nn.Module):
    """Hard 2-bit rounding of the input: zero gradients everywhere (gradient masking)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * 3) / 3)


class CoinFlip(nn.Module):
    """Two-class model whose prediction is a fair coin flip on every forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]


def run(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, **kwargs) -> torch.Tensor:
    kwargs = {**FAST[name], **kwargs}
    if name != "fgsm":
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return ATTACKS.get(name)(model, x, y, eps, **kwargs)


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


# --------------------------------------------------------------------------------------------------
# Budgets and bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (0.5, (None, 0.5)),
        (1, (None, 1.0)),
        ("0", (None, 0.0)),
        ("8/255", (None, 8 / 255)),
        ("linf:8/255", ("linf", 8 / 255)),
        ("L2: 0.5", ("l2", 0.5)),
    ],
)
def test_parse_eps_reads_numbers_fractions_and_budget_names(spec, expected):
    assert parse_eps(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        (-0.1, ">= 0"),
        ("-8/255", ">= 0"),
        (float("nan"), "finite"),
        ("8/0", "cannot read"),
        ("eight", "cannot read"),
        (True, "cannot read"),
        (None, "cannot read"),
        ("l1:0.5", "unknown norm"),
    ],
)
def test_parse_eps_rejects_bad_budgets(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_eps(spec)


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize(
    "eps, kwargs, message",
    [
        (-0.1, {}, "eps must be a finite number >= 0"),
        (0.1, {"norm": "l1"}, "unknown norm 'l1'; choose one of: linf, l2"),
        ("linf:8/255", {"norm": "l2"}, "linf budget but the attack uses norm='l2'; pass norm='linf'"),
        ("l2:0.5", {}, "l2 budget but the attack uses norm='linf'"),
        (0.1, {"eot": 0}, "eot must be an integer >= 1"),
    ],
)
def test_attacks_reject_bad_arguments(model, data, name, eps, kwargs, message):
    x, y = data
    with pytest.raises(ConfigError, match=message):
        run(name, model, x[:4], y[:4], eps, **kwargs)


@pytest.mark.parametrize(
    "attack, kwargs, message",
    [
        (pgd, {"steps": 0}, "steps must be an integer >= 1"),
        (apgd_ce, {"steps": 0}, "steps must be an integer >= 1"),
        (pgd, {"step_size": 0.0}, "step_size must be a number > 0"),
        (apgd_ce, {"restarts": 0}, "restarts must be an integer >= 1"),
        (apgd_ce, {"rho": 1.5}, r"rho must be in \(0, 1\)"),
    ],
)
def test_iterative_attacks_reject_bad_schedules(model, data, attack, kwargs, message):
    x, y = data
    with pytest.raises(ConfigError, match=message):
        attack(model, x[:4], y[:4], 0.1, **kwargs)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attacks_reject_bad_tensors(model, data, name):
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ConfigError, match=r"x must lie in \[0, 1\]; put normalisation"):
        run(name, model, x * 2 - 0.5, y, 0.1)
    with pytest.raises(ConfigError, match=r"y must be an integer tensor of shape \(4,\)"):
        run(name, model, x, y[:3], 0.1)
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 2\]"):
        run(name, model, x, y + 3, 0.1, check=False)


def test_robust_accuracy_rejects_bad_arguments(model, data):
    x, y = data
    with pytest.raises(ConfigError, match="needs the attack budget"):
        robust_accuracy(model, x, y, "pgd")
    with pytest.raises(ConfigError, match="unknown evasion attack 'pgd2'; choose one of: apgd-ce, .*fgsm, .*pgd"):
        robust_accuracy(model, x, y, "pgd2", eps=0.1)
    with pytest.raises(ConfigError, match="draws must be an integer >= 1"):
        robust_accuracy(model, x, y, "pgd", eps=0.1, draws=0)
    with pytest.raises(ConfigError, match="untargeted"):
        robust_accuracy(model, x, y, "pgd", eps=0.1, targeted=True)


def test_attacks_are_registered():
    assert ATTACKS.get("fgsm") is fgsm
    assert ATTACKS.get("pgd") is pgd
    assert ATTACKS.get("apgd-ce") is apgd_ce


# --------------------------------------------------------------------------------------------------
# Budget, box and output properties
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("linf", 0.3), ("l2", 0.25), ("l2", 2.0)])
def test_perturbation_stays_in_budget_and_box(model, data, name, norm, eps):
    x, y = data[0][:48], data[1][:48]
    x_before = x.clone()
    x_adv = run(name, model, x, y, eps, norm=norm, check=False)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert torch.equal(x, x_before)  # the input is not modified in place
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    size = lp_norm(x_adv - x, norm)
    assert size.max() <= eps + 1e-6
    assert size.max() >= 0.5 * eps  # the attack did use its budget


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("eps", [0.0, "linf:0", "0/255"])
def test_eps_zero_returns_the_input(model, data, clean_acc, name, eps):
    x, y = data
    assert torch.equal(run(name, model, x, y, eps, check=False), x)
    # the same predictions (no near ties, see clean_acc); abs: accuracy is a float32 mean of the hits
    robust = robust_accuracy(model, x, y, name, eps=eps, check=False, **FAST[name])
    assert robust == pytest.approx(clean_acc, abs=1e-6)


def test_budget_names_work_in_attacks(model, data):
    x, y = data[0][:16], data[1][:16]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    named = pgd(model, x, y, "l2:1/2", norm="l2", generator=gen(), check=False)
    plain = pgd(model, x, y, 0.5, norm="l2", generator=gen(), check=False)
    assert torch.equal(named, plain)


# --------------------------------------------------------------------------------------------------
# Attack strength
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 1.0)])
def test_stronger_attacks_find_at_least_as_much(model, data, clean_acc, norm, eps):
    x, y = data
    kw = {"eps": eps, "norm": norm, "check": False}
    acc_fgsm = robust_accuracy(model, x, y, "fgsm", **kw)
    acc_pgd = robust_accuracy(model, x, y, "pgd", steps=10, generator=torch.Generator().manual_seed(0), **kw)
    acc_apgd = robust_accuracy(
        model, x, y, "apgd-ce", steps=30, generator=torch.Generator().manual_seed(0), **kw
    )
    assert clean_acc > 0.9
    assert acc_fgsm <= clean_acc + 1e-6  # + float32 rounding of accuracy's mean
    assert acc_pgd <= clean_acc - 0.2  # PGD really breaks the model at this budget
    assert acc_pgd <= acc_fgsm + 0.02
    assert acc_apgd <= acc_pgd + 0.02


def test_pgd_is_reproducible_with_a_generator(model, data):
    x, y = data[0][:16], data[1][:16]
    a, b, c = (
        pgd(model, x, y, 0.1, generator=torch.Generator().manual_seed(s), check=False) for s in (0, 0, 1)
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_attack_works_under_no_grad(model, data):
    x, y = data[0][:16], data[1][:16]
    expected = pgd(model, x, y, 0.1, generator=torch.Generator().manual_seed(0), check=False)
    with torch.no_grad():
        got = pgd(model, x, y, 0.1, generator=torch.Generator().manual_seed(0), check=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.5)])
def test_targeted_mode_raises_the_target_score(model, data, name, norm, eps):
    x, y = data[0][:64], data[1][:64]
    target = (y + 1) % 3
    x_adv = run(name, model, x, target, eps, norm=norm, targeted=True, check=False)
    with torch.no_grad():
        before, after = model(x).log_softmax(1), model(x_adv).log_softmax(1)
    rows = torch.arange(len(y))
    assert (after[rows, target] > before[rows, target]).float().mean() > 0.9
    hit_before = (before.argmax(1) == target).float().mean()
    hit_after = (after.argmax(1) == target).float().mean()
    assert hit_after >= hit_before + 0.3


def reference_apgd_linf(model, x, y, x0, eps, steps, rho=0.75):
    """Algorithm 1 of Croce & Hein (2020), one sample at a time with plain Python bookkeeping."""
    checkpoints = apgd_checkpoints(steps)

    def evaluate(z, label):
        z = z.clone().requires_grad_(True)
        logits = model(z.unsqueeze(0))
        loss = F.cross_entropy(logits, label.view(1))
        return loss.item(), torch.autograd.grad(loss, z)[0], logits.argmax().item() != label.item()

    results = []
    for xi, yi, cur in zip(x, y, x0, strict=True):
        project = lambda z, xi=xi: torch.min(torch.max(z, xi - eps), xi + eps).clamp(0, 1)  # noqa: E731
        eta, prev, last, reduced_last = 2 * eps, cur, 0, True
        loss, grad, fooled = evaluate(cur, yi)
        best, best_loss, best_grad, adv, losses = cur, loss, grad, cur if fooled else None, [loss]
        best_loss_last = best_loss
        for k in range(steps):
            a = 0.75 if k > 0 else 1.0
            z = project(cur + eta * grad.sign())
            cur, prev = project(cur + a * (z - cur) + (1 - a) * (cur - prev)), cur
            loss, grad, fooled = evaluate(cur, yi)
            adv = cur if fooled else adv
            if loss > best_loss:
                best, best_loss, best_grad = cur, loss, grad
            losses.append(loss)
            if k + 1 in checkpoints:
                increases = sum(losses[j] > losses[j - 1] for j in range(last + 1, k + 2))
                reduce = increases <= rho * (k + 1 - last) or (
                    not reduced_last and best_loss_last >= best_loss
                )
                if reduce:
                    eta, cur, grad = eta / 2, best, best_grad
                reduced_last, best_loss_last, last = reduce, best_loss, k + 1
        results.append(adv if adv is not None else best)
    return torch.stack(results)


@pytest.mark.parametrize("eps, steps", [(0.05, 30), (0.1, 30)])
def test_apgd_matches_a_per_sample_reference_of_the_paper(eps, steps, per_sample):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    net = per_sample(net.double())  # the attack's batch and the reference's single images: same numbers
    for p in net.parameters():
        p.data *= 6  # a rugged loss surface, so step-size halving and restarts from the best point matter
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    y = net(x).argmax(1)
    x0 = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    got = apgd_ce(net, x, y, eps, steps=steps, x_init=x0, check=False)
    expected = reference_apgd_linf(net, x, y, x0, eps, steps=steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - x0).abs().max() > 0.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_uniform_in_the_ball(model, norm):
    # One step of negligible size leaves PGD at its random start; grey images keep the box out of the way.
    x, y, eps = torch.full((200, 1, 8, 8), 0.5), torch.zeros(200, dtype=torch.long), 0.2
    start = pgd(
        model, x, y, eps, norm=norm, steps=1, step_size=1e-12, generator=torch.Generator().manual_seed(0)
    )
    delta = (start - x).flatten(1)
    if norm == "linf":  # each coordinate ~ U(-eps, eps): mean |delta_i| = eps / 2
        assert delta.abs().max() <= eps + 1e-6
        assert abs(delta.abs().mean() / eps - 0.5) < 0.02
    else:  # radius eps * u^(1/64): 99.9% of the points within 10% of the sphere, none outside
        radius = delta.norm(dim=1) / eps
        assert radius.max() <= 1 + 1e-6 and (radius > 0.9).float().mean() > 0.95
        assert radius.std() > 0.005  # not all on the sphere (std of u^(1/64) is ~0.015)


def test_apgd_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, Sec. 3.2)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == list(range(2, 11))
    assert apgd_checkpoints(1) == [1]


# --------------------------------------------------------------------------------------------------
# The model is left as it was
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_attacks_leave_model_mode_flags_and_weights_alone(model, data, training):
    net = copy.deepcopy(model).train(training).requires_grad_(True)
    net[0].weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    state = copy.deepcopy(net.state_dict())
    x, y = data[0][:16], data[1][:16]
    for name in ATTACK_NAMES:
        run(name, net, x, y, 0.1, eot=2)
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# --------------------------------------------------------------------------------------------------
# EOT
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False])
def test_eot_gradient_equals_plain_gradient_on_a_deterministic_model(model, data, batched):
    x, y = data[0][:16], data[1][:16]
    plain = input_gradient(model, x, y)
    averaged = input_gradient(model, x, y, eot=4, eot_batched=batched)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(averaged, plain, rtol=1e-5, atol=1e-7)


def draw_gradients(model: nn.Module, x, y, noises) -> list[torch.Tensor]:
    grads = []
    for noise in noises:
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi + 0.2 * noise), y, reduction="sum")
        grads.append(torch.autograd.grad(loss, xi)[0])
    return grads


@pytest.mark.parametrize("batched", [True, False])
def test_eot_gradient_is_the_mean_over_draws(model, data, batched):
    x, y = data[0][:16], data[1][:16]
    torch.manual_seed(7)
    got = input_gradient(NoisyInput(model, 0.2), x, y, eot=3, eot_batched=batched)
    torch.manual_seed(
        7
    )  # replay the same noise: one (3N, ...) draw when batched, three (N, ...) draws when not
    noises = (
        torch.randn(3 * 16, *x.shape[1:]).chunk(3) if batched else [torch.randn_like(x) for _ in range(3)]
    )
    grads = draw_gradients(model, x, y, noises)
    expected = torch.stack(grads).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grads[0], expected, atol=1e-4)  # draws differ, so the mean is not one draw


def test_eot_makes_pgd_stronger_on_a_randomised_model(model, data):
    # Single-draw gradients of RandomPhase are dominated by zero-mean noise; their mean is the base
    # model's gradient, which EOT recovers (measured: robust accuracy ~0.70 with eot=1, ~0.54 with eot=8).
    x, y = data
    noisy = RandomPhase(model, amplitude=1.0, frequency=60.0)
    results = {1: [], 8: []}
    for seed in range(2):
        for eot in results:
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            results[eot].append(
                robust_accuracy(noisy, x, y, "pgd", eps=0.15, eot=eot, generator=gen, check=False)
            )
    assert sum(results[8]) / 2 < sum(results[1]) / 2 - 0.08


# --------------------------------------------------------------------------------------------------
# Set-up checks
# --------------------------------------------------------------------------------------------------


def test_checks_are_quiet_on_a_good_setup(model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_attack_setup(model, *data) == []
        assert check_attack_setup(NoisyInput(model, 0.3), *data, eot=8) == []


@pytest.mark.parametrize(
    "wrap, message",
    [
        (lambda m: NoisyInput(m, 0.3), "randomised .* but eot=1"),
        (RoundInput, "192 of 192 inputs have all-zero or non-finite input gradients"),
        (lambda m: nn.Sequential(m, nn.Softmax(dim=1)), "look like probabilities"),
        (lambda m: nn.Sequential(nn.BatchNorm2d(1), m).train(), "training mode with BatchNorm"),
    ],
)
def test_checks_warn_on_unreliable_setups(model, data, wrap, message):
    with pytest.warns(GradientMaskingWarning, match=message):
        messages = check_attack_setup(wrap(model), *data, eot=1)
    assert len(messages) == 1


def test_attacks_run_the_checks_once_unless_told_not_to(model, data):
    x, y = data
    noisy = NoisyInput(model, 0.3)
    with pytest.warns(GradientMaskingWarning, match="randomised"):
        pgd(noisy, x, y, 0.1, steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pgd(noisy, x, y, 0.1, steps=2, check=False)
        robust_accuracy(noisy, x, y, "pgd", eps=0.1, steps=2, batch_size=32)
    assert len([w for w in caught if issubclass(w.category, GradientMaskingWarning)]) == 1


# --------------------------------------------------------------------------------------------------
# Robust accuracy
# --------------------------------------------------------------------------------------------------


def test_robust_accuracy_requires_every_draw_to_be_correct():
    x, y = torch.rand(400, 1, 2, 2), torch.zeros(400, dtype=torch.long)
    torch.manual_seed(0)
    one = accuracy(CoinFlip(), x, y)
    six = accuracy(CoinFlip(), x, y, draws=6)
    robust = robust_accuracy(CoinFlip(), x, y, "fgsm", eps=0.0, draws=3, check=False)
    assert 0.4 < one < 0.6
    assert six < 0.06  # ~ 0.5 ** 6
    assert robust < 0.06  # 3 clean and 3 attacked draws must all be right: ~ 0.5 ** 6


def test_robust_accuracy_is_independent_of_batching_and_accepts_callables(model, data, per_sample):
    # PerSample runs every image alone, so batches of 7 and of 192 see the same kernels on the same
    # shapes and the numbers must agree bit for bit (the plain model's GEMMs could differ in the last bit)
    x, y = data
    net = per_sample(model)
    by_name = robust_accuracy(net, x, y, "fgsm", eps=0.15, check=False)
    assert robust_accuracy(net, x, y, fgsm, eps=0.15, batch_size=7, check=False) == by_name
    assert accuracy(net, x, y, batch_size=7) == accuracy(net, x, y)
    assert 0 < by_name < accuracy(net, x, y)  # fgsm at 0.15 breaks some images, not all


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attacks_run_on_the_inputs_device(model, data):
    net, x, y = copy.deepcopy(model).cuda(), data[0][:32].cuda(), data[1][:32].cuda()
    for name in ATTACK_NAMES:  # run() passes a CPU generator: the random start must still land on the GPU
        x_adv = run(name, net, x, y, 0.1, eot=2)
        assert x_adv.device == x.device and (x_adv - x).abs().max() <= 0.1 + 1e-6
    # robust_accuracy and accuracy run other kernels (cuDNN may use TF32): allow one image of slack
    assert robust_accuracy(net, x, y, "pgd", eps=0.15) <= accuracy(net, x, y) + 1 / len(y)
