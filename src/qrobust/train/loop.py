"""The one training loop. Methods differ only by the objective passed in (``qrobust.train.objectives``).

Per step: ``loss, stats = objective(model, x, y)`` (under bf16 autocast if asked), a NaN/inf guard,
backward, optimizer step, per-step LR schedule (linear warm-up then cosine to 0, or constant).
Per epoch: evaluation, one row appended to ``metrics.jsonl``, then an atomic checkpoint of model,
optimizer, scheduler, objective state and RNG state. Data order and augmentation are pure functions of
(seed, epoch) (``BatchLoader.set_epoch``), so a run killed mid-way and resumed from its last checkpoint
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qrobust.config import TrainSection
from qrobust.errors import CheckpointError, ConfigError, TrainingDiverged
from qrobust.runs import RunDir
from qrobust.train.objectives import Objective


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    """SGD (Nesterov) or Adam; weight decay on conv/linear weights only (not BatchNorm, not biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainSection, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up over ``warmup_epochs``, then cosine to 0 (or constant)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    loader,
    objective: Objective,
    cfg: TrainSection,
    *,
    run: RunDir | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    stop_after_epoch: int | None = None,
    extra_state: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "",
    log_epochs: bool = True,
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` epochs; resume from ``run``'s checkpoint if it has one.

    ``evaluate(model) -> dict`` is called after each epoch (e.g. test accuracy). ``stop_after_epoch``
    ends the call early (used by tests to simulate a crash). ``extra_state`` is stored in checkpoints
    (e.g. architecture and quantization config, so a checkpoint says what it holds). ``optimizer``
    replaces the one built from ``cfg`` (e.g. an attack that keeps its optimizer's state between fits;
    the schedule still comes from ``cfg``). ``desc`` prefixes the progress bar; ``log_epochs=False``
    keeps the per-epoch summary line out of the log. Returns the metric rows of all epochs so far.

    Device: ``device`` if given, else ``cfg.device`` (auto | cpu | cuda, :func:`resolve_device`); each
    batch is copied there if the loader yields it elsewhere. ``progress`` (default off, as befits a
    library call; the CLI and the studies pass their own setting) shows a tqdm bar and a line per epoch.

    What it changes on the caller's objects (it trains in place; nothing is restored at the end):

    * ``model``: its weights and buffers (the point), its device (moved to the training device), its
      memory format (channels-last when ``cfg.channels_last``, else contiguous: converted in place, and
      kept, so evaluations after training see the layout training used) and its mode (training mode
      on return: call ``model.eval()`` before evaluating);
    * the global torch RNG: consumed by the objective and augmentation, and set from the checkpoint
      when resuming from ``run`` (that is what makes a resumed run equal an uninterrupted one).
    """
    check_loader(loader, cfg)
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    loader = _OnDevice(loader, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    scheduler = make_schedule(optimizer, cfg, len(loader))
    start_epoch, rows = 0, []
    if run is not None and run.has_checkpoint():
        start_epoch = _restore(run, model, optimizer, scheduler, objective)
        rows = [r for r in run.metrics() if r["epoch"] < start_epoch]
        run.write_metrics(rows)
    global_step = start_epoch * len(loader)
    state = _float_state(model)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        state_finite = torch.ones((), dtype=torch.bool, device=device)  # parameters/buffers after the last step
        bar = tqdm(loader, desc=f"{desc}epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False, unit="batch")
        for step, (x, y) in enumerate(bar):
            with torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext():
                loss, stats = objective(model, x, y)
            if not bool(torch.isfinite(loss) & state_finite):  # one host sync for both checks
                _check_state(model, run, cfg, epoch, step, global_step)  # the previous step's update?
                kept = _kept(run, epoch)
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}); "
                    f"{kept}. Lower train.lr (now {cfg.lr}) or the method's weight (e.g. alpha), then re-run."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state_finite = _all_finite(state)  # no sync here: read with the next step's loss check
            global_step += 1
            loss_sum += loss.detach().float() * len(y)
            correct += stats.get("correct", 0)
            seen += len(y)
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"epoch": epoch, "train_loss": float(loss_sum) / max(1, seen),
               "train_acc": float(correct) / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
               "epoch_seconds": time.perf_counter() - t0}
        if not bool(_all_finite(_float_state(model))):  # never evaluate or checkpoint a diverged model
            _check_state(model, run, cfg, epoch, step + 1, global_step)
        if evaluate is not None:
            row.update(evaluate(model))
        rows.append(row)
        if run is not None:
            run.append_metrics(row)
            run.save_checkpoint(_state(model, optimizer, scheduler, objective, epoch + 1, extra_state))
        if progress and log_epochs:
            shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} {shown}")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return rows


def check_loader(loader, cfg: TrainSection) -> None:
    """ConfigError when ``loader`` yields no batch (fewer images than one batch, the partial one dropped):
    training would run 0 steps and report success."""
    if len(loader) > 0:
        return
    images = len(loader.x) if hasattr(loader, "x") else "fewer"
    batch = getattr(loader, "batch_size", cfg.batch_size)
    raise ConfigError(
        f"the training set has {images} images, less than one batch of {batch} (the last, partial "
        "batch is dropped), so no training step would run; lower the batch size (train.batch_size, or the "
        "study's *.batch_size) or train on more images"
    )


def _float_state(model: nn.Module) -> list[torch.Tensor]:
    """The model's non-empty floating-point parameters and buffers (weights, BatchNorm statistics, ranges)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.numel()]
    return list({id(t): t for t in tensors}.values())


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor, True when no entry of ``tensors`` is NaN or inf (max-abs per tensor: fused,
    no overflow, no host sync)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors, math.inf)])).all()


def _kept(run: RunDir | None, epoch: int) -> str:
    if run is not None and run.has_checkpoint():
        return f"the last good checkpoint (end of epoch {epoch}) is kept in {run.checkpoint_path}"
    return "no checkpoint had been written yet"


def _check_state(model: nn.Module, run: RunDir | None, cfg: TrainSection, epoch: int, step: int,
                 global_step: int) -> None:
    """TrainingDiverged naming the parameters/buffers that are NaN/inf after ``step`` of ``epoch``
    (BatchNorm's running variance can overflow while the loss stays finite); returns if there are none."""
    names = [n for n, t in (*model.named_parameters(), *model.named_buffers())
             if t.is_floating_point() and not torch.isfinite(t).all()]
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {step} (global step {global_step}): {shown} became "
        f"NaN/inf (the loss can stay finite meanwhile); {_kept(run, epoch)}. Lower train.lr (now {cfg.lr}) "
        "or lengthen the warm-up, then re-run (with another --out if a checkpoint was kept)."
    )


class _OnDevice:
    """``loader`` with its batches copied to ``device`` (``.to`` returns a batch that is already there
    as it is: no copy, same memory format); every other attribute is the loader's own."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


def _state(model, optimizer, scheduler, objective, epoch, extra_state) -> dict:
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "objective": objective.state_dict(),
        "rng": torch.get_rng_state(),
        **(extra_state or {}),
    }


def _restore(run: RunDir, model, optimizer, scheduler, objective) -> int:
    state = run.load_checkpoint()
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        objective.load_state_dict(state.get("objective", {}))
        torch.set_rng_state(state["rng"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"cannot resume from {run.checkpoint_path}: it does not match this model/config ({str(err)[:300]}); "
            "delete the folder or choose another --out"
        ) from None
    return int(state["epoch"])
