"""Universal adversarial patches (Brown et al. 2017), the attack of the QADT-R patch study.

Papers: T. B. Brown, D. Mane, A. Roy, M. Abadi, J. Gilmer, "Adversarial Patch", arXiv:1712.09665
(2017); used across bit widths by A. Guesmi, B. Ouni, M. Shafique, "Breaking the Limits of
Quantization-Aware Defenses: QADT-R for Robustness Against Patch-Based Adversarial Attacks in QNNs",
arXiv:2503.07058 (2025).

Threat model: the attacker prints one image-independent patch and pastes it anywhere, or anywhere in a
region (``placement = "random"``, ``region``), or at one place (``"fixed"``) on any input; pixels outside
the patch are untouched and there is no norm bound inside it. One :class:`PatchConfig` describes the
patch (shape, size) and where it goes: the same object is used to optimise the patch and to evaluate it. The patch is made white-box on a source model (e.g. the 8-bit twin)
and may be applied to a target model at another bit width (:func:`patch_transfer_matrix`).

Patch operator (Brown et al., "Approach"): a transformation ``t`` (rotation, scale) and a location ``l``
paste patch ``p`` with its shape mask ``m`` onto image ``x``::

    A(p, x, l, t) = (1 - t_l(m)) * x + t_l(m) * t_l(p)

Objective, maximised over ``p in [0, 1]^(C x s x s)`` by Adam on mini-batches, one fresh ``(l, t)``
per image and step (expectation over transformation)::

    targeted   (Brown et al.):  p* = argmax_p  E_{x~X, l~L, t~T} [ log Pr(target | A(p, x, l, t)) ]
    untargeted (our variant):   p* = argmax_p  E_{x~X, l~L, t~T} [ CE(f(A(p, x, l, t)), y) ]

Metric (QADT-R; DESIGN.md, threat model 2): the attack success rate (ASR) is the share of *correctly
classified clean* images that the patch flips (untargeted) or sends to the target class (targeted;
images whose true class is the target are left out, they cannot be "sent" there).

Model convention: an ``nn.Module`` taking inputs in [0, 1] (NCHW) and returning logits. Attacks run the
model in eval mode (batch-norm statistics must not learn from patched images; ``qrobust.utils.eval_mode``)
and restore every module's train/eval flag afterwards; gradients go to the patch only
(``torch.autograd.grad``), never into ``.grad`` of model parameters, and ``requires_grad`` flags are left
alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from qrobust.config import Settings
from qrobust.errors import ConfigError
from qrobust.quant import RandomPrecision, get_bit_width, set_bit_width
from qrobust.registry import PATCH_ATTACKS
from qrobust.utils import eval_mode

SHAPES = ("square", "circle")
PLACEMENTS = ("random", "fixed")
DEFAULT_SEED = 0  # used when no generator is passed, so that results are reproducible by default


ANYWHERE = (0.0, 1.0)  # the region of every valid position


@dataclass
class PatchConfig:
    """Shape, size and placement of a universal patch (one spec for optimising and for evaluating it).

    Args:
        shape: ``"square"`` or ``"circle"`` (a disc inscribed in the square ``s x s`` patch tensor).
        size: fraction of the image AREA the patch covers, in (0, 1] (0.05 = 5% of the pixels, i.e. a
            square of side ``sqrt(0.05 * H * W)``). The side ``s`` is the integer whose mask pixel count
            is closest to ``size * H * W`` (see :func:`patch_mask`); a circle covers at most
            ``pi / 4`` of a square image.
        placement: ``"random"`` (a fresh uniform location per image, the patch fully inside the image,
            its top-left corner in ``region``) or ``"fixed"`` (every image at ``location``).
        location: ``(row, col)`` of the top-left pixel of the (untransformed) patch, for ``"fixed"``;
            ``None`` means the centre of the image. Must be ``None`` for ``"random"``.
        max_rotation: rotations are drawn uniformly from ``[-max_rotation, max_rotation]`` degrees,
            about the patch centre (expectation over transformation; 0 = none).
        scale_range: ``(lo, hi)``; the patch side is multiplied by a factor drawn uniformly from it.
            ``(1, 1)`` = no scaling. With no rotation and no scaling the patch is pasted pixel-exactly
            at integer positions; otherwise it is resampled bilinearly and its mask edge is soft.
        region: ``(lo, hi)``, for ``"random"``: the top-left corner is uniform over the box
            ``[lo, hi] x [lo, hi]`` of the valid positions, as fractions of ``H - s`` and ``W - s``
            (rounded inwards to whole pixels); ``(0, 1)`` = anywhere, ``(0, 0.5)`` = the upper-left part,
            ``(0.75, 1)`` = near the lower-right corner (QADT-R's seen and unseen places). With
            transformations it bounds the patch's bounding box the same way.
    """

    shape: str = "square"
    size: float = 0.05
    placement: str = "random"
    location: tuple[int, int] | None = None
    max_rotation: float = 0.0  # degrees
    scale_range: tuple[float, float] = (1.0, 1.0)  # multiplies the patch side
    region: tuple[float, float] = ANYWHERE  # top-left box of the random placement (fractions)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown patch shape '{self.shape}'; choose one of: {', '.join(SHAPES)}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"unknown patch placement '{self.placement}'; choose one of: {', '.join(PLACEMENTS)}"
            )
        size = float(self.size)
        if not math.isfinite(size) or size <= 0:
            raise ConfigError(
                f"patch size must be a fraction of the image area in (0, 1], got {self.size}; "
                "e.g. size=0.05 covers 5% of the pixels"
            )
        if size > 1:
            raise ConfigError(
                f"patch size {self.size} makes the patch larger than the image: size is a fraction "
                "of the image area, in (0, 1]; e.g. size=0.05 covers 5% of the pixels"
            )
        if self.shape == "circle" and size > math.pi / 4:
            raise ConfigError(
                f"a circle patch of size {self.size} is larger than the image: the largest disc "
                f"that fits covers pi/4 = {math.pi / 4:.3f} of a square image; lower size or use "
                "shape='square'"
            )
        self.size = size
        if self.location is not None:
            if self.placement != "fixed":
                raise ConfigError(
                    "location is only used with placement='fixed'; set placement='fixed' or drop location"
                )
            if len(self.location) != 2:
                raise ConfigError(f"location must be (row, col) in pixels, got {self.location}")
            self.location = (int(self.location[0]), int(self.location[1]))
        if not 0 <= self.max_rotation <= 180:
            raise ConfigError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"scale_range must be (lo, hi) with 0 < lo <= hi, got {self.scale_range}; "
                "(1, 1) means no scaling"
            )
        self.scale_range = (lo, hi)
        if len(self.region) != 2:
            raise ConfigError(f"patch region must be (lo, hi), fractions of the valid top-left positions, got {self.region}")
        lo, hi = (float(v) for v in self.region)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                f"patch region must be (lo, hi) with 0 <= lo <= hi <= 1 (fractions of the valid top-left "
                f"positions), got {self.region}"
            )
        self.region = (lo, hi)
        if self.region != ANYWHERE and self.placement != "random":
            raise ConfigError("a patch region restricts random places; use placement='random' or drop region")

    @property
    def transforms(self) -> bool:
        """Whether patches are rotated or scaled (then they are resampled bilinearly)."""
        return self.max_rotation > 0 or self.scale_range != (1.0, 1.0)

    @property
    def key(self) -> str:
        """``"<shape>@<size>"``, e.g. ``"square@0.08"`` (names the patch made for this spec)."""
        return f"{self.shape}@{self.size:g}"

    def to_dict(self) -> dict:
        """Shape, size and region, plus every other setting that is not its default."""
        out: dict = {"shape": self.shape, "size": self.size, "region": list(self.region)}
        if self.placement != "random":
            out |= {"placement": self.placement, "location": None if self.location is None else list(self.location)}
        if self.max_rotation:
            out["max_rotation"] = self.max_rotation
        if self.scale_range != (1.0, 1.0):
            out["scale_range"] = list(self.scale_range)
        return out

    def locations(self, n: int, image_hw: tuple[int, int], generator: torch.Generator | None) -> Tensor:
        """``[n, 2]`` integer top-left (row, col) positions, uniform over ``region`` (a CPU float64 tensor)."""
        side, _ = patch_mask(self, image_hw)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        first, last = _region_box(self.region, image_hw, side, torch.device("cpu"))
        return _top_left(u, first, last)


def _region_box(region: tuple[float, float], image_hw: tuple[int, int], side: int, device: torch.device):
    """First and last integer top-left (row, col) positions of ``region`` for a patch of ``side`` px."""
    lo, hi = region
    slots = torch.tensor([image_hw[0] - side, image_hw[1] - side], dtype=torch.float64, device=device)
    first, last = torch.ceil(lo * slots), torch.floor(hi * slots)
    return first, torch.maximum(first, last)


def _top_left(u: Tensor, first: Tensor, last: Tensor) -> Tensor:
    """Uniform integer positions in ``[first, last]`` from uniforms ``u`` [n, 2] in [0, 1)."""
    return torch.minimum(first + torch.floor(u * (last - first + 1)), last)


def _shape_mask(shape: str, side: int) -> Tensor:
    if shape == "square":
        return torch.ones(side, side)
    centre = (torch.arange(side, dtype=torch.float64) + 0.5) - side / 2  # pixel centres
    dist2 = centre[:, None] ** 2 + centre[None, :] ** 2
    return (dist2 <= (side / 2) ** 2).float()


def patch_mask(cfg: PatchConfig, image_hw: tuple[int, int]) -> tuple[int, Tensor]:
    """The patch side ``s`` for images of ``image_hw = (H, W)`` and its 0/1 shape mask ``[1, 1, s, s]``.

    ``s`` is chosen so that the number of mask pixels is the closest to ``cfg.size * H * W`` (for a
    circle ``s ~ sqrt(4 size H W / pi)``); it is at least 1. Raises :class:`ConfigError` when the patch
    (times the largest scale) does not fit in the image.
    """
    h, w = (int(v) for v in image_hw)
    target = cfg.size * h * w
    guess = math.sqrt(target if cfg.shape == "square" else 4 * target / math.pi)
    candidates = {max(1, math.floor(guess) + d) for d in (-1, 0, 1, 2)}
    side = min(sorted(candidates), key=lambda s: abs(_shape_mask(cfg.shape, s).sum().item() - target))
    largest = side * cfg.scale_range[1]
    if largest > min(h, w) + 1e-9:
        raise ConfigError(
            f"a {cfg.shape} patch of size {cfg.size} (side {side} px"
            + (f", x{cfg.scale_range[1]:g} scale = {largest:.1f} px" if cfg.scale_range[1] != 1 else "")
            + f") is larger than the {h}x{w} image; lower size or the top of scale_range"
        )
    return side, _shape_mask(cfg.shape, side).view(1, 1, side, side)


class _Placement(NamedTuple):
    centre: Tensor  # [N, 2] (row, col) of the patch centre, in pixels (continuous coordinates)
    angle: Tensor  # [N] radians
    scale: Tensor  # [N] multiplies the side


def _sample_placement(
    cfg: PatchConfig,
    n: int,
    image_hw: tuple[int, int],
    side: int,
    *,
    generator: torch.Generator | None,
    device: torch.device,
    locations: Tensor | None = None,
) -> _Placement:
    """One (l, t) per image. Random numbers come from ``generator`` on its own device, then move; given
    ``locations`` and no transformation, nothing is drawn."""
    h, w = image_hw
    if locations is not None and not cfg.transforms:
        top_left = _given_locations(locations, n, side, h, w, device)
        zeros = torch.zeros(n, dtype=torch.float64, device=device)
        return _Placement(top_left + side / 2, zeros, zeros + 1)
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 4, generator=generator, device=gdev, dtype=torch.float64).to(device)
    max_rad = math.radians(cfg.max_rotation)
    angle = (2 * u[:, 2] - 1) * max_rad
    lo, hi = cfg.scale_range
    scale = lo + (hi - lo) * u[:, 3]
    size_hw = torch.tensor([h, w], dtype=torch.float64, device=device)
    if locations is not None:
        centre = _given_locations(locations, n, side, h, w, device) + side / 2
    elif cfg.placement == "fixed":
        loc = cfg.location if cfg.location is not None else ((h - side) // 2, (w - side) // 2)
        top_left = torch.tensor(loc, dtype=torch.float64, device=device).expand(n, 2)
        _check_inside(top_left, side, h, w)
        centre = top_left + side / 2
    elif not cfg.transforms:
        # Integer top-left, uniform over the region's positions (all (H - s + 1) x (W - s + 1) of them
        # by default): pixel-exact pasting.
        first, last = _region_box(cfg.region, image_hw, side, device)
        centre = _top_left(u[:, :2], first, last) + side / 2
    else:
        # The bounding box of the rotated, scaled patch stays inside the image (centred if it cannot),
        # its corner in the region's share of the room left.
        extent = side * scale * (angle.cos().abs() + angle.sin().abs())
        room = size_hw - extent[:, None]
        lo, hi = cfg.region
        box = torch.where(room >= 0, (lo + u[:, :2] * (hi - lo)) * room, room / 2)
        centre = box + extent[:, None] / 2
    return _Placement(centre, angle, scale)


def _given_locations(locations: Tensor, n: int, side: int, h: int, w: int, device: torch.device) -> Tensor:
    top_left = torch.as_tensor(locations, dtype=torch.float64, device=device).reshape(-1, 2)
    if top_left.shape[0] not in (1, n):
        raise ConfigError(f"locations must be [N, 2] or [2] (row, col), got shape {tuple(locations.shape)}")
    top_left = top_left.expand(n, 2)
    _check_inside(top_left, side, h, w)
    return top_left


def _check_inside(top_left: Tensor, side: int, h: int, w: int) -> None:
    row, col = top_left[:, 0], top_left[:, 1]
    if bool(((row < 0) | (col < 0) | (row > h - side) | (col > w - side)).any()):
        bad = top_left[(row < 0) | (col < 0) | (row > h - side) | (col > w - side)][0].tolist()
        raise ConfigError(
            f"patch location (row, col) = ({bad[0]:g}, {bad[1]:g}) puts the {side}x{side} patch outside "
            f"the {h}x{w} image; the top-left must be within [0, {h - side}] x [0, {w - side}]"
        )


def _paste(
    x: Tensor, patch: Tensor, mask: Tensor, placement: _Placement, exact: bool
) -> tuple[Tensor, Tensor]:
    """Batched ``A(p, x, l, t)``: one ``grid_sample`` maps every image pixel into patch coordinates.

    For image pixel centre ``q`` (row, col) the patch coordinate is ``R(-angle) (q - centre) / scale``,
    normalised by ``s / 2`` to grid_sample's [-1, 1] (align_corners=False). ``exact`` uses nearest
    sampling: with integer placements it copies patch pixels bit for bit.
    """
    n, _, h, w = x.shape
    side = patch.shape[-1]
    # Coordinates in at least float32: half precision cannot address pixels of a 224-px image exactly.
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = torch.arange(h, device=x.device, dtype=torch.float64) + 0.5
    cols = torch.arange(w, device=x.device, dtype=torch.float64) + 0.5
    d_row = rows.view(1, h, 1) - placement.centre[:, 0].view(n, 1, 1)  # [N, H, 1]
    d_col = cols.view(1, 1, w) - placement.centre[:, 1].view(n, 1, 1)  # [N, 1, W]
    cos = placement.angle.cos().view(n, 1, 1)
    sin = placement.angle.sin().view(n, 1, 1)
    k = (2.0 / (side * placement.scale)).view(n, 1, 1)
    gx = (cos * d_col + sin * d_row) * k  # patch column, in [-1, 1] inside the patch
    gy = (-sin * d_col + cos * d_row) * k  # patch row
    grid = torch.stack((gx, gy), dim=-1).to(dtype)  # [N, H, W, 2], (x, y) order
    mode = "nearest" if exact else "bilinear"
    m = F.grid_sample(
        mask.to(device=x.device, dtype=dtype).expand(n, 1, side, side),
        grid,
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )
    # Border padding: the soft mask edge blends with the patch's own edge colour, not with black.
    p = F.grid_sample(
        patch.to(dtype).unsqueeze(0).expand(n, -1, -1, -1),
        grid,
        mode=mode,
        padding_mode="border",
        align_corners=False,
    )
    x_patched = (x.to(dtype) * (1 - m) + p * m).clamp(0, 1)
    return x_patched.to(x.dtype), m.to(x.dtype)


def apply_patch(
    x: Tensor,
    patch: Tensor,
    cfg: PatchConfig,
    *,
    generator: torch.Generator | None = None,
    locations: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Paste ``patch`` [C, s, s] onto every image of ``x`` [N, C, H, W] in [0, 1]: ``A(p, x, l, t)``.

    Placement per ``cfg``: random (one uniform location per image) or fixed, plus a random rotation and
    scale per image when ``cfg`` asks for them, all drawn from ``generator`` (``None`` = the global RNG).
    ``locations`` ([N, 2] or [2], top-left (row, col) in pixels) overrides the location for every image.

    Batched on ``x``'s device (one ``grid_sample``, no per-image loop) and differentiable in ``patch``.
    Returns ``(x_patched, mask_full)``: ``x_patched`` in [0, 1], equal to ``x`` exactly wherever
    ``mask_full`` [N, 1, H, W] is 0; ``mask_full`` is 0/1 unless the patch is rotated or scaled.
    """
    if x.dim() != 4:
        raise ConfigError(f"images must be a [N, C, H, W] batch, got shape {tuple(x.shape)}")
    image_hw = (x.shape[-2], x.shape[-1])
    side, mask = patch_mask(cfg, image_hw)
    _check_patch(patch, side, x.shape[1], cfg, image_hw)
    placement = _sample_placement(
        cfg, x.shape[0], image_hw, side, generator=generator, device=x.device, locations=locations
    )
    exact = not cfg.transforms
    return _paste(x, patch.to(x.dtype), mask, placement, exact)


def _check_patch(
    patch: Tensor, side: int, channels: int, cfg: PatchConfig, image_hw: tuple[int, int]
) -> None:
    if tuple(patch.shape) != (channels, side, side):
        raise ConfigError(
            f"patch has shape {tuple(patch.shape)} but a {cfg.shape} patch of size {cfg.size} on "
            f"{image_hw[0]}x{image_hw[1]} images with {channels} channels must be "
            f"{(channels, side, side)}; make the patch with the same PatchConfig"
        )


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _check_target(target: int | None, num_classes: int) -> None:
    if target is not None and not 0 <= int(target) < num_classes:
        raise ConfigError(
            f"target class {target} is out of range: the model has {num_classes} classes, so use "
            f"0..{num_classes - 1}, or target=None for an untargeted patch"
        )


def train_patch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: PatchConfig,
    *,
    target: int | None = None,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 128,
    init: str | Tensor = "random",
    generator: torch.Generator | None = None,
    model_sampler: Callable[[], nn.Module] | None = None,
    progress: bool = False,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Optimise a universal patch (Brown et al. 2017) on ``model`` over images ``x`` with labels ``y``.

    Each step draws ``batch_size`` images (without replacement) and one placement/transformation per
    image, and takes an Adam step (learning rate ``lr``) on

        targeted:    mean CE(f(A(p, x, l, t)), target)   (minimised = maximise E[log Pr(target | A)])
        untargeted:  -mean CE(f(A(p, x, l, t)), y)       (minimised = push away from the true label)

    The patch lives in [0, 1] and is clamped back there after every step (projected Adam, as ART's
    AdversarialPatchPyTorch does); a tanh parameterisation was not used because it saturates exactly
    at the 0/1 colours optimised patches drift to.

    Args:
        target: class to send images to, or ``None`` for untargeted.
        steps: Adam steps; ``steps=0`` returns the initial patch (the random-patch baseline).
        init: ``"random"`` (uniform in [0, 1]), ``"gray"`` (0.5), or a [C, s, s] tensor to start from.
        generator: drives init, batches and placements; ``None`` = a fresh generator seeded with 0, so
            calls are reproducible by default.
        model_sampler: called with no arguments at every step; returns the model for that step (e.g.
            one network switched to a random bit width, for A-QAPA or an adaptive attack over
            widths). ``None`` = always ``model``. ``model`` still gives the number of classes.
        progress: show a tqdm bar (default off).
        on_step: called as ``on_step(t, patch)`` after step ``t`` (1..steps) with the patch so far
            (detached; e.g. to measure ASR against the number of steps in one run).

    Returns:
        The patch, ``[C, s, s]`` in [0, 1], detached, on ``x``'s device.
    """
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise ConfigError(
            f"need images [N, C, H, W] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if int(steps) < 0 or float(lr) <= 0 or int(batch_size) < 1:
        raise ConfigError(
            f"need steps >= 0, lr > 0, batch_size >= 1; got steps={steps}, lr={lr}, batch_size={batch_size}"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SEED)
    gdev = generator.device
    image_hw = (x.shape[-2], x.shape[-1])
    side, _ = patch_mask(cfg, image_hw)
    channels = x.shape[1]
    n = x.shape[0]
    batch_size = min(int(batch_size), n)

    if isinstance(init, Tensor):
        _check_patch(init, side, channels, cfg, image_hw)
        start = init.detach().to(device=x.device, dtype=x.dtype).clamp(0, 1)
    elif init == "random":
        start = torch.rand(channels, side, side, generator=generator, device=gdev).to(x.device, x.dtype)
    elif init == "gray":
        start = torch.full((channels, side, side), 0.5, device=x.device, dtype=x.dtype)
    else:
        raise ConfigError(f"unknown patch init '{init}'; use 'random', 'gray' or a [C, s, s] tensor")
    patch = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)

    with eval_mode(model):
        _check_target(target, _num_classes(model, x))
        bar = tqdm(range(int(steps)), desc="patch", disable=not progress, leave=False)
        for step in bar:
            net = model_sampler() if model_sampler is not None else model
            idx = torch.randperm(n, generator=generator, device=gdev)[:batch_size].to(x.device)
            xb, yb = x[idx], y[idx]
            x_adv, _ = apply_patch(xb, patch, cfg, generator=generator)
            with eval_mode(net):
                logits = net(x_adv)
            if target is None:
                loss = -F.cross_entropy(logits, yb)
            else:
                loss = F.cross_entropy(logits, torch.full_like(yb, int(target)))
            (grad,) = torch.autograd.grad(loss, patch)
            if step == 0 and not bool(grad.abs().amax() > 0):
                warnings.warn(
                    "the patch gradient is exactly zero at the first step: the model masks gradients "
                    "(rounding or argmax without a straight-through estimator?), so the patch will not "
                    "move; attack a differentiable twin instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
            patch.grad = grad
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            if on_step is not None:
                on_step(step + 1, patch.detach().clone())
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return patch.detach()


def _predict(model: nn.Module, x: Tensor, widths: Tensor | None) -> Tensor:
    """Top-1 predictions; ``widths`` (random precision): row ``i`` at width ``widths[i]`` of the wrapped net."""
    if widths is None:
        return model(x).argmax(1)
    pred = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for bits in widths.unique().tolist():
        rows = widths == bits
        set_bit_width(model.model, int(bits))
        pred[rows] = model.model(x[rows]).argmax(1)
    return pred


@torch.no_grad()
def attack_success_rate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    patch: Tensor,
    cfg: PatchConfig,
    *,
    target: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    draws: int = 1,
    locations: Sequence[Tensor] | None = None,
) -> dict[str, float | int]:
    """ASR of ``patch`` on ``model`` (QADT-R's metric).

    Eligible images are the clean images ``model`` classifies correctly (and, when targeted, whose
    label is not ``target``). Each eligible image gets ``draws`` placements (random per image when
    ``cfg.placement == "random"``, in ``cfg.region``); ASR = successes / (num_eligible * draws), a
    success being a prediction != y (untargeted) or == target (targeted): the expected ASR over
    placements.

    All placements are drawn up front from ``generator`` (``None`` = a fresh generator seeded with 0),
    so the result does not depend on ``batch_size`` and two models evaluated with the same seed see the
    same placements. ``locations`` (one ``[N, 2]`` tensor of top-left (row, col) positions per draw)
    gives the places instead. ``asr`` is NaN when no image is eligible.

    Random precision (:class:`~qrobust.quant.RandomPrecision`, a random width per forward): each image
    gets ONE width, drawn uniformly per image from ``generator`` after the placements, under which both
    its clean and its patched predictions are made (with ``draws > 1`` all its placements too), so a
    flip caused by the width draw alone is never counted as a patch success; the result is the expected
    ASR over widths and placements. The wrapped network is left at the width it had.

    Returns:
        ``{"asr": float, "num_eligible": int, "clean_acc": float}``.
    """
    if int(draws) < 1 or int(batch_size) < 1:
        raise ConfigError(f"need draws >= 1 and batch_size >= 1, got draws={draws}, batch_size={batch_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SEED)
    n = x.shape[0]
    image_hw = (x.shape[-2], x.shape[-1])
    side, mask = patch_mask(cfg, image_hw)
    _check_patch(patch, side, x.shape[1], cfg, image_hw)
    patch = patch.to(device=x.device, dtype=x.dtype)
    y = y.to(x.device)
    if locations is not None and len(locations) != int(draws):
        raise ConfigError(f"locations must hold one [N, 2] tensor per draw: got {len(locations)} for draws={draws}")
    with eval_mode(model):
        if target is not None:
            _check_target(target, _num_classes(model, x))
        placements = [
            _sample_placement(cfg, n, image_hw, side, generator=generator, device=x.device,
                              locations=None if locations is None else locations[d])
            for d in range(draws)
        ]
        widths = None
        if isinstance(model, RandomPrecision):
            gdev = generator.device
            draw = torch.randint(len(model.bit_widths), (n,), generator=generator, device=gdev).to(x.device)
            widths = torch.tensor(model.bit_widths, device=x.device)[draw]
            width_before = get_bit_width(model.model)
        try:
            clean_pred = torch.cat([_predict(model, x[i : i + batch_size], None if widths is None else widths[i : i + batch_size])
                                    for i in range(0, n, batch_size)])
            correct = clean_pred == y
            eligible = correct.clone()
            if target is not None:
                eligible &= y != int(target)
            successes = torch.zeros((), dtype=torch.long, device=x.device)
            for pl in placements:
                for i in range(0, n, batch_size):
                    sl = slice(i, i + batch_size)
                    part = _Placement(pl.centre[sl], pl.angle[sl], pl.scale[sl])
                    x_adv, _ = _paste(x[sl], patch, mask, part, exact=not cfg.transforms)
                    pred = _predict(model, x_adv, None if widths is None else widths[sl])
                    hit = pred != y[sl] if target is None else pred == int(target)
                    successes += (hit & eligible[sl]).sum()
        finally:
            if widths is not None and width_before is not None:
                set_bit_width(model.model, width_before)
    num_eligible = int(eligible.sum())
    asr = successes.item() / (num_eligible * draws) if num_eligible else float("nan")
    return {"asr": asr, "num_eligible": num_eligible, "clean_acc": correct.float().mean().item()}


def patch_transfer_matrix(
    models: Mapping[str, nn.Module | Callable[[], nn.Module]],
    x: Tensor,
    y: Tensor,
    cfg: PatchConfig,
    *,
    train_kwargs: Mapping | None = None,
    x_eval: Tensor | None = None,
    y_eval: Tensor | None = None,
    target: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = 256,
    draws: int = 1,
) -> dict[str, dict[str, float]]:
    """Bit-width transfer of universal patches (QADT-R, transferability tables): ``[src][tgt] = ASR``.

    A patch is trained on each source model (on ``x, y``) with :func:`train_patch` and evaluated on
    every target model (on ``x_eval, y_eval``; default ``x, y``, which is optimistic: prefer a held-out
    split) with :func:`attack_success_rate`.

    ``models`` maps names (e.g. ``"32", "8", "4", "2"``) to ``nn.Module``s or to zero-argument callables
    returning one. A callable is called right before each use (training on it, evaluating on it), so
    one shared network switched between bit widths by the callable works.

    Fairness: every source trains from a fresh generator seeded ``seed`` (same initial patch, batches
    and placements); every evaluation uses a fresh generator seeded ``seed + 1`` (same placements on
    every target). ``train_kwargs`` (steps, lr, batch_size, init, progress, ...) go to
    :func:`train_patch`; seeding goes through ``seed``, not a ``generator`` there.
    """
    train_kwargs = dict(train_kwargs or {})
    for key in ("generator", "target"):
        if key in train_kwargs:
            raise ConfigError(f"pass '{key}' to patch_transfer_matrix itself, not inside train_kwargs")
    x_eval = x if x_eval is None else x_eval
    y_eval = y if y_eval is None else y_eval

    def get(name: str) -> nn.Module:
        entry = models[name]
        return entry if isinstance(entry, nn.Module) else entry()

    matrix: dict[str, dict[str, float]] = {}
    for src in models:
        gen = torch.Generator().manual_seed(seed)
        patch = train_patch(get(src), x, y, cfg, target=target, generator=gen, **train_kwargs)
        matrix[src] = {}
        for tgt in models:
            res = attack_success_rate(
                get(tgt),
                x_eval,
                y_eval,
                patch,
                cfg,
                target=target,
                generator=torch.Generator().manual_seed(seed + 1),
                batch_size=batch_size,
                draws=draws,
            )
            matrix[src][tgt] = res["asr"]
    return matrix


# --------------------------------------------------------------------------------------------------
# The patch family behind one protocol: PATCH_ATTACKS, built by name from a dict of settings
# --------------------------------------------------------------------------------------------------


INITS = ("random", "gray")


@dataclass
class RandomPatchConfig(Settings):
    """Settings of the random-patch baseline (a patch nobody optimised)."""

    init: str = "random"  # the patch: "random" (uniform in [0, 1]) or "gray" (0.5 everywhere)
    target: int | None = None  # class to send images to; None = untargeted (any wrong class)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"unknown patch init '{self.init}'; use one of: {', '.join(INITS)}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)):
            raise ConfigError(f"target must be a class index or None, got {self.target!r}")


@dataclass
class UniversalPatchConfig(RandomPatchConfig):
    """Settings of the universal patch (Brown et al. 2017; :func:`train_patch`)."""

    steps: int = 500  # Adam steps on the patch
    lr: float = 0.05  # Adam's learning rate (the patch lives in [0, 1])
    batch_size: int = 128  # attacker images per step, one placement each

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, low in (("steps", self.steps, 0), ("batch_size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")


@runtime_checkable
class PatchAttack(Protocol):
    """What every attack of :data:`qrobust.registry.PATCH_ATTACKS` provides.

    ``Attack(spec, config=None, **overrides)``: ``spec`` is the :class:`PatchConfig` (or a mapping of it)
    the patch is made for and evaluated with; ``config`` the attack's settings (its ``config_class``, a
    mapping, or None), ``overrides`` single settings. ``fit`` makes ``.patch``; ``evaluate`` gives its ASR.
    """

    name: str
    spec: PatchConfig
    config: RandomPatchConfig
    patch: Tensor | None

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
            model_sampler: Callable[[], nn.Module] | None = None, progress: bool = False) -> Tensor: ...

    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
                 batch_size: int = 256, draws: int = 1) -> dict[str, float | int]: ...


class _PatchAttackBase:
    name = "patch"
    config_class: type[RandomPatchConfig] = RandomPatchConfig

    def __init__(self, spec: PatchConfig | Mapping, config: RandomPatchConfig | Mapping | None = None,
                 **overrides):
        self.spec = spec if isinstance(spec, PatchConfig) else PatchConfig(**spec)
        self.config = self.config_class.build(config, **overrides)
        self.patch: Tensor | None = None

    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
                 batch_size: int = 256, draws: int = 1, locations: Sequence[Tensor] | None = None,
                 ) -> dict[str, float | int]:
        """:func:`attack_success_rate` of ``.patch`` on ``model`` (images ``x``, labels ``y``)."""
        if self.patch is None:
            raise ConfigError("no patch yet: call fit(model, x, y) before evaluate")
        return attack_success_rate(model, x, y, self.patch, self.spec, target=self.config.target,
                                   generator=generator, batch_size=batch_size, draws=draws, locations=locations)


@PATCH_ATTACKS.register("random")
class RandomPatch(_PatchAttackBase):
    """The baseline: a patch nobody optimised (uniform noise or gray), drawn from ``generator``."""

    name = "random"
    config_class = RandomPatchConfig

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
            model_sampler: Callable[[], nn.Module] | None = None, progress: bool = False) -> Tensor:
        """The initial patch of :func:`train_patch` (0 steps): the same draw as a universal patch's start."""
        self.patch = train_patch(model, x, y, self.spec, target=self.config.target, steps=0,
                                 init=self.config.init, generator=generator, progress=False)
        return self.patch


@PATCH_ATTACKS.register("universal")
class UniversalPatch(_PatchAttackBase):
    """The universal adversarial patch (Brown et al. 2017) optimised by :func:`train_patch`."""

    name = "universal"
    config_class = UniversalPatchConfig
    config: UniversalPatchConfig

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
            model_sampler: Callable[[], nn.Module] | None = None, progress: bool = False) -> Tensor:
        c = self.config
        self.patch = train_patch(model, x, y, self.spec, target=c.target, steps=c.steps, lr=c.lr,
                                 batch_size=c.batch_size, init=c.init, generator=generator,
                                 model_sampler=model_sampler, progress=progress)
        return self.patch


def make_patch_attack(name: str, spec: PatchConfig | Mapping, **settings) -> PatchAttack:
    """The patch attack registered as ``name`` (``"universal"``, ``"random"``) for ``spec``, with
    ``settings`` (its config's names; an unknown one is a ConfigError listing the valid ones)."""
    return PATCH_ATTACKS.get(name)(spec, None, **settings)
