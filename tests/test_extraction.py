"""Extraction building blocks: the budgeted Victim, KnockoffNets, DFME, MAZE, the noise floor, metrics.

The task: K = 6 glyph classes, each a 3x3 binary pattern placed at a random spot of a dark 12x12
image. The victim is a tiny conv net (conv -> global max-pool -> linear). Uniform noise lights every
glyph detector at once and mostly lands in one or two classes, so noise queries teach a clone little;
the transfer set (random *other* 3x3 glyphs on the same kind of canvas) is "another data set" that
KnockoffNets can exploit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.extraction.dfme import DFME, Generator
from qrobust.attacks.extraction.knockoff import (
    KnockoffNets,
    RandomNoise,
    gradient_bandit_step,
    prepare_transfer_set,
    random_noise_floor,
    soft_cross_entropy,
)
from qrobust.attacks.extraction.maze import MAZE, kl_disagreement
from qrobust.attacks.extraction.metrics import ExtractionResult, agreement, clone_accuracy
from qrobust.attacks.extraction.victim import QueryBudgetExhausted, Victim
from qrobust.defenses.output import make_defense
from qrobust.errors import ConfigError, QrobustError
from qrobust.registry import ATTACKS

K, S = 6, 12
SHAPE = (1, S, S)


def place(glyphs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Put each 3x3 glyph at a random position of a dark S x S canvas with mild noise."""
    n = glyphs.shape[0]
    pos = torch.randint(0, (S - 2) ** 2, (n,), generator=g)
    onehot = F.one_hot(pos, (S - 2) ** 2).float().view(1, n, S - 2, S - 2)
    strokes = glyphs * (0.7 + 0.3 * torch.rand(n, 3, 3, generator=g))
    canvas = F.conv_transpose2d(onehot, strokes.view(n, 1, 3, 3), groups=n).view(n, 1, S, S)
    return torch.maximum(canvas, 0.1 * torch.rand(n, 1, S, S, generator=g))


class GlyphNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.head = nn.Linear(width, K)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).amax(dim=(2, 3)))


def glyph_task() -> dict:
    """The glyph task: a GlyphNet victim trained on placed glyphs (seed 0), test images and labels, and a
    transfer set of random glyphs (what KnockoffNets queries)."""
    g = torch.Generator().manual_seed(0)
    glyphs = (torch.rand(K, 3, 3, generator=g) < 0.5).float()
    glyphs[:, 1, 1] = 1.0  # at least one stroke each
    y_train, y_test = torch.randint(0, K, (500,), generator=g), torch.randint(0, K, (500,), generator=g)
    x_train, x_test = place(glyphs[y_train], g), place(glyphs[y_test], g)
    transfer = place((torch.rand(800, 3, 3, generator=g) < 0.5).float(), g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GlyphNet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            loss = F.cross_entropy(model(x_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"model": model.eval(), "x_test": x_test, "y_test": y_test, "transfer": transfer}


@pytest.fixture(scope="module")
def task():
    task = glyph_task()
    assert (task["model"](task["x_test"]).argmax(1) == task["y_test"]).float().mean() > 0.95
    return task


def fresh_clone(seed: int = 1) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GlyphNet()


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --------------------------------------------------------------------------- Victim


def test_victim_ledger_counts_every_answered_query_by_phase(task):
    v = Victim(task["model"], budget=100, batch_size=7)
    x = task["transfer"]
    v.query(x[:10])
    v.query(x[10:40], phase="dfme_generator")
    v.query(x[40:45], phase="knockoff")
    assert v.ledger == {"knockoff": 15, "dfme_generator": 30}
    assert v.used == 45 and v.remaining == 55 and v.budget == 100


def test_victim_answers_defended_probabilities(task):
    defense = make_defense("rs", beta=0.5, gamma=0.3)
    v = Victim(task["model"], defense=defense, budget=100)
    x = task["transfer"][:20]
    answers = v.query(x)
    clean = torch.softmax(task["model"](x), dim=1).detach()
    torch.testing.assert_close(answers, defense(clean))
    assert not answers.requires_grad
    torch.testing.assert_close(answers.sum(1), torch.ones(20))


def test_budget_exhaustion_raises_and_answers_nothing_extra(task):
    calls = []

    def spy(p):
        calls.append(len(p))
        return p

    v = Victim(task["model"], defense=spy, budget=50)
    x = task["transfer"]
    v.query(x[:30])
    with pytest.raises(QueryBudgetExhausted, match="asked for 21 queries but only 20 of 50 remain") as err:
        v.query(x[30:51], phase="knockoff")
    assert isinstance(err.value, QrobustError)
    assert (err.value.requested, err.value.remaining) == (21, 20)
    assert v.used == 30 and v.remaining == 20 and sum(calls) == 30  # the refused batch was not even computed
    v.query(x[30:50])
    assert v.remaining == 0
    with pytest.raises(QueryBudgetExhausted):
        v.query(x[:1])
    assert v.ledger == {"knockoff": 50} and sum(calls) == 50


def test_victim_output_modes(task):
    x = task["transfer"][:40]
    probs = Victim(task["model"], budget=40).query(x)
    top1 = Victim(task["model"], output="top1", budget=40).query(x)
    assert torch.equal(top1, F.one_hot(probs.argmax(1), K).float())
    top2 = Victim(task["model"], output="topk", k=2, budget=40).query(x)
    assert ((top2 > 0).sum(1) <= 2).all() and torch.equal(top2.argmax(1), probs.argmax(1))
    torch.testing.assert_close(top2.sum(1), torch.ones(40))


def test_victim_evaluation_is_not_a_query(task):
    model = nn.Sequential(task["model"], nn.Dropout(0.5))  # eval mode must switch dropout off
    v = Victim(model, defense="label", budget=10)
    model.train()
    acc = v.accuracy(task["x_test"], task["y_test"])
    # the same 500 rows through the same kernel (the victim's batch_size 512 holds them all)
    expected = (task["model"](task["x_test"]).argmax(1) == task["y_test"]).float().mean().item()
    assert acc == pytest.approx(expected)
    assert v.mean_l1(task["x_test"]) > 0
    assert v.used == 0 and v.remaining == 10
    assert torch.equal(v.query(task["x_test"][:5]), v.query(task["x_test"][:5]))  # deterministic: eval mode


def test_victim_leaves_the_callers_model_as_it_found_it(task):
    model = nn.Sequential(copy.deepcopy(task["model"]), nn.Dropout(0.5)).train()
    model[0].conv.eval()  # a mixed-mode model must come back mixed, not all-train or all-eval
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    v = Victim(model, defense=make_defense("rs", beta=0.5, gamma=0.3), budget=20)
    assert [m.training for m in model.modules()] == modes  # building the victim changes nothing
    x = task["x_test"][:10]
    first = v.query(x)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(first, v.query(x))  # yet every answer came from eval mode (no dropout)
    v.labels(x), v.accuracy(x, task["y_test"][:10]), v.mean_l1(x)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and v.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": -1},
        {"budget": 1.5},
        {"budget": 10, "output": "logits"},
        {"budget": 10, "output": "topk"},
        {"budget": 10, "output": "topk", "k": 0},
        {"budget": 10, "k": 3},
        {"budget": 10, "batch_size": 0},
        {"budget": 10, "defense": "rs"},  # rs needs beta and gamma
        {"budget": 10, "defense": 3},
    ],
    ids=str,
)
def test_victim_bad_parameters(task, kwargs):
    with pytest.raises(ConfigError):
        Victim(task["model"], **kwargs)


# --------------------------------------------------------------------------- KnockoffNets and the floor


@pytest.mark.parametrize("sampling", ["random", "adaptive"])
def test_knockoff_clone_beats_the_random_noise_floor(task, sampling):
    budget = 400
    fit = {"epochs": 40, "lr": 0.1, "momentum": 0.9, "batch_size": 64, "progress": False, "seed": 0}
    eval_data = (task["x_test"], task["y_test"])
    victim = Victim(task["model"], budget=budget)
    result = KnockoffNets(victim, fresh_clone(), sampling=sampling, **fit).run(
        task["transfer"], eval_data=eval_data
    )
    floor = random_noise_floor(
        Victim(task["model"], budget=budget),
        fresh_clone(),
        num_queries=budget,
        image_shape=SHAPE,
        eval_data=eval_data,
        **fit,
    )
    assert result.queries_used == floor.queries_used == budget
    assert result.ledger == {"knockoff": budget} and floor.ledger == {"noise": budget}
    assert not result.stopped_early
    assert result.final_accuracy > 0.85
    assert result.final_accuracy > floor.final_accuracy + 0.25, (result.final_accuracy, floor.final_accuracy)
    assert result.final_accuracy == pytest.approx(clone_accuracy(result.clone, *eval_data))
    assert agreement(result.clone, victim, task["x_test"]) > 0.85 and victim.remaining == 0
    if sampling == "adaptive":
        policy = result.info["policy"]
        assert len(policy) == result.info["num_groups"] and sum(policy) == pytest.approx(1, abs=1e-4)


def test_knockoff_stops_cleanly_when_the_budget_runs_out(task):
    victim = Victim(task["model"], budget=150)
    clone = fresh_clone()
    before = params_of(clone)
    attack = KnockoffNets(victim, clone, batch_size=64, epochs=3, progress=False, seed=0)
    result = attack.run(task["transfer"], num_queries=300, eval_data=(task["x_test"], task["y_test"]))
    assert result.stopped_early and result.queries_used == 150 and victim.remaining == 0
    assert result.iterations == 3  # 64 + 64 + the last 22 queries the victim still answered
    assert result.clone is clone and not torch.equal(params_of(clone), before)  # fitted on the partial set
    assert [q for q, _ in result.history] == [150] * 4 and all(a is not None for _, a in result.history)
    json.dumps(result.summary())


def test_knockoff_hard_labels_and_top1_victims(task):
    top1 = Victim(task["model"], output="top1", budget=100)
    with pytest.raises(ConfigError, match="hard_labels=True"):
        KnockoffNets(top1, fresh_clone(), progress=False)
    result = KnockoffNets(top1, fresh_clone(), hard_labels=True, epochs=1, progress=False).run(
        task["transfer"]
    )
    assert result.queries_used == 100 and result.info["hard_labels"]


def test_gradient_bandit_moves_preference_towards_rewarded_actions():
    preference = torch.zeros(3)
    policy = torch.softmax(preference, dim=0)
    actions, rewards = torch.tensor([0, 1, 0, 2]), torch.tensor([1.0, 0.0, 0.8, 0.2])
    new = gradient_bandit_step(preference, policy, actions, rewards, baseline=0.5, lr=0.4)
    by_hand = torch.zeros(3)
    for a, r in zip(actions.tolist(), rewards.tolist(), strict=True):
        by_hand += 0.4 * (r - 0.5) * (F.one_hot(torch.tensor(a), 3).float() - policy) / 4
    torch.testing.assert_close(new, by_hand)
    assert new[0] > 0 > new[2] and new[0] > new[1]


def test_knockoff_hard_labels_turn_soft_answers_into_one_hot(task):
    victim = Victim(task["model"], budget=20)
    attack = KnockoffNets(victim, fresh_clone(), hard_labels=True, progress=False)
    x = task["transfer"][:10]
    targets = attack.query(x)
    clean = torch.softmax(task["model"](x), dim=1).detach()  # the victim's forward: the same 10 rows
    assert torch.equal(targets, F.one_hot(clean.argmax(1), K).float()) and victim.used == 10


def test_adaptive_sampling_queries_each_image_once_and_masks_empty_groups(task):
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = task["model"]

        def forward(self, x):
            seen.append(x.clone())
            return self.inner(x)

    transfer = task["transfer"][:300]
    groups = (torch.arange(300) % 7 == 0).long()  # group 1 has 43 images and runs dry early
    for budget in (250, 300):
        seen.clear()
        victim = Victim(Recorder(), budget=budget)
        attack = KnockoffNets(
            victim, fresh_clone(), sampling="adaptive", epochs=0, batch_size=32, progress=True, seed=3
        )
        result = attack.run(transfer, transfer_groups=groups)
        queried = torch.cat(seen)
        assert (
            result.queries_used == budget
            and result.iterations == -(-budget // 32)
            and not result.stopped_early
        )
        assert len(torch.unique(queried.flatten(1), dim=0)) == budget  # no image twice
        policy = result.info["policy"]
        assert result.info["num_groups"] == 2 and sum(policy) == pytest.approx(1, abs=1e-4)
        if budget == 250:
            assert policy[1] == 0.0  # the exhausted group is masked out


def test_knockoff_soft_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[0.5, 0.25, 0.25]])
    expected = -(target * torch.log_softmax(logits, 1)).sum()
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected.item())
    hard = F.one_hot(torch.tensor([0]), 3).float()
    assert soft_cross_entropy(logits, hard).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0])).item()
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"sampling": "bandit"}, {"batch_size": 0}, {"epochs": -1}, {"lr": -0.1}, {"optimizer": "rmsprop"}],
    ids=str,
)
def test_knockoff_bad_parameters(task, kwargs):
    with pytest.raises(ConfigError):
        KnockoffNets(Victim(task["model"], budget=10), fresh_clone(), progress=False, **kwargs)


def test_knockoff_bad_run_arguments(task):
    attack = KnockoffNets(Victim(task["model"], budget=10_000), fresh_clone(), progress=False)
    with pytest.raises(ConfigError, match="exceeds the transfer set"):
        attack.run(task["transfer"], num_queries=801)
    with pytest.raises(ConfigError, match="adaptive"):
        attack.run(task["transfer"], transfer_groups=torch.zeros(800, dtype=torch.long))


def test_prepare_transfer_set_converts_dtype_channels_and_size():
    rgb = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    gray = prepare_transfer_set(rgb, (1, 12, 12))
    assert gray.shape == (5, 1, 12, 12) and gray.dtype == torch.float32
    assert 0 <= gray.min() and gray.max() <= 1
    flat = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    torch.testing.assert_close(prepare_transfer_set(flat, (1, 8, 8)), torch.ones(2, 1, 8, 8))
    up = prepare_transfer_set(torch.rand(4, 28, 28), (3, 32, 32))
    assert up.shape == (4, 3, 32, 32) and torch.equal(up[:, 0], up[:, 2])
    with pytest.raises(ConfigError):
        prepare_transfer_set(torch.rand(4, 2, 8, 8), (3, 8, 8))


def test_random_noise_floor_queries_uniform_noise(task):
    seen = []

    def spy(p):
        return p

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return task["model"](x)

    victim = Victim(Recorder(), defense=spy, budget=50)
    result = RandomNoise(victim, fresh_clone(), image_shape=SHAPE, epochs=1, progress=False).run()
    x = torch.cat(seen)
    assert result.queries_used == 50 and x.shape == (50, *SHAPE)
    assert 0.4 < x.mean() < 0.6 and x.min() >= 0 and x.max() <= 1


# --------------------------------------------------------------------------- DFME and MAZE


def small(cls, victim, **kwargs):
    base = {"image_shape": SHAPE, "latent_dim": 8, "batch_size": 8, "progress": False, "seed": 0}
    base.update(kwargs)
    return cls(victim, fresh_clone(), **base)


def test_dfme_query_accounting_is_exact(task):
    victim = Victim(task["model"], budget=10_000)
    attack = small(DFME, victim, num_directions=3, generator_steps=2, clone_steps=3)
    b, m, n_g, n_s = 8, 3, 2, 3
    assert attack.cost_per_iteration == b * (n_g * (m + 1) + n_s) == 88
    result = attack.run(num_queries=5 * 88 + 50)
    assert result.iterations == 5 and not result.stopped_early
    assert result.ledger == {"dfme_generator": 5 * n_g * b * (m + 1), "dfme_clone": 5 * n_s * b}
    assert result.queries_used == victim.used == 5 * 88


def test_maze_query_accounting_reuses_the_unperturbed_answers(task):
    victim = Victim(task["model"], budget=10_000)
    attack = small(MAZE, victim, num_directions=4, clone_steps=3, replay_steps=2, replay_capacity=64)
    b, m, n_s = 8, 4, 3
    assert attack.cost_per_iteration == b * ((m + 1) + n_s - 1) == 56
    steps = []
    fit_step = attack.fit_step
    attack.fit_step = lambda x, y: steps.append(len(x)) or fit_step(x, y)
    result = attack.run(num_queries=4 * 56)
    assert result.iterations == 4 and result.queries_used == victim.used == 4 * 56
    assert len(steps) == 4 * (
        n_s + 2
    )  # the buffer holds >= B pairs after the first clone step: replay every time
    assert attack._replay_size == 64  # 4 x 3 x 8 = 96 pairs seen, the ring buffer keeps 64
    assert result.ledger == {"maze_generator": 4 * b * (m + 1), "maze_clone": 4 * (n_s - 1) * b}
    assert "replay" in result.info["last_losses"]


def test_the_defense_applies_to_every_probe(task):
    rows = []

    def spy(p):
        rows.append(len(p))
        return make_defense("rs", beta=0.3, gamma=0.5)(p)

    victim = Victim(task["model"], defense=spy, budget=10_000)
    small(DFME, victim, num_directions=2).run(num_queries=3 * 8 * (3 + 5))
    assert sum(rows) == victim.used == 3 * 8 * (3 + 5)


@pytest.mark.parametrize("cls", [DFME, MAZE])
def test_zeroth_order_attacks_stop_cleanly_on_budget_exhaustion(task, cls):
    b, m = 8, 2
    victim = Victim(task["model"], budget=10_000)
    attack = small(cls, victim, num_directions=m, clone_steps=3)
    cost = attack.cost_per_iteration
    # budget for two full iterations, then a generator step and one clone step of the third
    partial = (
        b * (m + 1) + b
    )  # MAZE's first clone step reuses answers: its partial step gets one step further
    victim = Victim(task["model"], budget=2 * cost + partial)
    attack = small(cls, victim, num_directions=m, clone_steps=3)
    clone_before = params_of(attack.clone)
    result = attack.run(num_queries=10 * cost, eval_data=(task["x_test"], task["y_test"]), eval_every=1)
    assert isinstance(result, ExtractionResult)
    assert result.stopped_early and result.iterations == 2
    assert result.queries_used == victim.used == 2 * cost + partial and victim.remaining == 0
    assert not torch.equal(params_of(result.clone), clone_before)
    assert result.history[0][0] == 0 and result.history[-1][0] == result.queries_used
    assert all(acc is not None for _, acc in result.history)
    json.dumps(result.summary())


@pytest.mark.parametrize("cls", [DFME, MAZE])
def test_zeroth_order_gradient_estimate_matches_autograd(task, cls):
    # forward differences along m unit directions, scaled by d/m, estimate grad_h mean_i D_i; float64 so
    # that eps = 1e-3 differences are not drowned by rounding
    victim = Victim(copy.deepcopy(task["model"]).double(), budget=10**6)
    attack = small(cls, victim, num_directions=3000, eps=1e-3)
    attack.clone.double()
    h = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    estimate, loss, _, _ = attack.estimate_gradient(h)
    h_ref = h.clone().requires_grad_(True)
    x = (torch.tanh(h_ref) + 1) / 2
    p = torch.softmax(victim.model(x), dim=1)  # the victim's dependence on h is what needs estimating
    true_loss = attack.disagreement(attack.clone.eval()(x), p).mean()
    (true,) = torch.autograd.grad(true_loss, h_ref)
    assert loss.item() == pytest.approx(true_loss.item(), rel=1e-9)
    for e, t in zip(estimate.flatten(1), true.flatten(1), strict=True):
        assert torch.cosine_similarity(e, t, dim=0) > 0.8  # E[cos] ~ sqrt(m / (m + d)) ~ 0.98
        assert (e @ t / (t @ t)).item() == pytest.approx(1.0, abs=0.15)  # unbiased: right sign and scale
    assert victim.used == 2 * 3001


def test_disagreements_dfme_l1_on_mean_corrected_log_probs_and_maze_kl(task):
    p = torch.softmax(torch.randn(5, K, generator=torch.Generator().manual_seed(0)), dim=1)
    log_p = p.log()
    dfme = small(DFME, Victim(task["model"], budget=10))
    # the clone matches the victim when its logits equal the log-probabilities up to the mean
    torch.testing.assert_close(dfme.disagreement(log_p - log_p.mean(1, keepdim=True), p), torch.zeros(5))
    expected = (log_p - (log_p - log_p.mean(1, keepdim=True))).abs().mean(1)
    torch.testing.assert_close(dfme.disagreement(log_p, p), expected)
    logits = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    kl = F.kl_div(F.log_softmax(logits, 1), p, reduction="none").sum(1)
    torch.testing.assert_close(kl_disagreement(logits, p), kl)
    maze = small(MAZE, Victim(task["model"], budget=10))
    torch.testing.assert_close(maze.disagreement(logits, p), kl)
    torch.testing.assert_close(maze.disagreement(log_p + 3.0, p), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [DFME, MAZE])
def test_defense_aware_zeroth_order_is_the_plain_attack_without_a_defense(task, cls):
    """Kerckhoffs' DFME/MAZE fits the answers inverted through the defense; with nothing to see through it is
    exactly the plain attack (so whatever it reaches against a defense is an attacker that works)."""
    runs = []
    for aware in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the default generator's weights come from the global RNG
            attack = small(cls, Victim(task["model"], budget=10_000), num_directions=2, defense_aware=aware)
            result = attack.run(num_queries=3 * attack.cost_per_iteration)
        runs.append(params_of(result.clone))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert result.info["defense_aware"].startswith("not needed")


@pytest.mark.parametrize("cls", [DFME, MAZE])
def test_defense_aware_zeroth_order_fits_the_answers_inverted_through_the_defense(task, cls):
    """Kerckhoffs' DFME/MAZE inverts each answer through the known defense and fits the recovered clean
    probabilities: the clone's targets keep the victim's argmax and lie nearer its clean answers than the
    defended ones do (what the clone-inside-the-defense loss failed: docs/divqat.md)."""
    defense = make_defense("dcp", beta=0.949, gamma=0.2)  # full's calibrated DCP: not monotone at p < 0.045
    attack = small(cls, Victim(task["model"], defense=defense, budget=10_000), defense_aware=True)
    clean = torch.softmax(torch.randn(64, K, generator=torch.Generator().manual_seed(0)) * 1.5, 1)
    clean = clean[clean.max(1).values < 0.9]  # rows where DCP acts
    answers = defense(clean)
    targets = attack.read_answers(answers)
    assert (targets.argmax(1) == clean.argmax(1)).float().mean() >= (answers.argmax(1) == clean.argmax(1)).float().mean()
    assert (targets - clean).abs().sum(1).mean() < 0.8 * (answers - clean).abs().sum(1).mean()
    torch.testing.assert_close(defense(targets), answers, atol=0.05, rtol=0)  # a preimage of the answer
    plain = small(cls, Victim(task["model"], defense=defense, budget=10_000))
    assert plain.read_answers(answers) is answers
    result = attack.run(num_queries=2 * attack.cost_per_iteration)
    assert result.info["defense_aware"].startswith("applied: ")
    assert result.queries_used == 2 * attack.cost_per_iteration


def test_defense_aware_zeroth_order_setting_is_checked(task):
    with pytest.raises(ConfigError, match="defense_aware"):
        small(DFME, Victim(task["model"], budget=1000), defense_aware="yes")


def test_generator_steps_increase_the_disagreement(task):
    # the generator ascends D: after a few zeroth-order steps, fresh samples disagree more than before
    victim = Victim(task["model"], budget=10**6)
    attack = small(DFME, victim, num_directions=20, lr_generator=1e-2, batch_size=32)
    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))

    def mean_disagreement():
        with torch.no_grad():
            x = attack.generator(z)
            return (
                attack.disagreement(attack.clone.eval()(x), torch.softmax(task["model"](x), 1)).mean().item()
            )

    before = mean_disagreement()
    for _ in range(15):
        attack.generator_step()
    assert mean_disagreement() > before * 1.05  # descent (wrong sign) gives ~0.7x, ascent ~1.15x


@pytest.mark.parametrize("output", ["top1", "topk"])
@pytest.mark.parametrize("cls", [DFME, MAZE])
def test_zeroth_order_attacks_need_probabilities(task, cls, output):
    victim = Victim(task["model"], output=output, k=2 if output == "topk" else None, budget=1000)
    with pytest.raises(ConfigError, match="output='probs'"):
        small(cls, victim)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_directions": 0},
        {"eps": 0.0},
        {"batch_size": 1},
        {"clone_steps": 0},
        {"image_shape": (1, 10, 10)},
        {"schedule": "linear"},
    ],
    ids=str,
)
def test_dfme_bad_parameters(task, kwargs):
    with pytest.raises(ConfigError):
        small(DFME, Victim(task["model"], budget=1000), **kwargs)


def test_dfme_budget_smaller_than_one_iteration(task):
    attack = small(DFME, Victim(task["model"], budget=1000))
    with pytest.raises(ConfigError, match="does not cover one DFME iteration"):
        attack.run(num_queries=attack.cost_per_iteration - 1)


def test_generator_sizes_to_the_data():
    for shape in [(1, 28, 28), (3, 32, 32)]:
        g = Generator(shape, latent_dim=16, width=8)
        x = g(torch.randn(4, 16))
        assert x.shape == (4, *shape) and x.min() >= 0 and x.max() <= 1
        h = g(torch.randn(4, 16), pre_activation=True)
        assert h.shape == (4, *shape)


def test_registry_and_metrics(task):
    assert ATTACKS.get("knockoff") is KnockoffNets and ATTACKS.get("dfme") is DFME
    assert ATTACKS.get("maze") is MAZE and ATTACKS.get("noise") is RandomNoise
    model = task["model"]
    assert agreement(model, model, task["x_test"]) == 1.0
    assert clone_accuracy(model, task["x_test"], task["y_test"]) > 0.95
    label_victim = Victim(model, defense="label", budget=1)
    assert agreement(model, label_victim, task["x_test"]) == 1.0 and label_victim.used == 0
