"""Failures that used to be silent or tracebacks (issue 10, section 3): each is now one clear line (exit 2)
or correct behaviour. Tiny synthetic data throughout."""

import importlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from qrobust.cli import main, study_folder_name
from qrobust.config import RunConfig, load_config
from qrobust.data import BatchLoader
from qrobust.defenses.output import DefenseAccuracyWarning, calibrate_defense, make_defense
from qrobust.errors import CheckpointError, ConfigError, RunFolderError, TrainingDiverged
from qrobust.models import model_for_data
from qrobust.runs import RunDir, safe_load
from qrobust.train.loop import fit
from qrobust.train.objectives import CrossEntropy, Objective

FAST = ["data.name=synthetic", "train.epochs=1", "train.batch_size=64", "--no-progress"]


def _one_line_error(capsys, argv, *fragments):
    """``qrobust argv`` exits 2 with one line on stderr holding every fragment and no traceback."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert re.search(fragment, err), (fragment, err)
    return err


# --------------------------------------------------------------------------- divergence


class _BufferOverflowAt(Objective):
    """Cross-entropy whose ``bad_call``-th call makes a BatchNorm running variance inf, as an exploding
    learning rate does, while the loss it returns stays finite (BatchNorm normalises the activations)."""

    def __init__(self, bad_call):
        self.bad_call, self.calls = bad_call, 0

    def __call__(self, model, x, y):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if self.calls == self.bad_call:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.data[0] = float("inf")  # .data: autograd saved running_var for backward
        return loss, {}


def test_a_non_finite_buffer_with_a_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(synthetic,
                                                                                                    tmp_path):
    torch.manual_seed(0)
    model = model_for_data("convnet", synthetic.info)
    loader = BatchLoader(synthetic.train_x[:192], synthetic.train_y[:192], 64, shuffle=True, info=synthetic.info,
                         drop_last=True)
    cfg = RunConfig().train
    cfg.epochs, cfg.batch_size = 3, 64
    run = RunDir(tmp_path / "run", {"test": "overflow"})
    steps = len(loader)  # 3
    with pytest.raises(TrainingDiverged) as err:
        fit(model, loader, _BufferOverflowAt(steps + 2), cfg, run=run, progress=False)
    message = str(err.value)
    assert "epoch 2, step 2 " in message and "running_var" in message and "end of epoch 1" in message, message
    state = run.load_checkpoint()
    assert state["epoch"] == 1 and len(run.metrics()) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_the_last_step_of_an_epoch_is_checked_before_its_checkpoint(synthetic, tmp_path):
    torch.manual_seed(0)
    model = model_for_data("convnet", synthetic.info)
    loader = BatchLoader(synthetic.train_x[:128], synthetic.train_y[:128], 64, shuffle=True, info=synthetic.info,
                         drop_last=True)
    cfg = RunConfig().train
    cfg.epochs, cfg.batch_size = 2, 64
    run = RunDir(tmp_path / "run", {"test": "overflow"})
    with pytest.raises(TrainingDiverged, match="epoch 1, step 2 .*no checkpoint had been written"):
        fit(model, loader, _BufferOverflowAt(2), cfg, run=run, progress=False)  # the epoch's last step
    assert not run.has_checkpoint() and run.metrics() == []


def test_a_diverging_lr_through_the_cli_exits_2_and_saves_no_non_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", "data.name=synthetic", "train.lr=1e6", "train.epochs=3",
                                   "--no-progress", "--out", str(out)], "diverged|loss became")
    assert "Lower train.lr" in err and not (out / "results.json").exists()
    if (out / "checkpoint.pt").exists():
        weights = safe_load(out / "checkpoint.pt")["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# --------------------------------------------------------------------------- empty training loader


def test_a_batch_larger_than_the_training_set_is_an_error_before_training(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", *FAST, "train.batch_size=1000", "--out", str(out)],
                    "512 images, less than one batch of 1000", "train.batch_size")
    assert not out.exists()
    loader = BatchLoader(synthetic.train_x[:10], synthetic.train_y[:10], 64, drop_last=True)
    with pytest.raises(ConfigError, match="10 images, less than one batch of 64"):
        fit(model_for_data("lenet5", synthetic.info), loader, CrossEntropy(), RunConfig().train, progress=False)


def test_a_study_with_a_small_subset_and_a_large_batch_stops_with_the_message(tmp_path, capsys):
    _one_line_error(capsys, ["run", "qadtr", "data.name=synthetic", "data.train_subset=32", "fp.batch_size=64",
                             "--no-progress", "--out", str(tmp_path / "study")], "32 images, less than one batch")


# --------------------------------------------------------------------------- failed starts


@pytest.mark.parametrize("bad,message", [
    (["model.arch=nope"], "unknown model 'nope'"),
    (["quant.bits=8", "quant.init=/no/such/run"], "quant.init: checkpoint .* does not exist"),
    (["data.name=nope"], "unknown dataset"),
])
def test_a_failed_start_leaves_no_folder_and_the_corrected_command_runs(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", *FAST, *bad, "--out", str(out)], message)
    assert not out.exists()
    assert main(["train", *FAST, "--out", str(out)]) == 0


def test_a_corrupt_quant_init_checkpoint_is_reported_before_the_folder_is_made(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 half a zip")
    out = tmp_path / "q8"
    _one_line_error(capsys, ["train", *FAST, "quant.bits=8", f"quant.init={tmp_path / 'broken.pt'}", "--out",
                             str(out)], "quant.init: checkpoint .* is corrupt or truncated")
    assert not out.exists()


def test_a_study_with_an_unknown_architecture_makes_no_folder(tmp_path, capsys):
    _one_line_error(capsys, ["run", "divqat", "model.clone_arch=nope", "--out", str(tmp_path / "s")],
                    "unknown model 'nope'")
    assert not (tmp_path / "s").exists()


def test_folders_left_by_a_killed_or_failed_start_count_as_new(tmp_path):
    cfg = RunConfig().to_dict()
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir(empty, cfg)
    assert (empty / "config.toml").is_file()
    killed = tmp_path / "killed"  # killed during its very first config write
    killed.mkdir()
    (killed / ".config.toml.k3x_9abc.tmp").write_text("half")
    RunDir(killed, cfg)
    assert sorted(p.name for p in killed.iterdir()) == ["config.toml"]
    other = RunConfig()
    other.train.lr = 0.01  # the corrected command after a start that failed before any result
    RunDir(killed, other.to_dict())
    assert "lr = 0.01" in (killed / "config.toml").read_text()
    RunDir(killed, other.to_dict()).append_metrics({"epoch": 0})
    with pytest.raises(RunFolderError, match="different run"):  # now it holds a result: refused
        RunDir(killed, cfg)


def test_stray_temporary_files_are_removed_when_a_folder_is_opened(tmp_path):
    cfg = {"a": 1}
    run = RunDir(tmp_path / "run", cfg)
    run.append_metrics({"epoch": 0})
    (run.path / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"partial")
    (run.path / "sub").mkdir()
    (run.path / "sub" / ".cells.json.zz_12345.tmp").write_text("partial")
    (run.path / "notes.tmp").write_text("the user's")  # not a name atomic writes use: kept
    RunDir(tmp_path / "run", cfg)
    left = sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file())
    assert left == ["config.toml", "metrics.jsonl", "notes.tmp"]


# --------------------------------------------------------------------------- messages, not tracebacks


@pytest.mark.parametrize("override,message", [
    ("train.momentum=-1", r"train.momentum must be in \[0, 1\)"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be >= 1"),
    ("train.lr=inf", "train.lr must be a finite number"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("train.weight_decay=-inf", "train.weight_decay must be a finite number"),
    ("train.warmup_epochs=-1", "train.warmup_epochs must be >= 0"),
    ("quant.act_bits=4", "quant.act_bits=4 needs a QAT run"),
    ("quant.init=runs/x", "quant.init is for QAT runs"),
])
def test_bad_training_settings_are_rejected_before_training(override, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    _one_line_error(capsys, ["train", *FAST, override, "--out", str(tmp_path / "r")], message)
    assert not (tmp_path / "r").exists()


def test_study_configs_reject_nan_and_inf_too():
    qadtr = importlib.import_module("qrobust.studies.qadtr")
    with pytest.raises(ConfigError, match="fp.lr must be a finite number"):
        qadtr.load_study_config(None, ["fp.lr=inf"])


def test_bad_paths_and_files_are_one_line_errors(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(capsys, ["train", *FAST, "--out", str(afile)], "is a file, not a folder")
    _one_line_error(capsys, ["train", *FAST, "--out", str(afile / "sub")], "cannot create the output folder")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    _one_line_error(capsys, ["train", *FAST, "--config", str(latin1)], "not UTF-8 text.*save it as UTF-8")
    _one_line_error(capsys, ["run", "qadtr", "--config", str(latin1)], "not UTF-8 text")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_bytes(b"\xff\xfe")
    _one_line_error(capsys, ["eval", str(run)], "is corrupt")


def test_os_errors_from_user_paths_become_one_line(monkeypatch, capsys):
    import qrobust.pipeline

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(qrobust.pipeline, "evaluate", denied)
    _one_line_error(capsys, ["eval", "somewhere"], "Permission denied: somewhere")


# --------------------------------------------------------------------------- checkpoints


def _damaged_copies(tmp_path) -> dict[str, Path]:
    good = io.BytesIO()
    torch.save({"model": {"w": torch.ones(1000)}}, good)
    data = good.getvalue()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"hello, not a checkpoint",
             "overwritten": data[:200] + b"\0" * 600 + data[800:]}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


def test_a_corrupt_or_truncated_checkpoint_is_called_corrupt_and_the_protection_stays(tmp_path):
    for name, path in _damaged_copies(tmp_path).items():
        with pytest.raises(CheckpointError, match="is corrupt or truncated") as err:
            safe_load(path)
        assert "weights_only" not in str(err.value) and "refused" not in str(err.value), name


class Gadget:
    pass


def test_a_checkpoint_with_other_objects_is_refused_naming_them_without_torchs_hint(tmp_path):
    path = tmp_path / "gadget.pt"
    torch.save({"model": Gadget()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*Gadget.*could run code") as err:
        safe_load(path)
    assert "weights_only" not in str(err.value) and "corrupt" not in str(err.value)


def test_every_torch_load_in_the_package_is_the_safe_loader():
    src = Path(importlib.import_module("qrobust").__file__).parent
    users = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "torch.load(" in p.read_text())
    assert users == ["runs.py"]


# --------------------------------------------------------------------------- qrobust run / demo


def test_study_overrides_get_their_own_default_folder():
    qadtr = importlib.import_module("qrobust.studies.qadtr")
    preset = qadtr.preset_path("quick")
    plain, note = study_folder_name(qadtr, preset, [], [])
    assert plain.name == "qadtr-quick" and note == ""
    changed, note = study_folder_name(qadtr, preset, ["fp.epochs=1", "seeds=[0,1]"], [])
    assert re.fullmatch(r"qadtr-quick-[0-9a-f]{8}", changed.name) and "fp.epochs=1" in note
    same, _ = study_folder_name(qadtr, preset, ["seeds=0,1", "fp.epochs=01"], [])  # order and spelling
    assert same.name == changed.name
    other, _ = study_folder_name(qadtr, preset, ["fp.epochs=2", "seeds=[0,1]"], [])
    assert other.name not in (changed.name, plain.name)
    for how in (["progress=false", "threads=2"], [f"fp.epochs={plain.fp.epochs}"]):  # nothing computed differs
        assert study_folder_name(qadtr, preset, how, [])[0].name == "qadtr-quick"
    assert study_folder_name(qadtr, preset, ["fp.epochs=1"], ["data.dir=/d", "data.download=true"])[0].name == \
        study_folder_name(qadtr, preset, ["fp.epochs=1"], [])[0].name
    chosen, _ = study_folder_name(qadtr, preset, ["fp.epochs=1"], ["out_root=/x", "name=mine"])
    assert (chosen.out_root, chosen.name) == ("/x", "mine")


def test_run_takes_the_same_flags_as_train(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["run", "sq", "--out", str(out), "--data-dir", str(tmp_path / "nodata"), "--download",
                 "--no-progress", "data.name=nope"]) == 2
    printed = capsys.readouterr()
    assert "unknown dataset 'nope'" in printed.err and "Traceback" not in printed.err
    assert f"study folder: {out}\n" in printed.out and not out.exists()


def test_data_location_flags_do_not_make_a_different_run(tmp_path):
    out = str(tmp_path / "r")
    assert main(["train", *FAST, "--out", out]) == 0
    assert main(["train", *FAST, "--data-dir", str(tmp_path), "--download", "--out", out]) == 0  # resumes
    with pytest.raises(RunFolderError, match="train.epochs"):  # what is computed still counts
        RunDir(out, load_config(None, ["data.name=synthetic", "train.batch_size=64", "train.epochs=2"]).to_dict(),
               ignore=("data.dir", "data.download"))


def test_a_moved_study_folder_resumes(tmp_path):
    from qrobust.experiment import open_study

    qadtr = importlib.import_module("qrobust.studies.qadtr")
    cfg = qadtr.load_study_config(None, ["data.name=synthetic", f"out_root={tmp_path}", "name=first"])
    _, run = open_study(cfg)
    run.write_json("results.json", {"complete": True})
    (tmp_path / "first").rename(tmp_path / "moved")
    cfg.out_root, cfg.name = str(tmp_path), "moved"
    assert open_study(cfg)[1].read_json("results.json") == {"complete": True}
    cfg.fp.epochs += 1
    with pytest.raises(RunFolderError, match="fp.epochs"):
        open_study(cfg)


def test_demo_uses_data_dir_and_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    _one_line_error(capsys, ["demo", "--out", str(out), "--data-dir", str(tmp_path / "nodata"),
                             "--no-progress"], "nodata")
    assert not out.exists()
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    _one_line_error(capsys, ["demo", "--out", str(out), *FAST], "not empty and holds no qrobust demo")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# --------------------------------------------------------------------------- output defenses


def test_a_calibration_that_ruins_the_defender_warns():
    gen = torch.Generator().manual_seed(0)
    weak = torch.softmax(0.3 * torch.randn(400, 10, generator=gen), dim=1)  # a low-confidence victim
    labels = weak.argmax(dim=1)
    with pytest.warns(DefenseAccuracyWarning, match=r"leaves the defender 0.0% accurate against 100.0%"):
        params, _ = calibrate_defense("rs", weak, 0.6, fixed={"gamma": 0.2}, labels=labels)
    assert (make_defense("rs", **params)(weak).argmax(dim=1) == labels).float().mean() < 0.5
    confident = torch.softmax(5 * torch.randn(400, 10, generator=gen), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefenseAccuracyWarning)
        params, _ = calibrate_defense("rs", confident, 0.6, fixed={"gamma": 0.2}, labels=confident.argmax(dim=1))
    assert (make_defense("rs", **params)(confident).argmax(dim=1) == confident.argmax(dim=1)).all()


def test_the_divqat_report_lists_a_ruinous_defense():
    divqat = importlib.import_module("qrobust.studies.divqat")
    cfg = divqat.load_study_config(None, ["defense.names=none,rs"])
    stat = lambda v: {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
    defenses = {name: {"none": {"defender_acc": stat(0.8)}, "rs": {"defender_acc": stat(0.8)}}
                for name in divqat.victim_names(cfg)}
    assert divqat.defense_warnings(cfg, defenses) == []
    victim = divqat.victim_names(cfg)[0]
    defenses[victim]["rs"]["defender_acc"] = stat(0.0)
    (line,) = divqat.defense_warnings(cfg, defenses)
    assert f"rs on victim {victim} leaves the defender 0.0% accurate against 80.0%" in line
