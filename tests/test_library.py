"""The core as a library: one accuracy with one input rule, eval_mode, and fit() leaving the caller's
objects as its docstring says (device from the config, memory format, mode, quiet by default)."""

import pytest
import torch
from torch import nn

import qrobust.attacks.whitebox as whitebox
import qrobust.train.loop as loop
from qrobust.config import TrainSection
from qrobust.data import BatchLoader, TensorLoader
from qrobust.errors import ConfigError
from qrobust.metrics import accuracy, predict_logits
from qrobust.models import model_for_data
from qrobust.train.loop import fit
from qrobust.train.objectives import CrossEntropy
from qrobust.utils import eval_mode, module_device


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


# ------------------------------------------------------------------ eval_mode


def test_eval_mode_restores_every_submodules_flag_even_after_an_error():
    net = tiny_net().train()
    net[1].eval()  # mixed: a frozen BatchNorm inside a training model
    before = modes(net)
    other = nn.Linear(2, 2).eval()
    with eval_mode(net, other):
        assert not any(modes(net)) and not other.training
    assert modes(net) == before and not other.training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert modes(net) == before
    assert module_device(net).type == "cpu" and module_device(nn.ReLU()).type == "cpu"


# ------------------------------------------------------------------ one accuracy


def test_there_is_one_accuracy():
    assert not hasattr(whitebox, "accuracy") and "accuracy" not in whitebox.__all__


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8, generator=g)
    return x8, torch.randint(0, 3, (40,), generator=g)


def test_accuracy_reads_uint8_and_float_images_the_same_way(images):
    x8, y = images
    net = tiny_net().eval()
    from_uint8 = accuracy(net, x8, y)
    assert from_uint8 == accuracy(net, x8.float() / 255, y)  # the same division, the same forwards
    with torch.no_grad():
        hand = (net((x8.float() / 255).contiguous(memory_format=torch.channels_last)).argmax(1) == y)
    assert from_uint8 == float(hand.float().mean())  # a float32 mean, as the studies have stored it
    assert torch.equal(predict_logits(net, x8), predict_logits(net, x8.float() / 255))


@pytest.mark.parametrize("bad, match", [
    (lambda x: x.float(), r"float images must lie in \[0, 1\], got values in \[0, 255\]"),
    (lambda x: x.float() / 255 - 0.5, r"must lie in \[0, 1\].*normalisation .* inside the model"),
    (lambda x: torch.full(x.shape, float("nan")), r"must lie in \[0, 1\]"),
    (lambda x: x.long(), "uint8 images in \\[0, 255\\] or float images in \\[0, 1\\], got dtype torch.int64"),
    (lambda x: x[:0], "non-empty batch"),
    (lambda x: x.flatten()[:5], "non-empty batch"),
], ids=["float-0-255", "normalised", "nan", "int64", "empty", "1-d"])
def test_accuracy_refuses_what_breaks_the_input_rule(images, bad, match):
    x8, y = images
    with pytest.raises(ConfigError, match=match):
        accuracy(tiny_net(), bad(x8), y)


def test_accuracy_refuses_bad_labels_and_settings(images):
    x8, y = images
    net = tiny_net()
    with pytest.raises(ConfigError, match=r"y must be an integer tensor of shape \(40,\)"):
        accuracy(net, x8, y[:3])
    with pytest.raises(ConfigError, match="y must be an integer tensor"):
        accuracy(net, x8, y.float())
    with pytest.raises(ConfigError, match="draws must be an integer >= 1"):
        accuracy(net, x8, y, draws=0)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        accuracy(net, x8, y, batch_size=0)


class Noisy(nn.Module):
    """A randomised classifier (random in eval mode too): right with probability about 1/2."""

    def forward(self, x):
        return torch.randn(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]


def test_accuracy_counts_an_image_only_if_every_draw_is_right():
    x, y = torch.rand(2000, 1, 2, 2), torch.zeros(2000, dtype=torch.long)
    torch.manual_seed(0)
    one, three = accuracy(Noisy(), x, y), accuracy(Noisy(), x, y, draws=3)
    assert 0.45 < one < 0.55 and 0.09 < three < 0.16  # ~1/2 and ~1/8


def test_accuracy_leaves_the_model_as_found(images):
    x8, y = images
    net = tiny_net().train()
    net[1].eval()
    before, state = modes(net), {k: v.clone() for k, v in net.state_dict().items()}
    first = accuracy(net, x8, y)
    assert first == accuracy(net, x8, y)  # eval mode inside: dropout off, BatchNorm statistics frozen
    assert modes(net) == before
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN buffers untouched


# ------------------------------------------------------------------ fit()


@pytest.fixture(scope="module")
def small(synthetic):
    def make(epochs=1, **train):
        torch.manual_seed(0)
        model = model_for_data("lenet5", synthetic.info)
        loader = BatchLoader(synthetic.train_x[:128], synthetic.train_y[:128], 64, shuffle=True, drop_last=True,
                             seed=0)
        return model, loader, TrainSection(epochs=epochs, batch_size=64, lr=0.05, **train)

    return make


def test_fit_takes_the_device_from_the_config_unless_told(small, monkeypatch):
    asked = []
    real = loop.resolve_device
    monkeypatch.setattr(loop, "resolve_device", lambda name: asked.append(name) or real(name))
    model, loader, cfg = small(device="cpu")
    fit(model, loader, CrossEntropy(), cfg)
    assert asked == ["cpu"] and module_device(model).type == "cpu"
    model, loader, cfg = small(device="cuda")
    fit(model, loader, CrossEntropy(), cfg, device="cpu")  # an explicit device wins over the config
    assert asked == ["cpu"] and module_device(model).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device"):
            fit(model, loader, CrossEntropy(), cfg)  # the config's device is really read
        assert asked == ["cpu", "cuda"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_from_the_config_with_a_cpu_loader(small):
    model, loader, cfg = small(device="cuda")
    rows = fit(model, loader, CrossEntropy(), cfg)  # the loader's CPU batches are copied over
    assert module_device(model).type == "cuda" and rows[-1]["train_loss"] == rows[-1]["train_loss"]


@pytest.mark.parametrize("channels_last", [True, False])
def test_fit_leaves_the_model_trained_in_place_as_documented(small, channels_last):
    model, loader, cfg = small(channels_last=channels_last, device="cpu")
    model.eval()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fit(model, loader, CrossEntropy(), cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert conv.weight.is_contiguous(memory_format=fmt)  # the layout training used, kept
    assert all(modes(model))  # training mode on return, as the docstring says


def test_fit_is_quiet_unless_asked(small, capsys):
    model, loader, cfg = small(device="cpu")
    fit(model, loader, CrossEntropy(), cfg)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    fit(model, loader, CrossEntropy(), cfg, progress=True)
    loud = capsys.readouterr()
    assert "epoch 1/1" in loud.out + loud.err


def test_fit_copies_batches_to_the_training_device_only_when_needed():
    x, y = torch.rand(8, 3), torch.arange(8) % 2
    wrapped = loop._OnDevice(TensorLoader(x, y, 4, seed=0), torch.device("cpu"))
    assert len(wrapped) == 2 and wrapped.batch_size == 4  # the loader's own attributes show through
    wrapped.set_epoch(0)
    xb, _ = next(iter(wrapped))
    inner = TensorLoader(x, y, 4, seed=0)
    inner.set_epoch(0)
    assert torch.equal(xb, next(iter(inner))[0])  # same batches, same order
