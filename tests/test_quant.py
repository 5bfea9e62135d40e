"""Fake quantization, QAT module swap, bit-width switching and int8 export."""

import pytest
import torch
import torch.nn.functional as F
from helpers import train_tiny_qat

from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import (
    ActQuant,
    QuantConfig,
    QuantConv2d,
    QuantPoint,
    calibrate,
    get_bit_width,
    quantize,
    set_bit_width,
)
from qrobust.quant.deploy import export_int8, twin_agreement
from qrobust.quant.fake import fake_quantize_weight, weight_int_repr


def tiny(arch="convnet", channels=1, size=28):
    torch.manual_seed(0)
    return build_model(arch, channels=channels, num_classes=10, image_size=(size, size))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_fake_quant_matches_hand_reference_exactly(bits):
    w = torch.randn(16, 8, 3, 3)
    q_max = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / q_max
    reference = torch.clamp(torch.round(w * (1.0 / scale)), -q_max, q_max) * scale
    torch.testing.assert_close(fake_quantize_weight(w, bits), reference, atol=0, rtol=0)
    codes, s = weight_int_repr(w, bits)
    torch.testing.assert_close(codes.float() * s.view(-1, 1, 1, 1), reference, atol=0, rtol=0)
    for c in range(16):  # at most 2*q_max+1 distinct values per output channel
        assert fake_quantize_weight(w, bits)[c].unique().numel() <= 2 * q_max + 1


def test_weight_fake_quant_passes_gradient_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fake_quantize_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_act_quant_tracks_ema_range_and_quantizes_on_grid():
    q = ActQuant(bits=4, momentum=0.5)
    q.train()
    x = torch.linspace(-1, 3, 1000)
    y = q(x)
    assert float(q.lo) == -1 and float(q.hi) == 3  # first batch initialises the range
    assert y.unique().numel() <= 16
    q(x * 3)  # EMA: halfway towards the new range
    assert float(q.hi) == pytest.approx(6.0) and float(q.lo) == pytest.approx(-2.0)
    q.eval()
    q(x * 100)
    assert float(q.hi) == pytest.approx(6.0)  # frozen in eval mode


def test_act_quant_gradient_is_zero_outside_the_range():
    q = ActQuant(bits=8)
    q.train()
    q(torch.tensor([0.0, 1.0]))
    q.eval()
    x = torch.tensor([-5.0, 0.5, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_act_quant_refuses_eval_before_any_range():
    with pytest.raises(RuntimeError, match="no range yet"):
        ActQuant().eval()(torch.ones(3))


def test_quantize_swaps_layers_and_really_fake_quantizes():
    model = tiny()
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=4))
    assert sum(isinstance(m, QuantConv2d) for m in qmodel.modules()) == 3
    assert sum(isinstance(m, ActQuant) for m in qmodel.modules()) == 5  # input + 3 convs + logits
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())  # the float model is untouched
    x = torch.rand(32, 1, 28, 28)
    qmodel.train()
    qmodel(x)
    model.eval(), qmodel.eval()
    out_f, out_q = model(x), qmodel(x)
    assert not torch.allclose(out_f, out_q)
    # activations inside are on the quantization grid
    acts = []
    hook = qmodel.body[1].q.register_forward_hook(lambda m, i, o: acts.append(o))
    qmodel(x)
    hook.remove()
    assert acts[0].unique().numel() <= 16


def test_optimizer_updates_the_quantized_model():
    """Guards against a known reference-code bug: the optimizer built on the wrong model."""
    model = tiny()
    qmodel = quantize(model)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    before_q = qmodel.body[0].conv.weight.detach().clone()
    before_f = model.body[0].conv.weight.detach().clone()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(qmodel(x), y)
    loss.backward()
    assert qmodel.body[1].conv.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(qmodel.body[0].conv.weight, before_q)
    assert torch.equal(model.body[0].conv.weight, before_f)


def test_set_bit_width_changes_body_but_keeps_first_and_last_at_8_bits():
    qmodel = quantize(tiny(), QuantConfig(weight_bits=8))
    set_bit_width(qmodel, 2)
    assert get_bit_width(qmodel) == 2
    assert qmodel.body[0].conv.bits == 8 and qmodel.body[4].fc.bits == 8
    assert qmodel.body[1].conv.bits == 2
    roles = {m.role: [] for m in qmodel.modules() if isinstance(m, ActQuant)}
    for m in qmodel.modules():
        if isinstance(m, ActQuant):
            roles[m.role].append(m.bits)
    assert roles == {"input": [8], "body": [2, 2, 2], "logits": [8]}  # the edges stay at 8 bits
    assert qmodel.input_q.role == "input" and qmodel.body[4].q.role == "logits"
    w = qmodel.body[1].conv.quantized_weight()
    assert all(w[c].unique().numel() <= 3 for c in range(w.shape[0]))  # ternary
    set_bit_width(qmodel, 8, act_bits=4)
    assert qmodel.body[1].conv.bits == 8 and qmodel.body[1].q.bits == 4 and qmodel.input_q.bits == 8


def test_edge_bits_zero_reproduces_the_old_body_width_edges():
    qmodel = quantize(tiny(), QuantConfig(weight_bits=4, edge_bits=0))
    assert qmodel.input_q.bits == 4 and qmodel.body[4].q.bits == 4
    set_bit_width(qmodel, 2)
    assert qmodel.input_q.bits == 2 and qmodel.body[4].q.bits == 2
    assert qmodel.body[4].q.reduce_range  # the old logit quantizer had the server backend's 7-bit range


def test_logit_quantizer_uses_the_full_8_bit_range_and_float_logits_leave_it_out():
    qmodel = quantize(tiny(), QuantConfig(weight_bits=2, backend="server"))
    assert qmodel.input_q.levels == 127  # feeds the first conv: the server kernels' 7-bit range
    assert qmodel.body[4].q.levels == 255  # feeds no kernel
    floaty = quantize(tiny(), QuantConfig(weight_bits=2, float_logits=True))
    assert isinstance(floaty.body[4].q, QuantPoint) and not isinstance(floaty.body[4].q, ActQuant)
    calibrate(floaty, torch.rand(64, 1, 28, 28))
    logits = floaty.eval()(torch.rand(256, 1, 28, 28))
    assert logits.unique().numel() > 1000  # float logits: (almost) every value distinct


def test_quant_config_act_bits_follow_weight_bits_as_the_cli_does():
    assert QuantConfig(weight_bits=4).act_bits == 4
    assert QuantConfig(weight_bits=4, act_bits=8).act_bits == 8
    with pytest.raises(ConfigError, match="edge_bits"):
        QuantConfig(edge_bits=1)


def test_calibrate_sets_ranges_only_and_restores_the_mode():
    model = tiny()
    model.train()
    qmodel = quantize(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        qmodel.eval()(torch.rand(2, 1, 28, 28))
    qmodel.train()
    bn = [m for m in qmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bn]
    weights = [p.detach().clone() for p in qmodel.parameters()]
    x = torch.rand(100, 1, 28, 28)
    calibrate(qmodel, x, batch_size=32)
    assert qmodel.training  # mode restored
    for b, (m, v, n) in zip(bn, before, strict=True):
        assert torch.equal(b.running_mean, m) and torch.equal(b.running_var, v) and int(b.num_batches_tracked) == n
    assert all(torch.equal(p, w) for p, w in zip(qmodel.parameters(), weights, strict=True))
    # the input quantizer's range is the min/max of the normalised images over all batches
    normed = qmodel.normalize(x)
    assert float(qmodel.input_q.lo) == pytest.approx(float(normed.min()), abs=1e-6)
    assert float(qmodel.input_q.hi) == pytest.approx(float(normed.max()), abs=1e-6)
    assert torch.isfinite(qmodel.eval()(x[:4])).all()
    with pytest.raises(ConfigError, match="quantize"):
        calibrate(tiny(), x)


@pytest.mark.parametrize("bad", [1, 9, 32, 0, 2.5, "8"])
def test_bad_bit_widths_are_refused(bad):
    with pytest.raises(ConfigError, match="2 to 8"):
        QuantConfig(weight_bits=bad)
    qmodel = quantize(tiny())
    with pytest.raises(ConfigError, match="2 to 8"):
        set_bit_width(qmodel, bad)


def test_set_bit_width_on_a_float_model_says_what_to_do():
    with pytest.raises(ConfigError, match="quantize"):
        set_bit_width(tiny(), 4)


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="server"):
        QuantConfig(backend="gpu")


def _trained_qat(arch, backend, synthetic, steps=30):
    return train_tiny_qat(synthetic, arch, steps, backend=backend)


@pytest.mark.parametrize("arch,backend", [("convnet", "server"), ("convnet", "mobile"), ("resnet8", "server"),
                                          ("lenet5", "mobile")])
def test_int8_export_agrees_with_its_twin(arch, backend, synthetic):
    qmodel = _trained_qat(arch, backend, synthetic)
    int8 = export_int8(qmodel)
    x = synthetic.test_x.float() / 255
    assert twin_agreement(qmodel, int8, x) >= 0.99
    # the int8 model really is int8: its conv weights are quantized tensors
    first = int8.body[0][0] if isinstance(int8.body[0], torch.nn.Sequential) else int8.body[0]
    assert first.weight().dtype == torch.qint8


def test_export_reuses_the_twins_integer_codes_with_bn_folded(synthetic):
    qmodel = _trained_qat("convnet", "server", synthetic, steps=5)
    block = qmodel.body[1]
    with torch.no_grad():
        block.bn.weight[0] = -abs(block.bn.weight[0]) - 0.1  # a negative BN scale flips the codes' sign
    int8 = export_int8(qmodel)
    codes, _ = weight_int_repr(block.conv.weight, 8)
    k = block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)
    expected = codes * torch.where(k < 0, -1, 1).view(-1, 1, 1, 1).to(torch.int8)
    assert torch.equal(int8.body[1][0].weight().int_repr(), expected)


def test_export_refuses_float_and_low_bit_models(synthetic):
    with pytest.raises(ConfigError, match="QAT"):
        export_int8(tiny())
    qmodel = _trained_qat("convnet", "server", synthetic, steps=2)
    set_bit_width(qmodel, 4)
    with pytest.raises(ConfigError, match="8-bit"):
        export_int8(qmodel)


def test_set_bit_width_tells_modules_with_an_on_bit_width_hook():
    class PerWidth(torch.nn.Module):
        seen = []

        def on_bit_width(self, bits):
            self.seen.append(bits)

    qmodel = quantize(tiny())
    qmodel.extra = PerWidth()
    set_bit_width(qmodel, 4)
    set_bit_width(qmodel, 2)
    assert PerWidth.seen == [4, 2]


def test_a_refused_bit_width_leaves_the_model_unchanged():
    class OnlyEight(torch.nn.Module):
        def on_bit_width(self, bits):
            if bits != 8:
                raise ConfigError(f"bit width {bits} not in the model's set (8)")

    qmodel = quantize(tiny())
    qmodel.extra = OnlyEight()
    with pytest.raises(ConfigError, match="not in the model's set"):
        set_bit_width(qmodel, 4)
    assert get_bit_width(qmodel) == 8 and all(m.bits == 8 for m in qmodel.modules() if isinstance(m, ActQuant))


# ---------------------------------------------------------------- learned activation ranges (LSQ+)


def test_learned_range_starts_at_min_max_and_gets_gradients():
    q = ActQuant(2, learned=True).train()
    x = torch.randn(4096)
    q(x)  # first training batch: the range starts at its min / max
    assert q.lo.item() == pytest.approx(x.min().item()) and q.hi.item() == pytest.approx(x.max().item())
    assert isinstance(q.lo, torch.nn.Parameter) and isinstance(q.hi, torch.nn.Parameter)
    lo_before = q.lo.item()
    (q(x) - x).square().mean().backward()
    assert q.lo.grad is not None and q.hi.grad is not None and q.hi.grad.abs() > 0
    # the range is not an EMA any more: a later batch does not move it
    with torch.no_grad():
        q(x * 10)
    assert q.lo.item() == lo_before


def test_learned_range_clips_outliers_and_beats_min_max_at_2_bits():
    # Gaussian activations with a few large outliers: min/max wastes the 4 levels on the outliers;
    # learning the range for the quantization error should clip them and cut the error.
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000), torch.tensor([12.0, -12.0])])
    q = ActQuant(2, learned=True).train()
    q(x)
    mse_minmax = (q.eval()(x) - x).square().mean().item()
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (q(x) - x).square().mean().backward()
        opt.step()
    mse_learned = (q.eval()(x) - x).square().mean().item()
    assert q.hi.item() < 6 and q.lo.item() > -6, (q.lo.item(), q.hi.item())
    assert mse_learned < 0.5 * mse_minmax, (mse_learned, mse_minmax)


def test_learned_range_forward_equals_the_plain_fake_quantizer_and_keeps_range_across_widths():
    q = ActQuant(4, learned=True).train()
    x = torch.rand(1000) * 3 - 0.5
    q(x)
    with torch.no_grad():
        q.lo.fill_(-0.37)
        q.hi.fill_(2.11)
    learned = q(x)  # gradient path (learnable op)
    scale, zp = q.qparams()
    assert torch.equal(learned.detach(), torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 15))
    with torch.no_grad():
        assert torch.equal(q.eval()(x), learned.detach())  # eval / no-grad path: the same numbers
    model = quantize(tiny(), QuantConfig(4, 4, act_range="learned"))
    model.train()(torch.rand(8, 1, 28, 28))
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    ranges = [(a.lo.item(), a.hi.item()) for a in acts]
    set_bit_width(model, 2)
    assert [(a.lo.item(), a.hi.item()) for a in acts] == ranges
    assert [a.levels for a in acts] == [127, 3, 3, 3, 255]  # edges stay 8-bit (input 7-bit range on server)


def test_learned_ranges_are_trained_by_the_model_optimizer_and_export_to_int8(synthetic):
    torch.manual_seed(0)
    model = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28))
    qmodel = quantize(model, QuantConfig(8, 8, backend="server", act_range="learned"))
    acts = [m for m in qmodel.modules() if isinstance(m, ActQuant)]
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    x = synthetic.train_x[:512].float() / 255
    y = synthetic.train_y[:512]
    qmodel.train()
    qmodel(x[:64])  # initialise the ranges
    start = [(a.lo.item(), a.hi.item()) for a in acts]
    for i in range(0, 512, 64):
        opt.zero_grad()
        F.cross_entropy(qmodel(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    assert [(a.lo.item(), a.hi.item()) for a in acts] != start, "the optimizer must move the learned ranges"
    qmodel.eval()
    int8 = export_int8(qmodel)
    assert twin_agreement(qmodel, int8, synthetic.test_x.float() / 255) >= 0.99


def test_unknown_act_range_is_a_clear_error():
    with pytest.raises(ConfigError, match="act_range"):
        QuantConfig(4, 4, act_range="minmax")


@pytest.mark.parametrize("levels", [3, 15, 127, 255])
def test_fast_activation_fake_quant_is_bit_identical_to_torch_with_the_same_gradient(levels):
    from qrobust.quant.fake import fake_quantize_activation

    torch.manual_seed(levels)
    x = (torch.rand(4, 8, 6, 6) * 8 - 2).to(memory_format=torch.channels_last)
    scale = torch.tensor([7.0 / levels])
    zero_point = torch.tensor([round(2.0 / scale.item())], dtype=torch.int32)
    x[0, 0, 0, :3] = torch.tensor([-2.0 + 0.5 * scale.item(), 0.0, 5.0])  # a tie, zero, the clip edge
    ours = fake_quantize_activation(x, scale, zero_point, levels)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, levels)
    assert torch.equal(ours, ref)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (fake_quantize_activation(a, scale, zero_point, levels) * g).sum().backward()
    (torch.fake_quantize_per_tensor_affine(b, scale, zero_point, 0, levels) * g).sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert (a.grad == 0).any() and (a.grad != 0).any()  # some values clipped, some not
