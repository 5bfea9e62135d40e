"""The evasion family behind one protocol (issue 11): every registered attack is called the same way,
named with its settings from a config, and an unknown setting is a ConfigError naming the valid ones."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.evasion import PROTOCOL, evasion_attack_names, evasion_settings, make_evasion_attack
from qrobust.attacks.whitebox import bpda, input_gradient, pgd
from qrobust.errors import ConfigError
from qrobust.quant import QuantConfig, quantize
from qrobust.quant.stochastic import insert_stochastic_quantizers
from qrobust.registry import EVASION

# the cheapest settings of each attack (and the model it needs)
CHEAP = {"fgsm": {}, "pgd": {"steps": 2}, "apgd-ce": {"steps": 2}, "bpda": {"steps": 2},
         "square": {"queries": 6, "p_init": 0.5}, "mi-adaptive-pgd": {"n_draws": 2, "steps": 2}}


def _net(sq: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 5))
    return insert_stochastic_quantizers(net, at_input=True, num_bins=4).eval() if sq else net.eval()


def _data(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_every_evasion_attack_follows_the_protocol():
    assert set(CHEAP) == set(evasion_attack_names())
    x, y = _data()
    for name in evasion_attack_names():
        assert all(p not in evasion_settings(name) for p in PROTOCOL)
        attack = make_evasion_attack(name, **CHEAP[name])
        torch.manual_seed(0)
        x_adv = attack(_net(sq=name == "mi-adaptive-pgd"), x, y, eps="linf:0.1", norm="linf",
                       generator=torch.Generator().manual_seed(2))
        assert x_adv.shape == x.shape and not x_adv.requires_grad, name
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1, name
        assert (x_adv != x).any(), name  # it moved


def test_unknown_attacks_and_settings_name_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown evasion attack 'cw'; choose one of: apgd-ce, bpda"):
        make_evasion_attack("cw")
    with pytest.raises(ConfigError, match="'pgd' has no setting stepz; its settings: norm, steps, step_size"):
        make_evasion_attack("pgd", stepz=3)
    x, y = _data()
    for name in ("square", "mi-adaptive-pgd"):  # L-inf only: the protocol's norm is checked, not ignored
        with pytest.raises(ConfigError, match="L-inf attack only"):
            make_evasion_attack(name, **CHEAP[name])(_net(True), x, y, eps=0.1, norm="l2")


def test_eot_is_a_setting_of_pgd_not_a_copy():
    x, y = _data()
    sq = _net(sq=True)
    runs = []
    for eot in (1, 4):
        torch.manual_seed(3)
        runs.append(make_evasion_attack("pgd", steps=2, eot=eot, check=False)(
            sq, x, y, eps=0.1, generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(*runs)  # the EOT gradient is another gradient


def test_bpda_is_pgd_on_the_float_twin():
    x, y = _data()
    net = _net()
    # a model without quantizers is its own twin: the same kernels on the same shapes, so exact
    assert torch.equal(bpda(net, x, y, 0.1, steps=3, generator=torch.Generator().manual_seed(5)),
                       pgd(net, x, y, 0.1, steps=3, generator=torch.Generator().manual_seed(5)))
    q = quantize(nn.Sequential(nn.Flatten(), nn.Linear(32, 5)), QuantConfig(weight_bits=2, act_bits=2)).eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    bpda(q, x, y, 0.1, steps=2)
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())  # the model is left alone


def test_input_gradient_with_a_custom_loss_is_that_loss_gradient():
    x, y = _data()
    net = _net()
    weights = torch.linspace(0.5, 2.0, len(y))

    def loss(logits, labels):  # a per-input loss that is not the cross-entropy
        return F.cross_entropy(logits, labels, reduction="none") * weights[: len(labels)] + logits[:, 0]

    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(net(xr), y).sum(), xr)
    assert torch.allclose(input_gradient(net, x, y, loss=loss), expected)
    assert not torch.allclose(input_gradient(net, x, y), expected)
    assert EVASION.get("bpda") is bpda


def test_apgd_fooled_decision_with_several_draws():
    from qrobust.attacks.whitebox import apgd_ce

    x, y = _data()
    net = _net()

    def run(model, **kw):
        return apgd_ce(model, x, y, 0.1, steps=4, generator=torch.Generator().manual_seed(2), check=False, **kw)

    # a deterministic model misclassifies on every draw alike: the decision, and the result, are the same
    assert torch.equal(run(net), run(net, fooled_draws=3))

    class Rows(nn.Module):  # counts the rows each forward pass sees
        def __init__(self, inner):
            super().__init__()
            self.inner, self.rows = inner, []

        def forward(self, z):
            self.rows.append(len(z))
            return self.inner(z)

    sq = Rows(_net(sq=True))
    run(sq)
    one = len(sq.rows)
    sq.rows.clear()
    run(sq, fooled_draws=3)
    # further evaluations, each on the points that still look fooled only (here never the whole batch)
    assert len(sq.rows) > one and any(r < len(y) for r in sq.rows)
    with pytest.raises(ConfigError, match="fooled_draws"):
        run(net, fooled_draws=0)
