"""Low-bit models behave like deployed ones (issue 10): on real Fashion-MNIST test images a 2- and 4-bit
QAT model with 8-bit edges (input quantizer and logits) has few tied predictions and many logit values,
while the old layout (edges at the body's width) ties a large share of them."""

import pytest
import torch

from qrobust.config import TrainSection
from qrobust.data import BatchLoader, load_dataset
from qrobust.metrics import predict_logits, tie_rate
from qrobust.models import model_for_data
from qrobust.quant import QuantConfig, activation_quantizers, quantize, set_bit_width
from qrobust.train.loop import fit
from qrobust.train.objectives import CrossEntropy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fmnist():
    try:
        return load_dataset("fashion-mnist")
    except Exception as err:  # the Debian package is installed by `make test`; say so if it is not
        pytest.fail(f"real Fashion-MNIST is needed (make data): {err}")


@pytest.fixture(scope="module")
def trained(fmnist):
    """A float convnet (2 epochs on 8k training images), then QAT at 8, 4 and 2 bits (1 epoch each) with
    8-bit edges, and at 2 bits with the old edges; logits on the 10k test images."""
    x, y = fmnist.train_x[:8000], fmnist.train_y[:8000]
    loader = BatchLoader(x, y, 128, shuffle=True, augment=False, info=fmnist.info, drop_last=True, seed=0)
    torch.manual_seed(0)
    fp = model_for_data("convnet", fmnist.info)
    fit(fp, loader, CrossEntropy(), TrainSection(epochs=2, batch_size=128, lr=0.05))
    out = {}
    for tag, bits, edge in (("8", 8, 8), ("4", 4, 8), ("2", 2, 8), ("2-old", 2, 0)):
        torch.manual_seed(0)
        q = quantize(fp, QuantConfig(weight_bits=bits, edge_bits=edge))
        fit(q, loader, CrossEntropy(), TrainSection(epochs=1, batch_size=128, lr=0.01, warmup_epochs=0))
        out[tag] = (q, predict_logits(q, fmnist.test_x))
    return out


def test_low_bit_models_keep_ties_rare_and_logits_fine(trained, fmnist):
    assert tie_rate(trained["8"][1]) < 0.03
    for tag, bits in (("4", 4), ("2", 2)):
        model, logits = trained[tag]
        rate = tie_rate(logits)
        assert rate < 0.03, (tag, rate)
        assert logits.unique().numel() >= 8 * 2**bits, (tag, logits.unique().numel())  # 8-bit logits: up to 256
        acc = float((logits.argmax(1) == fmnist.test_y).float().mean())
        assert acc > 0.7, (tag, acc)
        # What ties remain come from the logits' 8-bit resolution (two best classes closer than one step),
        # not from the body: with the logit quantizer off, the same model has (almost) none.
        (logit_q,) = activation_quantizers(model, "logits")
        logit_q.enabled = False
        try:
            assert tie_rate(predict_logits(model, fmnist.test_x)) < 1e-3
        finally:
            logit_q.enabled = True


def test_the_old_body_width_edges_tie_many_predictions(trained):
    old, new = tie_rate(trained["2-old"][1]), tie_rate(trained["2"][1])
    assert trained["2-old"][1].unique().numel() <= 4  # 2-bit logits: 4 values at most
    assert old > 0.15 and old > 10 * new, (old, new)


def test_switching_widths_leaves_the_edge_quantizers_alone(trained, fmnist):
    model = trained["8"][0]
    edges = activation_quantizers(model, "input") + activation_quantizers(model, "logits")
    before = [(a.bits, a.levels, float(a.lo), float(a.hi)) for a in edges]
    try:
        for bits in (4, 2, 8):
            set_bit_width(model, bits)
            assert [(a.bits, a.levels, float(a.lo), float(a.hi)) for a in edges] == before
            assert all(a.bits == bits for a in activation_quantizers(model, "body"))
    finally:
        set_bit_width(model, 8)
    assert len(edges) == 2 and [a.bits for a in edges] == [8, 8]
