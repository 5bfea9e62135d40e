"""The training loop: learns, resumes exactly, stops on NaN keeping the last good checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.config import TrainSection
from qrobust.data import BatchLoader
from qrobust.errors import ConfigError, TrainingDiverged
from qrobust.metrics import accuracy
from qrobust.models import model_for_data
from qrobust.quant import quantize
from qrobust.runs import RunDir
from qrobust.train.loop import fit
from qrobust.train.objectives import CrossEntropy, Objective


def _setup(synthetic, epochs=3, seed=0, **train):
    torch.manual_seed(seed)
    model = model_for_data("convnet", synthetic.info)
    loader = BatchLoader(synthetic.train_x, synthetic.train_y, 64, shuffle=True, augment=True,
                         info=synthetic.info, drop_last=True, seed=seed)
    cfg = TrainSection(epochs=epochs, batch_size=64, lr=0.05, **train)
    return model, loader, cfg


def test_fit_learns_the_synthetic_task(synthetic):
    model, loader, cfg = _setup(synthetic)
    before = accuracy(model, synthetic.test_x, synthetic.test_y)
    rows = fit(model, loader, CrossEntropy(), cfg, progress=False)
    after = accuracy(model, synthetic.test_x, synthetic.test_y)
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert after > 0.8 and after > before + 0.3


def test_qat_fit_learns_too(synthetic):
    model, loader, cfg = _setup(synthetic)
    qmodel = quantize(model)
    fit(qmodel, loader, CrossEntropy(), cfg, progress=False)
    assert accuracy(qmodel, synthetic.test_x, synthetic.test_y) > 0.8


def test_resume_after_a_crash_gives_the_same_weights(synthetic, tmp_path):
    model, loader, cfg = _setup(synthetic)
    fit(model, loader, CrossEntropy(), cfg, progress=False)
    straight = model.state_dict()

    config = {"test": "resume"}
    model2, loader2, _ = _setup(synthetic)
    rows = fit(model2, loader2, CrossEntropy(), cfg, run=RunDir(tmp_path, config), progress=False, stop_after_epoch=1)
    assert len(rows) == 1  # "crashed" after epoch 1
    model3, loader3, _ = _setup(synthetic, seed=123)  # a fresh process: other init, restored from checkpoint
    loader3.seed = 0
    run = RunDir(tmp_path, config)
    rows = fit(model3, loader3, CrossEntropy(), cfg, run=run, progress=False)
    assert [r["epoch"] for r in run.metrics()] == [0, 1, 2]
    # exact: the resumed run repeats the uninterrupted one's batches on the same kernels and shapes
    for key, value in straight.items():
        assert torch.equal(value, model3.state_dict()[key]), key


class _NaNAfter(Objective):
    def __init__(self, bad_step):
        self.bad_step, self.calls = bad_step, 0

    def __call__(self, model, x, y):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return (loss * float("nan") if self.calls >= self.bad_step else loss), {}


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(synthetic, tmp_path):
    model, loader, cfg = _setup(synthetic)
    run = RunDir(tmp_path, {"test": "nan"})
    steps_per_epoch = len(loader)
    with pytest.raises(TrainingDiverged) as err:
        fit(model, loader, _NaNAfter(steps_per_epoch + 3), cfg, run=run, progress=False)
    message = str(err.value)
    assert "epoch 2, step 3" in message and "last good checkpoint (end of epoch 1)" in message
    assert run.load_checkpoint()["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in run.load_checkpoint()["model"].values() if v.is_floating_point())


def test_bf16_autocast_option_trains(synthetic):
    model, loader, cfg = _setup(synthetic, epochs=1, bf16=True)
    rows = fit(model, loader, CrossEntropy(), cfg, progress=False)
    assert rows[0]["train_loss"] == rows[0]["train_loss"]  # finite, not NaN


def test_tensor_loader_covers_every_row_once_per_epoch_and_is_seeded():
    from qrobust.data import TensorLoader

    x = torch.arange(11, dtype=torch.float32).view(11, 1)
    y = torch.arange(11)
    loader = TensorLoader(x, y, 5, seed=3)
    assert len(loader) == 2  # 5 + 5; the trailing single row is dropped (BatchNorm cannot train on it)
    loader.set_epoch(0)
    first = torch.cat([xb for xb, _ in loader]).flatten()
    assert len(first) == 10 and len(set(first.tolist())) == 10
    loader.set_epoch(0)
    assert torch.equal(torch.cat([xb for xb, _ in loader]).flatten(), first)
    second = torch.cat([xb for xb, _ in loader]).flatten()  # epoch 1: another order
    assert not torch.equal(second, first)
    for xb, yb in loader:
        assert torch.equal(xb.flatten().long(), yb)  # rows stay paired with their targets
    with pytest.raises(ConfigError, match="one target row per input"):
        TensorLoader(x, y[:3], 5)


def test_soft_target_ce_matches_kl_gradient_and_counts_argmax_agreement():
    from qrobust.train.objectives import SoftTargetCrossEntropy

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, t = torch.randn(8, 4), torch.softmax(torch.randn(8, 3), dim=1)
    loss, stats = SoftTargetCrossEntropy()(model, x, t)
    (g_ce,) = torch.autograd.grad(loss, model.weight)
    kl = F.kl_div(F.log_softmax(model(x), dim=1), t, reduction="batchmean")
    (g_kl,) = torch.autograd.grad(kl, model.weight)
    assert torch.allclose(g_ce, g_kl, atol=1e-6)
    assert int(stats["correct"]) == int((model(x).argmax(1) == t.argmax(1)).sum())


def test_fit_trains_with_a_given_optimizer_and_keeps_its_state():
    from qrobust.data import TensorLoader
    from qrobust.train.objectives import SoftTargetCrossEntropy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(64, 4)
    t = F.one_hot((x[:, 0] > 0).long() + (x[:, 1] > 0).long(), 3).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    cfg = TrainSection(epochs=5, batch_size=16, schedule="constant", warmup_epochs=0.0, channels_last=False)
    rows = fit(model, TensorLoader(x, t, 16), SoftTargetCrossEntropy(), cfg, optimizer=opt, progress=False)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert opt.state and all("momentum_buffer" in s for s in opt.state.values())  # this optimizer stepped
    assert opt.param_groups[0]["lr"] == 0.5  # constant schedule leaves the given LR alone
