"""Universal adversarial patch (Brown et al. 2017): placement, masks, ASR accounting, real attack."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.patch import (
    PatchAttack,
    PatchConfig,
    UniversalPatch,
    apply_patch,
    attack_success_rate,
    make_patch_attack,
    patch_mask,
    patch_transfer_matrix,
    train_patch,
)
from qrobust.errors import ConfigError
from qrobust.registry import PATCH_ATTACKS


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_patch(cfg: PatchConfig, hw: tuple[int, int], channels: int = 3, seed: int = 0) -> torch.Tensor:
    side, _ = patch_mask(cfg, hw)
    return torch.rand(channels, side, side, generator=gen(seed))


# ---------------------------------------------------------------- a tiny CNN on synthetic stripes
def stripes(n: int, g: torch.Generator, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes: horizontal, vertical, diagonal stripes with a random phase, plus pixel noise."""
    y = torch.randint(0, 3, (n,), generator=g)
    r = torch.arange(hw, dtype=torch.float32)
    rr, cc = torch.meshgrid(r, r, indexing="ij")
    coord = torch.stack([rr, cc, rr + cc])[y]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    img = (0.5 + 0.3 * torch.sin(1.2 * coord + phase)).unsqueeze(1).expand(n, 3, hw, hw)
    return (img + 0.1 * torch.randn(n, 3, hw, hw, generator=g)).clamp(0, 1), y


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode, train x, train y, test x, test y); about 2 s on one core."""
    torch.manual_seed(0)
    g = gen(0)
    x, y = stripes(768, g)
    xt, yt = stripes(256, g)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
    assert (net(xt).argmax(1) == yt).float().mean() > 0.9
    return net, x, y, xt, yt


# ---------------------------------------------------------------- masks and placement
def test_circle_mask_covers_size_fraction_of_area():
    for size in (0.02, 0.05, 0.1, 0.3, 0.7):
        side, mask = patch_mask(PatchConfig(shape="circle", size=size), (32, 32))
        assert mask.shape == (1, 1, side, side)
        assert abs(mask.sum().item() / 1024 - size) < 0.01, size
        assert mask[0, 0, 0, 0] == 0 and mask[0, 0, side // 2, side // 2] == 1  # a disc, not a square
    side, mask = patch_mask(PatchConfig(shape="square", size=0.1), (32, 32))
    assert mask.sum().item() == side * side and abs(side * side / 1024 - 0.1) < 0.01


@pytest.mark.parametrize(
    "cfg",
    [
        PatchConfig(shape="square", size=0.1),
        PatchConfig(shape="circle", size=0.1, placement="fixed", location=(2, 20)),
        PatchConfig(shape="circle", size=0.1, max_rotation=45, scale_range=(0.7, 1.3)),
        PatchConfig(shape="square", size=0.2, max_rotation=180),
    ],
    ids=["square-random", "circle-fixed", "circle-eot", "square-rot180"],
)
def test_only_patch_region_changes_and_values_stay_in_unit_interval(cfg):
    x = torch.rand(16, 3, 24, 32, generator=gen(1))
    patch = random_patch(cfg, (24, 32))
    x_adv, mask_full = apply_patch(x, patch, cfg, generator=gen(2))
    assert mask_full.shape == (16, 1, 24, 32)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    outside = (mask_full == 0).expand_as(x)
    assert torch.equal(x_adv[outside], x[outside])
    changed = (x_adv != x).any(1)  # [N, H, W]
    assert changed.sum() > 0.9 * (mask_full > 0).sum()  # the patch is really there
    if not cfg.transforms:  # pixel-exact pasting: the mask is 0/1 with exactly the patch's pixel count
        _, mask = patch_mask(cfg, (24, 32))
        assert set(mask_full.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask_full.sum((1, 2, 3)), mask.sum().expand(16))


def test_patch_pixels_are_pasted_exactly_at_fixed_location():
    cfg = PatchConfig(size=0.05, placement="fixed", location=(3, 5))
    x = torch.rand(4, 3, 32, 32, generator=gen(1))
    side, _ = patch_mask(cfg, (32, 32))
    patch = random_patch(cfg, (32, 32))
    x_adv, mask_full = apply_patch(x, patch, cfg)
    assert torch.equal(x_adv[:, :, 3 : 3 + side, 5 : 5 + side], patch.expand(4, -1, -1, -1))
    assert mask_full[:, :, 3 : 3 + side, 5 : 5 + side].all() and mask_full.sum() == 4 * side * side
    # location=None with fixed placement means the centre of the image
    centred, mask_c = apply_patch(x, patch, PatchConfig(size=0.05, placement="fixed"))
    r, c = (32 - side) // 2, (32 - side) // 2
    assert torch.equal(centred[:, :, r : r + side, c : c + side], patch.expand(4, -1, -1, -1))
    assert mask_c.sum() == 4 * side * side
    # explicit per-image locations override the config
    locs = torch.tensor([[0, 0], [1, 2], [10, 0], [32 - side, 32 - side]])
    x_adv, _ = apply_patch(x, patch, cfg, locations=locs)
    for i, (r, c) in enumerate(locs.tolist()):
        assert torch.equal(x_adv[i, :, r : r + side, c : c + side], patch)


def test_random_placements_differ_across_images_and_are_reproducible():
    cfg = PatchConfig(size=0.05)
    patch = torch.ones(1, *patch_mask(cfg, (32, 32))[1].shape[-2:])
    x = torch.zeros(32, 1, 32, 32)
    _, m1 = apply_patch(x, patch, cfg, generator=gen(7))
    _, m2 = apply_patch(x, patch, cfg, generator=gen(7))
    _, m3 = apply_patch(x, patch, cfg, generator=gen(8))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    top_left = {tuple(m[0].nonzero()[0].tolist()) for m in m1}
    assert len(top_left) >= 24  # 32 images, 26 x 26 possible places: almost all distinct


def test_patch_gradient_reaches_every_patch_pixel_through_rotation():
    cfg = PatchConfig(size=0.2, max_rotation=30, scale_range=(0.9, 1.1))
    patch = random_patch(cfg, (16, 16)).requires_grad_(True)
    x_adv, _ = apply_patch(torch.rand(64, 3, 16, 16, generator=gen(1)), patch, cfg, generator=gen(2))
    (grad,) = torch.autograd.grad(x_adv.sum(), patch)
    assert (grad > 0).float().mean() > 0.9


# ---------------------------------------------------------------- ASR accounting with a known oracle
TARGET = 2


class Oracle(nn.Module):
    """Predicts the class written in the centre pixel ((c + 1) / 10), except that a white patch
    (any pixel > 0.95) turns the prediction into TARGET unless pixel (7, 7) marks the image robust."""

    def forward(self, x):
        patched = x.amax((1, 2, 3)) > 0.95
        robust = x[:, 0, 7, 7] < 0.07
        clean = torch.round(x[:, 0, 4, 4] * 10 - 1).long()
        pred = torch.where(patched & ~robust, torch.full_like(clean, TARGET), clean)
        return F.one_hot(pred, 4).float() * 10


def oracle_data():
    #          (label, class written in the image, robust)
    rows = [
        (0, 0, False),  # correct; patch -> 2: flipped, sent to target
        (1, 1, True),  # correct; patch has no effect
        (2, 2, False),  # correct, label == target: patch -> 2 is no flip; not eligible when targeted
        (2, 2, True),  # correct, label == target
        (3, 3, False),  # correct; flipped, sent to target
        (3, 3, True),  # correct; no effect
        (0, 1, False),  # MISclassified; patch -> 2 would look like a success
        (1, 3, True),  # MISclassified; prediction 3 != label would look like an untargeted success
    ]
    x = torch.zeros(len(rows), 1, 8, 8)
    for i, (_, c, robust) in enumerate(rows):
        x[i] = (c + 1) / 10
        if robust:
            x[i, 0, 7, 7] = 0.05
    y = torch.tensor([r[0] for r in rows])
    return x, y


PATCH_CFG = PatchConfig(size=4 / 64, placement="fixed", location=(0, 0))  # a white 2x2 corner


def test_asr_counts_only_correctly_classified_clean_images():
    x, y = oracle_data()
    res = attack_success_rate(Oracle(), x, y, torch.ones(1, 2, 2), PATCH_CFG)
    assert res["clean_acc"] == 0.75
    assert res["num_eligible"] == 6
    assert res["asr"] == pytest.approx(2 / 6)  # rows 0 and 4; counting rows 6, 7 would give 4/8


def test_targeted_asr_excludes_images_whose_label_is_the_target():
    x, y = oracle_data()
    res = attack_success_rate(Oracle(), x, y, torch.ones(1, 2, 2), PATCH_CFG, target=TARGET)
    assert res["num_eligible"] == 4  # rows 0, 1, 4, 5
    assert res["asr"] == pytest.approx(2 / 4)  # keeping rows 2, 3 would give 4/6
    assert res["clean_acc"] == 0.75


def test_asr_is_nan_when_nothing_is_eligible():
    x, _ = oracle_data()
    wrong = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])  # no row is correctly classified
    res = attack_success_rate(Oracle(), x, wrong, torch.ones(1, 2, 2), PATCH_CFG)
    assert res["num_eligible"] == 0 and math.isnan(res["asr"]) and res["clean_acc"] == 0


# ---------------------------------------------------------------- the real attack
@pytest.mark.parametrize("target", [None, 0], ids=["untargeted", "targeted"])
def test_trained_patch_beats_random_patch_of_same_size(trained, target):
    net, x, y, xt, yt = trained
    cfg = PatchConfig(size=0.3)
    patch = train_patch(net, x, y, cfg, target=target, steps=100, lr=0.1, batch_size=64, progress=False)
    baseline = train_patch(net, x, y, cfg, target=target, steps=0, progress=False)  # the random init
    assert patch.shape == baseline.shape == (3, 9, 9)
    asr = attack_success_rate(net, xt, yt, patch, cfg, target=target, generator=gen(5))["asr"]
    asr_random = attack_success_rate(net, xt, yt, baseline, cfg, target=target, generator=gen(5))["asr"]
    assert asr > 0.4 and asr > asr_random + 0.3, (asr, asr_random)


def test_patch_trained_with_rotation_and_scale_works_under_them(trained):
    net, x, y, xt, yt = trained
    cfg = PatchConfig(shape="circle", size=0.3, max_rotation=30, scale_range=(0.9, 1.1))
    patch = train_patch(net, x, y, cfg, target=1, steps=100, lr=0.1, batch_size=64, progress=False)
    asr = attack_success_rate(net, xt, yt, patch, cfg, target=1, draws=2)["asr"]
    asr_random = attack_success_rate(net, xt, yt, random_patch(cfg, (16, 16)), cfg, target=1, draws=2)["asr"]
    assert asr > 0.4 and asr > asr_random + 0.3, (asr, asr_random)


def test_asr_is_reproducible_and_independent_of_batch_size(trained, per_sample):
    net, _, _, xt, yt = trained
    net = per_sample(net)  # each image alone: batches of 7 and 256 meet the same kernels, so exact
    cfg = PatchConfig(size=0.3, max_rotation=20)
    patch = random_patch(cfg, (16, 16), seed=3) ** 4  # dark-ish: flips some images, not all
    runs = [
        attack_success_rate(net, xt, yt, patch, cfg, generator=gen(9), batch_size=bs, draws=3)
        for bs in (256, 256, 7)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert 0 < runs[0]["asr"] < 1


def test_patch_stays_in_unit_interval_under_large_steps(trained):
    net, x, y, _, _ = trained
    cfg = PatchConfig(size=0.1)
    patch = train_patch(net, x, y, cfg, steps=3, lr=2.0, batch_size=32, progress=False)
    assert patch.min() >= 0 and patch.max() <= 1
    assert ((patch == 0) | (patch == 1)).float().mean() > 0.3  # the clamp was needed


def test_model_flags_params_and_grads_unchanged():
    torch.manual_seed(0)
    net = small_cnn().train()
    net[0].weight.requires_grad_(False)
    net[4].eval()  # a mixed-mode model must come back mixed (batch norm net[1] stays in train mode)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    x, y = stripes(32, gen(0))
    cfg = PatchConfig(size=0.2)
    patch = train_patch(net, x, y, cfg, steps=2, batch_size=16, progress=False)
    attack_success_rate(net, x, y, patch, cfg)
    patch_transfer_matrix({"a": net}, x, y, cfg, train_kwargs={"steps": 1, "progress": False})
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # batch-norm statistics did not learn from patched images
        assert torch.equal(v, before[k]), k


def test_model_sampler_gives_the_model_of_every_step(trained):
    net, x, y, _, _ = trained
    calls = []
    other = copy.deepcopy(net).train()

    def sampler():
        calls.append(len(calls))
        return net if len(calls) % 2 else other

    train_patch(
        net, x, y, PatchConfig(size=0.1), steps=4, batch_size=8, model_sampler=sampler, progress=False
    )
    assert calls == [0, 1, 2, 3]
    assert other.training and not net.training  # sampled models get their mode back too


def test_zero_gradient_model_warns():
    class Rounded(nn.Module):  # rounding without a straight-through estimator masks gradients
        def forward(self, x):
            return torch.round(x.mean((2, 3)) * 4) * torch.ones(1, 3)

    x, y = torch.rand(8, 3, 8, 8, generator=gen(0)), torch.zeros(8, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="gradient is exactly zero"):
        train_patch(Rounded(), x, y, PatchConfig(size=0.1), steps=1, progress=False)


# ---------------------------------------------------------------- transfer matrix
class Switchable(nn.Module):
    """One network whose behaviour a caller switches, like a model switched between bit widths."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.mode = "plain"

    def forward(self, x):
        x = 1 - x if self.mode == "inverted" else x
        return self.net(x)


def test_transfer_matrix_with_switch_callables_equals_separate_models(trained):
    net, x, y, xt, yt = trained
    cfg = PatchConfig(size=0.3)
    kw = {"steps": 20, "lr": 0.1, "batch_size": 32, "progress": False}
    shared = Switchable(net)

    def switch(mode):
        def f():
            shared.mode = mode
            return shared

        return f

    plain, inverted = Switchable(net), Switchable(net)
    inverted.mode = "inverted"
    args = dict(x_eval=xt[:96], y_eval=yt[:96], target=2, seed=4)
    via_callables = patch_transfer_matrix(
        {"plain": switch("plain"), "inverted": switch("inverted")}, x, y, cfg, train_kwargs=kw, **args
    )
    via_modules = patch_transfer_matrix(
        {"plain": plain, "inverted": inverted}, x, y, cfg, train_kwargs=kw, **args
    )
    assert via_callables == via_modules  # exact: the same network, batches and seeds in both
    assert list(via_modules) == ["plain", "inverted"] and list(via_modules["plain"]) == ["plain", "inverted"]
    # each entry is train on the source, evaluate on the target, with the documented seeds
    patch = train_patch(inverted, x, y, cfg, target=2, generator=gen(4), **kw)
    expected = attack_success_rate(plain, xt[:96], yt[:96], patch, cfg, target=2, generator=gen(5))["asr"]
    assert via_modules["inverted"]["plain"] == expected
    # the two "bit widths" really differ: their own patch works better than the other's
    assert via_modules["plain"]["plain"] > via_modules["inverted"]["plain"]


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 0.0}, "size must be a fraction"),
        ({"size": -0.1}, "size must be a fraction"),
        ({"size": 1.5}, "larger than the image"),
        ({"shape": "circle", "size": 0.9}, "larger than the image"),
        ({"shape": "triangle"}, "unknown patch shape 'triangle'; choose one of: square, circle"),
        ({"placement": "corner"}, "unknown patch placement"),
        ({"location": (1, 2)}, "placement='fixed'"),
        ({"max_rotation": -5}, "max_rotation"),
        ({"scale_range": (1.2, 0.8)}, "scale_range"),
    ],
)
def test_bad_config_raises_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchConfig(**kwargs)


def test_patch_larger_than_image_for_this_image_raises():
    with pytest.raises(ConfigError, match=r"larger than the 8x32 image"):
        patch_mask(PatchConfig(size=0.5), (8, 32))  # 128 px -> side 11 > 8 rows
    with pytest.raises(ConfigError, match="scale_range"):
        patch_mask(PatchConfig(size=0.5, scale_range=(1.0, 1.5)), (32, 32))
    cfg = PatchConfig(size=0.1, placement="fixed", location=(30, 0))
    with pytest.raises(ConfigError, match="outside the 32x32 image"):
        apply_patch(torch.rand(1, 3, 32, 32), random_patch(cfg, (32, 32)), cfg)
    with pytest.raises(ConfigError, match="make the patch with the same PatchConfig"):
        apply_patch(torch.rand(1, 3, 32, 32), torch.rand(3, 4, 4), cfg)


@pytest.mark.parametrize("target", [-1, 3])
def test_target_out_of_range_raises(trained, target):
    net, x, y, _, _ = trained
    cfg = PatchConfig(size=0.1)
    with pytest.raises(ConfigError, match=r"out of range: the model has 3 classes, so use 0\.\.2"):
        train_patch(net, x, y, cfg, target=target, steps=1, progress=False)
    with pytest.raises(ConfigError, match="out of range"):
        attack_success_rate(net, x, y, random_patch(cfg, (16, 16)), cfg, target=target)


def test_patch_attacks_are_built_by_name_from_a_dict_of_settings(trained):
    net, x, y, xt, yt = trained
    attack = make_patch_attack("universal", {"size": 0.3}, target=0, steps=60, lr=0.1, batch_size=64)
    assert isinstance(attack, UniversalPatch) and isinstance(attack, PatchAttack)
    assert PATCH_ATTACKS.get("universal") is UniversalPatch and attack.config.steps == 60
    with pytest.raises(ConfigError, match="call fit"):
        attack.evaluate(net, xt, yt)
    attack.fit(net, x, y, progress=False)
    assert attack.evaluate(net, xt, yt)["asr"] > 0.5
    # the random baseline is the universal patch's starting point (the same draw), not optimised
    baseline = make_patch_attack("random", attack.spec, target=0)
    assert isinstance(baseline, PatchAttack)
    start = train_patch(net, x, y, attack.spec, target=0, steps=0, generator=gen(3))
    assert torch.equal(baseline.fit(net, x, y, generator=gen(3)), start)
    assert baseline.evaluate(net, xt, yt)["asr"] < 0.5


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("universal", {"stpes": 10}, "UniversalPatchConfig has no setting stpes; its settings: init, target, steps"),
        ("random", {"steps": 10}, "RandomPatchConfig has no setting steps"),
        ("universal", {"steps": -1}, "steps must be a whole number >= 0"),
        ("universal", {"lr": 0}, "lr must be a number > 0"),
        ("universal", {"init": "zeros"}, "unknown patch init"),
        ("adversarial", {}, "unknown patch attack 'adversarial'; choose one of: random, universal"),
    ],
)
def test_bad_patch_attack_settings_are_config_errors(name, settings, message):
    with pytest.raises(ConfigError, match=message):
        make_patch_attack(name, PatchConfig(size=0.1), **settings)


def test_on_step_sees_every_step_and_does_not_change_the_patch(trained):
    net, x, y, _, _ = trained
    cfg = PatchConfig(size=0.2)
    seen: dict[int, torch.Tensor] = {}
    patch = train_patch(net, x, y, cfg, steps=5, batch_size=32, generator=gen(1),
                        on_step=lambda t, p: seen.__setitem__(t, p))
    assert list(seen) == [1, 2, 3, 4, 5] and torch.equal(seen[5], patch)
    assert not torch.equal(seen[1], seen[5])  # snapshots, not the live tensor
    assert torch.equal(patch, train_patch(net, x, y, cfg, steps=5, batch_size=32, generator=gen(1)))
