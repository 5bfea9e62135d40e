"""The victim's deployed artefact (int8 answers), its independent query count, and what the defender pays
in calibration (ECE, NLL): tiny models, synthetic data, hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import train_tiny_qat
from torch import nn

from qrobust.attacks.extraction.dfme import DFME
from qrobust.attacks.extraction.knockoff import KnockoffNets
from qrobust.attacks.extraction.maze import MAZE
from qrobust.attacks.extraction.victim import CountingModule, Victim, deployed_int8
from qrobust.defenses.output import make_defense
from qrobust.errors import ConfigError
from qrobust.metrics import expected_calibration_error, nll
from qrobust.models import build_model
from qrobust.quant import set_bit_width, set_quantization_enabled


def tiny_qat(synthetic, backend="server", steps=40, **quant):
    return train_tiny_qat(synthetic, "convnet", steps, model_kwargs={"width": 8}, backend=backend, **quant)


@pytest.fixture(scope="module")
def twins(synthetic):
    return {backend: tiny_qat(synthetic, backend) for backend in ("server", "mobile")}


def images(synthetic):
    return torch.cat([synthetic.train_x, synthetic.test_x]).float() / 255


# --------------------------------------------------------------------------- int8 answers


@pytest.mark.parametrize("backend", ["server", "mobile"])
def test_an_8bit_victim_answers_from_int8_and_agrees_with_its_twin(twins, synthetic, backend):
    twin = twins[backend]
    x = images(synthetic)  # 768 images: >= 99.9% agreement means no disagreement at all here
    int8_victim = Victim(twin, budget=10_000)
    twin_victim = Victim(twin, budget=10_000, int8=False)
    assert int8_victim.answers_from == "int8" and int8_victim.int8_fallback is None
    assert twin_victim.answers_from == "model" and twin_victim.int8_fallback == "int8=False"
    a, b = int8_victim.query(x[:500]), int8_victim.query(x[500:], phase="other")
    answers = torch.cat([a, b])
    reference = twin_victim.query(x)
    assert (answers.argmax(1) == reference.argmax(1)).float().mean() >= 0.999
    # the int8 model is a different computation (bias rounding, requantization), not the twin again
    assert not torch.equal(answers, reference)
    torch.testing.assert_close(answers.sum(1), torch.ones(len(x)))
    assert int8_victim.ledger == {"knockoff": 500, "other": len(x) - 500}
    assert int8_victim.counts_agree(len(x)) and int8_victim.independent_counts["model_rows"] == len(x)


def test_int8_export_is_cached_per_state_of_the_twin(synthetic):
    twin = tiny_qat(synthetic, steps=5)
    first = deployed_int8(twin)
    assert deployed_int8(twin) is first  # same weights: the same export
    with torch.no_grad():
        twin.body[0].conv.weight.mul_(1.5)  # in place, as an optimizer step would
    again = deployed_int8(twin)
    assert again is not first
    x = images(synthetic)[:64]
    assert not torch.equal(first(x), again(x))


def test_building_an_int8_victim_leaves_the_twin_as_it_was(synthetic):
    twin = tiny_qat(synthetic, steps=5).train()
    twin.body[0].eval()  # mixed mode must come back mixed
    modes = [m.training for m in twin.modules()]
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    victim = Victim(twin, budget=10)
    victim.query(images(synthetic)[:10])
    assert victim.answers_from == "int8"
    assert [m.training for m in twin.modules()] == modes
    assert all(torch.equal(t, state[k]) for k, t in twin.state_dict().items())


def test_victims_that_cannot_be_int8_answer_from_the_model_and_say_why(synthetic):
    info = synthetic.info
    float_model = build_model("convnet", channels=1, num_classes=10, image_size=info.image_size, width=8)
    cases = {
        "not a QAT model": float_model,
        "not 8-bit": set_bit_width(tiny_qat(synthetic, steps=2), 4),
        "float_logits": tiny_qat(synthetic, steps=2, float_logits=True),
        "switched off": set_quantization_enabled(tiny_qat(synthetic, steps=2), False),
    }
    for reason, model in cases.items():
        victim = Victim(model, budget=10)
        assert victim.answers_from == "model" and reason in victim.int8_fallback, (reason, victim.int8_fallback)
        with pytest.raises(ConfigError, match="int8=True"):
            Victim(model, budget=10, int8=True)
    assert Victim(tiny_qat(synthetic, steps=2), budget=10, int8=True).answers_from == "int8"
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="int8 must be"):
            Victim(float_model, budget=10, int8=bad)


# --------------------------------------------------------------------------- the independent count


def test_counting_module_counts_rows_and_passes_everything_through():
    net = nn.Linear(3, 2)
    counter = CountingModule(net)
    x = torch.randn(5, 3)
    assert torch.equal(counter(x), net(x)) and counter(x[:2]).shape == (2, 2)
    assert counter.rows == 7


def test_independent_counts_equal_the_ledger_and_the_reported_queries_and_can_disagree(twins, synthetic):
    twin = twins["server"]
    x = images(synthetic)
    defense = make_defense("rs", beta=0.3, gamma=0.5)
    clone_kwargs = dict(channels=1, num_classes=10, image_size=(28, 28), width=4)
    reports = {}
    for name in ("knockoff", "dfme", "maze"):
        victim = Victim(twin, defense=defense, budget=3000)
        clone = build_model("convnet", **clone_kwargs)
        if name == "knockoff":
            result = KnockoffNets(victim, clone, epochs=1, seed=0, transfer_set=x).run(500)
        elif name == "dfme":
            result = DFME(victim, clone, batch_size=8, latent_dim=8, generator_width=4, seed=0).run(1000)
        else:
            result = MAZE(victim, clone, batch_size=8, latent_dim=8, generator_width=4, num_directions=2, replay_capacity=64,
                          seed=0).run(1000)
        victim.accuracy(x[:100], synthetic.train_y[:100])  # the defender's evaluation: counted apart
        counts = victim.independent_counts
        reports[name] = (result.queries_used, counts)
        assert counts["model_rows"] == counts["defense_rows"] == victim.used == result.queries_used > 0, name
        assert counts["evaluation_rows"] == 100 and victim.counts_agree(result.queries_used)
        assert not victim.counts_agree(result.queries_used + 1)
    # a path that computes answers without the ledger shows up in the independent count
    victim = Victim(twin, budget=100)
    victim.query(x[:10])
    victim._query_model(x[:3])  # rows computed but never booked
    assert victim.independent_counts["model_rows"] == 13 and not victim.counts_agree(10)


# --------------------------------------------------------------------------- calibration: ECE and NLL

# four rows, three classes; labels 0, 0, 0, 1
ROWS = [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.62, 0.28, 0.10], [0.65, 0.25, 0.10]]
PROBS, PROBS64 = torch.tensor(ROWS), torch.tensor(ROWS, dtype=torch.float64)
LABELS = torch.tensor([0, 0, 0, 1])


def test_ece_by_hand():
    # confidences .9 (right), .7 (wrong), .62 (right), .65 (wrong); 15 bins of width 1/15:
    # .9 -> (13/15, 14/15], .7 -> (10/15, 11/15], .62 and .65 share (9/15, 10/15]
    # ECE = 1/4 |1 - .9| + 1/4 |0 - .7| + 2/4 |.5 - .635| = (.1 + .7 + .27) / 4
    # (PROBS are float32: .9 and friends are not exact, hence 1e-7)
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(1.07 / 4, abs=1e-7)
    assert expected_calibration_error(PROBS64, LABELS) == pytest.approx(1.07 / 4, abs=1e-12)
    # one bin: |accuracy - mean confidence| = |.5 - .7175|
    assert expected_calibration_error(PROBS64, LABELS, bins=1) == pytest.approx(0.2175, abs=1e-12)
    # perfectly calibrated: confidence 1 and always right; confidence .5 and right half the time
    calibrated = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    assert expected_calibration_error(calibrated[:1], torch.tensor([0])) == 0.0
    assert expected_calibration_error(torch.cat([calibrated[1:], calibrated[1:]]),
                                      torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)


def test_nll_by_hand_and_its_floor():
    expected = -(math.log(0.9) + math.log(0.2) + math.log(0.62) + math.log(0.25)) / 4
    assert nll(PROBS64, LABELS) == pytest.approx(expected, rel=1e-12)
    assert nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-6)  # float32 inputs: .9 etc. are not exact
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nll(one_hot, torch.tensor([0, 0])) == pytest.approx(-math.log(1e-12) / 2)  # a zero costs -log(eps)
    assert nll(one_hot, torch.tensor([0, 0]), eps=1e-6) == pytest.approx(-math.log(1e-6) / 2)


@pytest.mark.parametrize("bad", [
    {"probs": torch.zeros(0, 3), "y": torch.zeros(0, dtype=torch.long)},
    {"probs": PROBS, "y": LABELS.float()},
    {"probs": PROBS, "y": LABELS[:3]},
    {"probs": PROBS, "y": torch.tensor([0, 0, 0, 3])},
    {"probs": PROBS, "y": LABELS, "bins": 0},
], ids=str)
def test_calibration_metrics_refuse_bad_input(bad):
    with pytest.raises(ConfigError):
        expected_calibration_error(**bad)


class FixedProbs(nn.Module):
    """Input row i (an image holding i / 10) -> logits log(PROBS[i]): softmax gives PROBS back."""

    def forward(self, x):
        return PROBS.log()[(x.flatten(1)[:, 0] * 10).round().long()]


def test_victim_calibration_of_the_defended_answers_is_not_a_query():
    x = (torch.arange(4).float() / 10).view(4, 1, 1, 1)
    victim = Victim(FixedProbs(), budget=5)
    assert victim.calibration(x, LABELS) == {
        "ece": pytest.approx(1.07 / 4, abs=1e-6),
        "nll": pytest.approx(nll(PROBS, LABELS), rel=1e-6),
    }
    assert victim.used == 0 and victim.ledger == {} and victim.remaining == 5
    labels_only = Victim(FixedProbs(), defense="label", budget=5).calibration(x, LABELS)
    # one-hot answers: confidence 1 everywhere, right on rows 0, 2 -> ECE = |.5 - 1|; NLL: two zeros
    assert labels_only["ece"] == pytest.approx(0.5) and labels_only["nll"] == pytest.approx(-math.log(1e-12) / 2)
    rs = make_defense("rs", beta=0.5, gamma=0.2)
    defended = Victim(FixedProbs(), defense=rs, budget=5).calibration(x, LABELS)
    answers = rs(PROBS)
    assert defended == {"ece": pytest.approx(expected_calibration_error(answers, LABELS), abs=1e-6),
                        "nll": pytest.approx(nll(answers, LABELS), rel=1e-5)}
    assert defended != Victim(FixedProbs(), budget=5).calibration(x, LABELS)
