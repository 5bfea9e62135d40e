"""Patch defenses (PBAT, DWQ, QADT-R parts): they train with the one loop, DBWT switches widths,
switchable BN keeps per-width statistics, GIR decorrelates input gradients, state resumes, bad input."""

import copy

import pytest
import torch

from qrobust.attacks.patch import PatchConfig, attack_success_rate, patch_mask
from qrobust.config import TrainSection
from qrobust.data import BatchLoader, load_dataset
from qrobust.defenses.patch_training import DWQ, PBAT, QADTR, gir_penalty, input_gradient_cosine
from qrobust.errors import ConfigError
from qrobust.metrics import accuracy
from qrobust.models import QNet, _convnet
from qrobust.quant import (
    ActQuant,
    BitWidthSchedule,
    RandomPrecision,
    SwitchableBatchNorm2d,
    check_bit_width,
    get_bit_width,
    make_switchable_bn,
    quantize,
    set_bit_width,
)
from qrobust.runs import RunDir, safe_load
from qrobust.train.loop import fit

SPEC = PatchConfig("square", 0.08, region=(0.0, 0.6))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_train=256, num_test=128, size=16)


def tiny(info, seed=0, bits=8, widths=None):
    torch.manual_seed(seed)
    model = QNet("convnet", _convnet(info.channels, info.num_classes, info.image_size, width=8), info.mean, info.std)
    model = quantize(model)
    set_bit_width(model, bits)
    return make_switchable_bn(model, widths) if widths else model


def loader(data, seed=0):
    return BatchLoader(data.train_x, data.train_y, 64, shuffle=True, info=data.info, drop_last=True, seed=seed)


CFG = TrainSection(epochs=3, batch_size=64, lr=0.05, warmup_epochs=0.0, channels_last=False)


# ------------------------------------------------------------------ each objective trains a tiny model
OBJECTIVES = {
    "pbat": lambda: (PBAT(specs=[SPEC], patch_steps=1), None),
    "dwq": lambda: (DWQ(bit_widths=(2, 4, 8), adversary="fgsm"), (2, 4, 8)),
    "aqapa": lambda: (QADTR(dbwt=False, gir=False, sizes=(0.06, 0.08), patch_steps=1), None),
    "aqapa+dbwt": lambda: (QADTR(gir=False, sizes=(0.06, 0.08), patch_steps=1), None),
    "qadtr": lambda: (QADTR(sizes=(0.06, 0.08), patch_steps=1), None),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_trains_a_tiny_model_with_the_one_loop(data, name):
    objective, widths = OBJECTIVES[name]()
    model = tiny(data.info, widths=widths)
    chance = 1 / data.info.num_classes  # 0.1: "above chance" is far below what a working loop reaches
    rows = fit(model, loader(data), objective, CFG, progress=False)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    set_bit_width(model, 8)
    assert accuracy(model, data.test_x, data.test_y) > max(0.8, chance)
    assert all(m.enabled for m in model.modules() if isinstance(m, ActQuant))  # PBAT's float view undone


# ------------------------------------------------------------------ DBWT
def _widths_seen(objective, model, data, steps=6):
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(get_bit_width(m)))
    x, y = next(iter(loader(data)))
    for _ in range(steps):
        seen.clear()
        objective(model, x, y)[0].backward()
        yield seen[-1]  # the width of the training forward (the last one of the step)


def test_dbwt_cycles_the_bit_width_across_steps(data):
    model = tiny(data.info)
    widths = list(_widths_seen(QADTR(aqapa=False, dbwt=True, gir=False, bit_widths=(2, 4, 8)), model, data))
    assert widths == [2, 4, 8, 2, 4, 8]


def test_dbwt_random_mode_visits_several_widths_and_off_means_fixed(data):
    widths = list(_widths_seen(QADTR(aqapa=False, gir=False, dbwt_mode="random", seed=3), tiny(data.info), data, 12))
    assert set(widths) == {2, 4, 8}
    fixed = list(_widths_seen(QADTR(aqapa=False, dbwt=False, gir=False), tiny(data.info, bits=4), data, 4))
    assert fixed == [4, 4, 4, 4]


def test_schedule_is_a_function_of_seed_and_step():
    a = [BitWidthSchedule((2, 4, 8), "random", seed=1)(t) for t in range(20)]
    assert a == [BitWidthSchedule((2, 4, 8), "random", seed=1)(t) for t in range(20)]
    assert a != [BitWidthSchedule((2, 4, 8), "random", seed=2)(t) for t in range(20)]


def test_aqapa_makes_patches_at_the_quantized_widths(data):
    model = tiny(data.info)
    gen_widths = []
    orig = QADTR._patched_batch

    def spy(self, m, spec, x, y):
        gen_widths.append(get_bit_width(m))
        return orig(self, m, spec, x, y)

    objective = QADTR(dbwt=False, gir=False, patch_steps=1, seed=0)
    objective._patched_batch = spy.__get__(objective)
    x, y = next(iter(loader(data)))
    for _ in range(9):
        objective(model, x, y)
    assert set(gen_widths) == {2, 4, 8}  # made inside the quantized model at several widths
    assert get_bit_width(model) == 8  # ... while training stays at the model's own width


def test_aqapa_size_schedule_grows_when_the_model_resists(data):
    objective = QADTR(dbwt=False, gir=False, sizes=(0.04, 0.06, 0.08), asr_low=0.99, asr_high=1.0,
                      asr_momentum=0.0, patch_steps=1)
    model = tiny(data.info)
    x, y = next(iter(loader(data)))
    assert objective.level == 1
    for _ in range(3):
        objective(model, x, y)
    assert objective.level == 2 and objective.level_history[-1] == 2
    shrink = QADTR(dbwt=False, gir=False, sizes=(0.04, 0.06, 0.08), asr_low=0.0, asr_high=0.001,
                   asr_momentum=0.0, patch_steps=1)
    for _ in range(3):
        shrink(model, x, torch.roll(y, 1))  # wrong labels: the patched images always count as fooled
    assert shrink.level == 0


# ------------------------------------------------------------------ switchable BN (DWQ)
def test_switchable_bn_keeps_separate_statistics_per_width(data):
    model = tiny(data.info, widths=(2, 4, 8))
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert bns and all(bn.bit_widths == (2, 4, 8) for bn in bns)
    first = bns[0]
    before = {b: first.per_bits[str(b)].running_mean.clone() for b in (2, 4, 8)}
    x = data.train_x[:32].float() / 255
    model.train()
    set_bit_width(model, 4)
    model(x)
    after = {b: first.per_bits[str(b)].running_mean for b in (2, 4, 8)}
    assert not torch.equal(after[4], before[4])
    assert torch.equal(after[2], before[2]) and torch.equal(after[8], before[8])
    set_bit_width(model, 2)
    model(x * 0.5)
    assert not torch.equal(first.per_bits["2"].running_mean, before[2])
    assert not torch.equal(first.per_bits["2"].running_mean, first.per_bits["4"].running_mean)


def test_switchable_bn_state_dict_has_one_bn_per_width(data):
    keys = tiny(data.info, widths=(4, 8)).state_dict().keys()
    assert any(".per_bits.4.running_mean" in k for k in keys) and any(".per_bits.8.weight" in k for k in keys)


@pytest.mark.parametrize("bits", [3, 6])
def test_width_not_in_the_models_set_is_refused(data, bits):
    model = tiny(data.info, widths=(2, 4, 8))
    with pytest.raises(ConfigError, match="bit width .* not in the model's set"):
        set_bit_width(model, bits)
    with pytest.raises(ConfigError, match="not in the model's set"):
        check_bit_width(tiny(data.info, widths=(2, 4, 8)), bits)
    with pytest.raises(ConfigError, match="not in the model's set"):
        RandomPrecision(tiny(data.info, widths=(2, 4, 8)), (4, bits))


def test_random_precision_draws_a_width_per_forward(data):
    model = tiny(data.info, widths=(2, 4, 8)).train()
    model(data.train_x[:16].float() / 255)  # activation ranges
    rp = RandomPrecision(model, (2, 4, 8), generator=torch.Generator().manual_seed(0)).eval()
    drawn = set()
    for _ in range(20):
        rp(data.test_x[:4].float() / 255)
        drawn.add(rp.last_bits)
        assert get_bit_width(model) == rp.last_bits
    assert drawn == {2, 4, 8}


def test_dwq_refuses_a_shared_batchnorm(data):
    x, y = next(iter(loader(data)))
    with pytest.raises(ConfigError, match="make_switchable_bn"):
        DWQ(bit_widths=(2, 4, 8))(tiny(data.info), x, y)
    DWQ(bit_widths=(2, 4, 8), require_switchable_bn=False)(tiny(data.info), x, y)  # allowed when asked for


# ------------------------------------------------------------------ GIR
def test_gir_penalty_is_differentiable_in_the_weights(data):
    model = tiny(data.info).train()
    x, y = data.train_x[:32].float() / 255, data.train_y[:32]
    model(x)
    penalty, logits = gir_penalty(model, x, y, 8, 2)
    assert -1 <= float(penalty.detach()) <= 1 and logits.shape == (32, data.info.num_classes)
    penalty.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert get_bit_width(model) == 8


def test_gir_lowers_the_input_gradient_cosine_between_widths(data):
    cosines = {}
    x, y = data.test_x[:128].float() / 255, data.test_y[:128]
    for weight in (0.0, 5.0):
        model = tiny(data.info, seed=1)
        objective = QADTR(aqapa=False, dbwt=True, gir=True, gir_weight=weight, bit_widths=(2, 8))
        fit(model, loader(data), objective, CFG, progress=False)
        cosines[weight] = input_gradient_cosine(model, x, y, 8, 2)
    assert cosines[5.0] < cosines[0.0] - 0.1, cosines


@pytest.mark.parametrize("widths", [None, (2, 8)], ids=["shared-bn", "switchable-bn"])
def test_gir_extra_forward_leaves_batchnorm_statistics_and_ranges_untouched(data, widths):
    x, y = data.train_x[:32].float() / 255, data.train_y[:32]
    model = tiny(data.info, widths=widths).train()
    model(x)  # activation ranges and BN statistics exist
    reference = copy.deepcopy(model)
    set_bit_width(reference, 8)
    reference(x)  # one plain training forward at the trained width: all the statistics may see
    gir_penalty(model, x, y, 8, 2)
    # same kernels, same shapes as the reference's forward: the statistics agree exactly
    for (name, got), (_, want) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(got, want), name
    before = {k: v.clone() for k, v in model.named_buffers()}
    gir_penalty(model, x, y, 8, 2, update_statistics=False)  # QADT-R's sub-batch estimate: no update at all
    gir_penalty(model, x, y, None, None, sigma=0.1, generator=torch.Generator().manual_seed(0),
                update_statistics=False)  # gir_mode="noise"
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    set_bit_width(model, 2)
    model(x)  # what the old second forward did: the 2-bit activations move the statistics
    assert any(not torch.equal(v, before[k]) for k, v in model.named_buffers())


def test_random_precision_asr_takes_clean_and_patched_predictions_at_one_width_per_image(data):
    model = tiny(data.info, widths=(2, 8)).train()
    model(data.train_x[:64].float() / 255)
    model.eval()
    spec = PatchConfig("square", 0.1, placement="fixed", location=(0, 0))
    side, _ = patch_mask(spec, (16, 16))
    x = data.test_x[:128].float() / 255
    x[:, :, :side, :side] = 0.0  # the patch pastes zeros there: every patched image IS its clean image
    patch = torch.zeros(data.info.channels, side, side)
    with torch.no_grad():
        set_bit_width(model, 8)
        at8 = model(x).argmax(1)
        set_bit_width(model, 2)
        at2 = model(x).argmax(1)
    assert (at2 != at8).any()  # the widths disagree: a second width draw for the patched images would flip
    rp = RandomPrecision(model, (2, 8), generator=torch.Generator().manual_seed(0))
    res = attack_success_rate(rp, x, at8, patch, spec, draws=3, batch_size=16)
    assert res["asr"] == 0.0  # a patch that changes nothing succeeds nowhere
    assert 0 < res["num_eligible"] < 128  # images drawn at 2 bits where the widths disagree are not eligible
    assert get_bit_width(model) == 2  # the wrapped network is left at its width


# ------------------------------------------------------------------ patches: places and ASR
def test_patch_spec_locations_stay_in_the_region():
    spec = PatchConfig("square", 0.1, region=(0.75, 1.0))
    locs = spec.locations(500, (28, 28), torch.Generator().manual_seed(0))
    side = 9  # round(sqrt(0.1 * 784)) = 9
    assert locs.min() >= 0.75 * (28 - side) - 1e-9 and locs.max() <= 28 - side
    seen = PatchConfig("square", 0.1, region=(0.0, 0.5)).locations(500, (28, 28), torch.Generator().manual_seed(0))
    assert seen.max() <= 0.5 * (28 - side)


def test_asr_counts_only_clean_correct_images_and_is_a_rate(data):
    model = tiny(data.info).train()
    x, y = data.test_x[:64].float() / 255, data.test_y[:64]
    model(x)
    model.eval()
    patch = torch.rand(1, 5, 5)
    spec = PatchConfig("square", 0.1)
    res = attack_success_rate(model, x, y, patch, spec)
    # eligible = correct when clean, from the forward attack_success_rate itself runs (64 rows, this memory
    # format): a quantized model's logits tie often, so another batching or kernel could flip an argmax
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    assert res["num_eligible"] == int((clean_pred == y).sum()) > 0
    assert res["clean_acc"] == pytest.approx(res["num_eligible"] / 64)
    assert res["asr"] != res["asr"] or 0 <= res["asr"] <= 1
    wrong = (clean_pred + 1) % data.info.num_classes  # nothing classified correctly
    assert attack_success_rate(model, x, wrong, patch, spec)["num_eligible"] == 0


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("make", [lambda: PBAT(specs=[SPEC], patch_steps=1), lambda: QADTR(patch_steps=1, gir=False)])
def test_objective_state_round_trips_through_a_checkpoint(data, tmp_path, make):
    model = tiny(data.info)
    objective = make()
    x, y = next(iter(loader(data)))
    for _ in range(3):
        objective(model, x, y)
    assert objective.patches
    torch.save(objective.state_dict(), tmp_path / "s.pt")
    restored = make()
    restored.load_state_dict(safe_load(tmp_path / "s.pt"))
    assert restored.step == objective.step and restored.patches.keys() == objective.patches.keys()
    for key, value in objective.patches.items():
        assert torch.equal(restored.patches[key], value)
    twin = tiny(data.info)
    twin.load_state_dict(model.state_dict())
    objective(model, x, y)
    restored(twin, x, y)
    for key, value in objective.patches.items():  # the next step makes the same patch (same batch, kernels)
        assert torch.equal(restored.patches[key], value)


def test_fit_resumes_a_patch_defense_exactly(data, tmp_path):
    def run(stop=None, path=tmp_path / "a", seed=0):
        model = tiny(data.info, seed=seed)
        objective = QADTR(patch_steps=1, gir=False)
        fit(model, loader(data), objective, CFG, run=RunDir(path, {"t": 1}), progress=False,
            stop_after_epoch=stop)
        return model, objective

    straight, obj1 = run(path=tmp_path / "straight")
    run(stop=1)
    resumed, obj2 = run(seed=5)  # another init: everything must come from the checkpoint
    for key, value in straight.state_dict().items():  # exact: resumed = uninterrupted, same batches
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert obj1.step == obj2.step and all(torch.equal(obj1.patches[k], obj2.patches[k]) for k in obj1.patches)


def test_foreign_state_is_a_config_error():
    with pytest.raises(ConfigError, match="another objective"):
        PBAT(specs=[SPEC]).load_state_dict({"step": 1})


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PBAT(specs=[SPEC], fraction=0), "fraction"),
        (lambda: PBAT(specs=[SPEC], patch_steps=0), "patch_steps"),
        (lambda: PBAT(specs=[SPEC], patch_lr=-1), "patch_lr"),
        (lambda: PBAT(specs=[], patch_steps=1), "specs is empty"),
        (lambda: PBAT(specs=[SPEC], generate_on="gpu"), "generate_on"),
        (lambda: PatchConfig("square", 0.1, region=(0.8, 0.2)), "region"),
        (lambda: PatchConfig("square", 0.1, placement="fixed", region=(0.0, 0.5)), "region"),
        (lambda: QADTR(bit_widths=()), "empty"),
        (lambda: QADTR(bit_widths=(2, 9)), "from 2 to 8"),
        (lambda: QADTR(dbwt_mode="zigzag"), "schedule"),
        (lambda: QADTR(gir_mode="magic"), "gir_mode"),
        (lambda: QADTR(bit_widths=(4,)), "at least two bit widths"),
        (lambda: QADTR(asr_low=0.7, asr_high=0.3), "asr_low"),
        (lambda: QADTR(sizes=()), "at least one shape and one size"),
        (lambda: QADTR(gir_batch=-1), "gir_batch"),
        (lambda: DWQ(adversary="cw"), "adversary"),
        (lambda: DWQ(eps=0), "eps"),
        (lambda: QADTR(gir_wieght=1.0), "QADTRConfig has no setting gir_wieght; its settings: fraction"),
        (lambda: PBAT({"specs": [SPEC], "fraction": 0.5, "magic": 1}), "no setting magic"),
        (lambda: make_switchable_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), (2, 4)), "quantize"),
    ],
)
def test_bad_settings_raise_config_error(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_objectives_are_built_from_a_config_object_a_mapping_or_keywords():
    from qrobust.defenses.patch_training import QADTRConfig

    settings = QADTRConfig(dbwt=False, gir=False, sizes=(0.1, 0.06), patch_steps=3)
    for objective in (QADTR(settings), QADTR({"dbwt": False, "gir": False, "sizes": [0.06, 0.1], "patch_steps": 3}),
                      QADTR(dbwt=False, gir=False, sizes=(0.06, 0.1), patch_steps=3)):
        assert objective.settings == settings and objective.sizes == (0.06, 0.1)
        assert objective.config()["name"] == "qadtr" and objective.config()["sizes"] == [0.06, 0.1]
    assert QADTR(settings, patch_steps=1).settings.patch_steps == 1  # keywords override the config object
    assert PBAT(specs=[SPEC]).config()["specs"] == [{"shape": "square", "size": 0.08, "region": [0.0, 0.6]}]


def test_qadtr_refuses_a_float_model(data):
    model = QNet("convnet", _convnet(1, 10, (16, 16), width=8), (0.5,), (0.25,))
    x, y = next(iter(loader(data)))
    with pytest.raises(ConfigError, match="quantize"):
        QADTR()(model, x, y)
