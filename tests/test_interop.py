"""ART interoperability: ART's PGD through to_art is our PGD; the EOT wrapper's outputs and gradients are
the mean over the draws of a randomised model."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import train_tiny_float

from qrobust.attacks.whitebox import pgd
from qrobust.errors import ConfigError
from qrobust.interop import DEFAULT_EOT, EOTWrapper, is_randomised, to_art
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.quant.stochastic import deterministic_sq, insert_stochastic_quantizers

art_evasion = pytest.importorskip("art.attacks.evasion", reason="ART is in the dev extra: pip install -e '.[dev]'")

EPS, STEPS = 0.05, 5
STEP_SIZE = 2.5 * EPS / STEPS  # our pgd's default rule, given to both attacks explicitly


@pytest.fixture(scope="module")
def lenet(synthetic):
    """A tiny LeNet-5 trained briefly on the synthetic data (clean accuracy ~0.97 on the test images)."""
    return train_tiny_float(synthetic, "lenet5", steps=40)


def _art_pgd(classifier, x, y, random_init: int, steps: int = STEPS):
    attack = art_evasion.ProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=STEP_SIZE,
                                                  max_iter=steps, num_random_init=random_init,
                                                  batch_size=len(x), verbose=False)
    return torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))


def _robust_accuracy(model, x_adv, y):
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_to_art_describes_the_model(lenet):
    classifier = to_art(lenet)
    assert classifier.input_shape == (1, 28, 28) and classifier.nb_classes == 10
    assert tuple(classifier.clip_values) == (0.0, 1.0)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert np.allclose(classifier.predict(x.numpy()), lenet(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_art_pgd_without_random_start_is_our_pgd(lenet, synthetic, quantized):
    # Without a random start both are the same deterministic algorithm (sign steps, projection onto the
    # eps-ball and [0, 1]) on the same kernels and shapes: the adversarial images agree to float rounding
    # (1e-6 covers the different order of the clip and projection arithmetic; here they were identical).
    # Through the QAT twin this also checks that ART follows the straight-through gradients.
    model = lenet
    if quantized:
        model = quantize(lenet).train()
        with torch.no_grad():
            model(synthetic.train_x[:256].float() / 255)  # EMA activation ranges
        model.eval()
    x, y = synthetic.test_x[:100].float() / 255, synthetic.test_y[:100]
    ours = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP_SIZE, random_start=False, check=False)
    theirs = _art_pgd(to_art(model), x, y, random_init=0)
    assert (ours - x).abs().max() > EPS / 2  # the attack moved the images
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_art_pgd_with_random_starts_agrees_with_ours_within_noise(lenet, synthetic):
    # Tolerance 0.03 (6 of 200 images) on the mean robust accuracy of two random starts each: measured
    # over 8 random starts at this eps, either attack's robust accuracy moved by at most 0.01 (2 images,
    # std 0.0035); 0.03 leaves room for other CPUs, and a wrong attack (a single step) is 0.1 away.
    x, y = synthetic.test_x[:200].float() / 255, synthetic.test_y[:200]
    classifier = to_art(lenet)
    ours, theirs = [], []
    for seed in range(2):
        x_adv = pgd(lenet, x, y, EPS, steps=STEPS, step_size=STEP_SIZE,
                    generator=torch.Generator().manual_seed(seed), check=False)
        ours.append(_robust_accuracy(lenet, x_adv, y))
        np.random.seed(seed)  # ART draws its random start with numpy
        x_art = _art_pgd(classifier, x, y, random_init=1)
        assert (x_art - x).abs().max() <= EPS + 1e-6 and 0 <= x_art.min() and x_art.max() <= 1
        theirs.append(_robust_accuracy(lenet, x_art, y))
    clean = _robust_accuracy(lenet, x, y)
    assert 0.3 < np.mean(ours) < clean - 0.1, (ours, clean)  # an attack that bites but does not saturate
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.03, (ours, theirs)
    one_step = _robust_accuracy(lenet, _art_pgd(classifier, x, y, random_init=0, steps=1), y)
    assert one_step - np.mean(ours) > 0.03, (one_step, ours)  # the tolerance tells attacks apart


@pytest.fixture
def sq_model():
    """A tiny randomised model: LeNet-5 behind a 4-bin stochastic quantizer at its input."""
    torch.manual_seed(0)
    model = build_model("lenet5", channels=1, num_classes=10, image_size=(28, 28))
    return insert_stochastic_quantizers(model, at_input=True, num_bins=4, alpha=1.0).eval()


def test_eot_wrapper_averages_log_probabilities_over_the_draws(sq_model):
    x = torch.rand(6, 1, 28, 28)
    wrapper = EOTWrapper(sq_model, eot=5)
    with torch.no_grad():
        torch.manual_seed(1)
        out = wrapper(x)
        torch.manual_seed(1)
        draws = torch.log_softmax(sq_model(x.repeat(5, 1, 1, 1)), 1).view(5, 6, 10)  # the same five draws
        torch.manual_seed(1)
        again = wrapper(x)
        torch.manual_seed(2)
        other = wrapper(x)
    assert not torch.equal(draws[0], draws[1])  # the draws differ: the model is randomised
    torch.testing.assert_close(out, draws.mean(0), atol=1e-6, rtol=0)  # mean over the draw axis; float order
    assert torch.equal(out, again) and not torch.equal(out, other)  # deterministic given the seed
    looped = EOTWrapper(sq_model, eot=5, batched=False)
    with torch.no_grad():
        assert looped(x).shape == (6, 10)


def test_arts_loss_gradient_is_the_mean_of_the_per_draw_gradients(sq_model):
    n, x, y = 4, torch.rand(3, 1, 28, 28), torch.tensor([0, 3, 7])
    classifier = to_art(sq_model, eot=n)
    assert isinstance(classifier.model, EOTWrapper) and classifier.model.eot == n
    torch.manual_seed(5)
    grad = torch.from_numpy(classifier.loss_gradient(x.numpy(), np.eye(10)[y.numpy()]))  # ART takes one-hot
    # the same draws by hand: one batched forward on n copies of x (same RNG stream), one loss per draw
    torch.manual_seed(5)
    copies = [x.clone().requires_grad_(True) for _ in range(n)]
    logits = sq_model(torch.cat(copies)).view(n, 3, 10)
    per_draw = [torch.autograd.grad(F.cross_entropy(logits[i], y, reduction="sum"), copies[i], retain_graph=True)[0]
                for i in range(n)]
    assert not torch.allclose(per_draw[0], per_draw[1])  # the draws' gradients differ
    expected = torch.stack(per_draw).mean(0)
    # ART's NLLLoss averages over the batch (factor 1/3); float32 sums in another order: rtol 1e-4
    torch.testing.assert_close(grad * len(x), expected, rtol=1e-4, atol=1e-7)


def test_to_art_finds_randomised_models_and_warns_on_single_draws(sq_model, lenet):
    assert is_randomised(sq_model) and not is_randomised(lenet)
    assert isinstance(to_art(sq_model).model, EOTWrapper) and to_art(sq_model).model.eot == DEFAULT_EOT
    with deterministic_sq(sq_model):
        assert not is_randomised(sq_model) and not isinstance(to_art(sq_model).model, EOTWrapper)
    with pytest.warns(UserWarning, match="eot=1"):
        to_art(sq_model, eot=1)
    with pytest.raises(ConfigError, match="eot"):
        to_art(lenet, eot=0)


def test_to_art_says_what_is_missing(lenet, monkeypatch):
    with pytest.raises(ConfigError, match="input_shape"):
        to_art(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    monkeypatch.setitem(sys.modules, "art.estimators.classification", None)  # ART not installed
    with pytest.raises(ConfigError, match=r"pip install qrobust\[art\]"):
        to_art(lenet)
