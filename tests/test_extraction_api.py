"""The extraction family's shape: config objects, the registry, one run() protocol, budget-scaled schedules,
and the speed settings (memory format, precision) leaving the caller's modules as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qrobust.checks as checks
from qrobust.attacks.extraction.base import ExtractionAttack, ExtractionConfig, make_extraction_attack
from qrobust.attacks.extraction.dfme import (
    DFME,
    DFMEConfig,
    Generator,
    ZerothOrderConfig,
    lr_factor,
    make_schedules,
)
from qrobust.attacks.extraction.knockoff import (
    DefenseAwareKnockoffNets,
    KnockoffConfig,
    KnockoffNets,
    NoiseConfig,
    RandomNoise,
)
from qrobust.attacks.extraction.maze import MAZE, MAZEConfig
from qrobust.attacks.extraction.metrics import ExtractionResult
from qrobust.attacks.extraction.victim import Victim
from qrobust.errors import ConfigError
from qrobust.registry import EXTRACTION

SHAPE = (1, 8, 8)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear: enough to train, small enough for many runs."""

    def __init__(self, seed: int = 0, classes: int = 4):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).amax(dim=(2, 3)))


@pytest.fixture(scope="module")
def victim_model():
    return Tiny(0).eval()


def small_settings(**extra):
    return {"image_shape": SHAPE, "latent_dim": 4, "generator_width": 2, "batch_size": 4, **extra}


# --------------------------------------------------------------------------- configs


def test_configs_list_each_setting_once_with_the_papers_defaults():
    dfme, maze = DFMEConfig(), MAZEConfig()
    assert (dfme.batch_size, dfme.num_directions, dfme.clone_steps, dfme.generator_optimizer) == (256, 1, 5, "adam")
    assert dfme.generator_weight_decay == 0.0  # DFME's reference: Adam without weight decay for the generator
    assert (maze.batch_size, maze.num_directions, maze.replay_steps, maze.generator_optimizer) == (128, 10, 10, "sgd")
    assert maze.generator_weight_decay == 5e-4 and maze.schedule == "cosine" and maze.reuse_probe_answers
    assert dfme.cost_per_iteration == 256 * (1 * 2 + 5) and maze.cost_per_iteration == 128 * (11 + 5 - 1)
    assert set(MAZEConfig.setting_names()) == set(DFMEConfig.setting_names())  # the same frame, other defaults
    assert issubclass(DFMEConfig, ZerothOrderConfig) and issubclass(NoiseConfig, KnockoffConfig)
    assert KnockoffConfig().defense_aware is False and DefenseAwareKnockoffNets.config_class().defense_aware


@pytest.mark.parametrize("cls,bad,message", [
    (DFMEConfig, {"batch_size": 1}, "batch_size must be an integer >= 2"),
    (DFMEConfig, {"eps": 0}, "eps must be a number > 0"),
    (DFMEConfig, {"schedule": "linear"}, "schedule must be one of multistep, cosine, none"),
    (DFMEConfig, {"precision": "fp16"}, "precision must be one of fp32, bf16"),
    (DFMEConfig, {"image_shape": (28, 28)}, r"image_shape must be \(C, H, W\)"),
    (MAZEConfig, {"replay_capacity": 10}, "replay_capacity must be an integer >= 128"),
    (KnockoffConfig, {"sampling": "bandit"}, "sampling must be one of random, adaptive"),
    (KnockoffConfig, {"defense_aware": 1}, "defense_aware must be true or false"),
    (KnockoffConfig, {"lr": -0.1}, "lr must be a number > 0"),
    (NoiseConfig, {"sampling": "adaptive"}, "samples at random"),
    (ExtractionConfig, {"seed": -1}, "seed must be an integer >= 0"),
], ids=str)
def test_configs_refuse_bad_settings_with_a_fix(cls, bad, message):
    with pytest.raises(ConfigError, match=message):
        cls(**bad)


def test_config_build_takes_an_instance_a_mapping_or_nothing_plus_overrides():
    base = DFMEConfig(batch_size=32)
    assert DFMEConfig.build(base, seed=3) == DFMEConfig(batch_size=32, seed=3)
    assert DFMEConfig.build({"batch_size": 32}, seed=3) == DFMEConfig(batch_size=32, seed=3)
    assert DFMEConfig.build(None) == DFMEConfig()
    with pytest.raises(ConfigError, match="has no setting bach_size; its settings: progress, seed"):
        DFMEConfig.build(None, bach_size=3)
    with pytest.raises(ConfigError, match="config must be a MAZEConfig"):
        MAZEConfig.build(DFMEConfig())


def test_validators_are_one_public_module():
    assert checks.check_int("n", 3, 1) == 3 and checks.check_int("n", torch.tensor(3).item(), 1) == 3
    for bad in (True, 2.0, 0):
        with pytest.raises(ConfigError, match="n must be an integer >= 1"):
            checks.check_int("n", bad, 1)
    assert checks.check_positive("lr", 1) == 1.0
    for bad in (0, float("nan"), False, "1"):
        with pytest.raises(ConfigError, match="lr must be a number > 0"):
            checks.check_positive("lr", bad)


# --------------------------------------------------------------------------- registry and protocol


def test_every_extraction_attack_is_registered_with_its_config():
    assert {"knockoff", "knockoff-adaptive", "noise", "dfme", "maze"} <= set(EXTRACTION.names())
    for name in EXTRACTION.names():
        cls = EXTRACTION.get(name)
        assert issubclass(cls.config_class, ExtractionConfig) and cls.name == name


def test_make_extraction_attack_builds_by_name_from_settings(victim_model):
    victim = Victim(victim_model, budget=10_000)
    transfer = torch.rand(64, *SHAPE)
    attacks = {
        "dfme": make_extraction_attack("dfme", victim, Tiny(1), **small_settings(), seed=0),
        "maze": make_extraction_attack("maze", victim, Tiny(1), **small_settings(replay_capacity=16), seed=0),
        "knockoff": make_extraction_attack("knockoff", victim, Tiny(1), transfer_set=transfer, epochs=1, seed=0),
        "knockoff-adaptive": make_extraction_attack("knockoff-adaptive", victim, Tiny(1), transfer_set=transfer,
                                                    epochs=1, seed=0),
        "noise": make_extraction_attack("noise", victim, Tiny(1), image_shape=SHAPE, epochs=1, seed=0),
    }
    assert isinstance(attacks["dfme"], DFME) and attacks["dfme"].config == DFMEConfig(**small_settings(), seed=0)
    assert isinstance(attacks["maze"], MAZE) and isinstance(attacks["noise"], RandomNoise)
    assert attacks["knockoff-adaptive"].config.defense_aware and not attacks["knockoff"].config.defense_aware
    x_test, y_test = torch.rand(20, *SHAPE), torch.randint(0, 4, (20,))
    for name, attack in attacks.items():
        assert isinstance(attack, ExtractionAttack)
        used = victim.used
        result = attack.run(50 if "knockoff" in name or name == "noise" else 200, eval_data=(x_test, y_test),
                            eval_every=1)  # one call shape for the family
        assert isinstance(result, ExtractionResult) and result.queries_used == victim.used - used > 0, name
        assert len(result.history) >= 2 and all(a is not None for _, a in result.history), name
    with pytest.raises(ConfigError, match="no setting bach_size; it takes: .*batch_size.*generator"):
        make_extraction_attack("dfme", victim, Tiny(1), bach_size=3)
    with pytest.raises(ConfigError, match="unknown extraction attack 'dfmee'; choose one of"):
        make_extraction_attack("dfmee", victim, Tiny(1))


def test_knockoff_takes_the_transfer_set_at_construction_or_at_run(victim_model):
    transfer = torch.rand(64, *SHAPE)
    runs = []
    for how in ("constructor", "keyword", "old positional"):
        victim = Victim(victim_model, budget=40)
        if how == "constructor":
            result = KnockoffNets(victim, Tiny(1), epochs=1, seed=0, transfer_set=transfer).run(40)
        elif how == "keyword":
            result = KnockoffNets(victim, Tiny(1), epochs=1, seed=0).run(num_queries=40, transfer_set=transfer)
        else:
            result = KnockoffNets(victim, Tiny(1), epochs=1, seed=0).run(transfer, num_queries=40)
        runs.append(result)
    assert all(r.queries_used == 40 for r in runs)
    assert runs[0].final_accuracy is None and runs[0].history == runs[1].history == runs[2].history
    with pytest.raises(ConfigError, match="needs a transfer set"):
        KnockoffNets(Victim(victim_model, budget=40), Tiny(1)).run(10)


def test_knockoff_eval_every_thins_the_history(victim_model):
    transfer = torch.rand(64, *SHAPE)
    eval_data = (torch.rand(10, *SHAPE), torch.randint(0, 4, (10,)))
    result = KnockoffNets(Victim(victim_model, budget=40), Tiny(1), epochs=5, seed=0,
                          transfer_set=transfer).run(40, eval_data, eval_every=2)
    assert len(result.history) == 1 + 3  # after querying, after epochs 2 and 4, at the end (epoch 5)


def test_the_noise_floor_reads_the_image_shape_from_the_victim_model(victim_model):
    model = Tiny(0).eval()
    model.input_shape = SHAPE  # as qrobust's model builders set it
    result = RandomNoise(Victim(model, budget=20), Tiny(1), epochs=1).run()
    assert result.queries_used == 20
    with pytest.raises(ConfigError, match=r"image_shape is needed"):
        RandomNoise(Victim(victim_model, budget=20), Tiny(1))


# --------------------------------------------------------------------------- schedules scale with the budget


@pytest.mark.parametrize("iterations", [3, 10, 50, 5000])
def test_multistep_schedule_steps_at_the_same_fractions_of_any_budget(iterations):
    factors = [lr_factor("multistep", s, iterations) for s in range(iterations + 1)]
    milestones = sorted({max(1, int(f * iterations)) for f in (0.1, 0.3, 0.5)})
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.3 ** len(milestones))
    changes = [s for s in range(1, iterations + 1) if factors[s] != factors[s - 1]]
    assert changes == milestones
    if iterations >= 50:  # the fractions hold to one iteration
        assert [c / iterations for c in changes] == pytest.approx([0.1, 0.3, 0.5], abs=1 / iterations)


@pytest.mark.parametrize("iterations", [3, 10, 5000])
def test_cosine_schedule_ends_at_zero_whatever_the_budget(iterations):
    factors = [lr_factor("cosine", s, iterations) for s in range(iterations + 1)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.0, abs=1e-12)
    if iterations % 2 == 0:
        assert factors[iterations // 2] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_make_schedules_follow_lr_factor_on_real_optimizers():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    (schedule,) = make_schedules([opt], "multistep", 5000)
    lrs = []
    for _ in range(5000):
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[498] == pytest.approx(0.1) and lrs[499] == pytest.approx(0.03)  # step 500 = 10 %
    assert lrs[-1] == pytest.approx(0.1 * 0.3**3)


@pytest.mark.parametrize("cls,schedule", [(DFME, "multistep"), (MAZE, "cosine")])
@pytest.mark.parametrize("budget_iterations", [2, 12])
def test_an_attack_plans_its_schedule_from_the_query_budget(victim_model, cls, schedule, budget_iterations):
    victim = Victim(victim_model, budget=10**6)
    attack = cls(victim, Tiny(1), **small_settings(replay_capacity=16), schedule=schedule, seed=0)
    seen = []
    fit_step = attack.fit_step

    def record(x, y):
        seen.append(attack.opt_clone.param_groups[0]["lr"])
        return fit_step(x, y)

    attack.fit_step = record
    result = attack.run(budget_iterations * attack.cost_per_iteration + 3)  # the 3 extra queries buy nothing
    assert result.info["planned_iterations"] == result.iterations == budget_iterations
    per_iteration = len(seen) // budget_iterations
    lr0 = attack.config.lr_clone
    expected = [lr0 * lr_factor(schedule, i, budget_iterations) for i in range(budget_iterations)]
    assert seen[::per_iteration] == pytest.approx(expected)
    final = attack.opt_clone.param_groups[0]["lr"]
    assert final == pytest.approx(lr0 * lr_factor(schedule, budget_iterations, budget_iterations))


# --------------------------------------------------------------------------- speed settings


def test_zeroth_order_run_leaves_the_callers_memory_format_and_bf16_trains(victim_model):
    clone, generator = Tiny(1), Generator(SHAPE, latent_dim=4, width=2)
    before = {n: p.is_contiguous() for n, p in clone.named_parameters()}
    for precision in ("fp32", "bf16"):
        victim = Victim(victim_model, budget=10**4)
        attack = DFME(victim, clone, generator=generator, **small_settings(), precision=precision, seed=0)
        start = [p.detach().clone() for p in clone.parameters()]
        result = attack.run(3 * attack.cost_per_iteration)
        assert result.iterations == 3 and result.queries_used == victim.used
        assert all(torch.isfinite(p).all() for p in clone.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(start, clone.parameters(), strict=True))
        assert {n: p.is_contiguous() for n, p in clone.named_parameters()} == before
        assert all(p.dtype == torch.float32 for p in [*clone.parameters(), *generator.parameters()])
        assert set(result.info["seconds"]) == {"attack", "eval"}
