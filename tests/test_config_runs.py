"""Configs, overrides, run folders, atomic writes and safe checkpoint loading."""

import os
import pickle

import pytest
import torch

from qrobust.config import RunConfig, load_config, parse_overrides
from qrobust.errors import CheckpointError, ConfigError, RunFolderError
from qrobust.models import build_model
from qrobust.pipeline import load_weights
from qrobust.runs import RunDir, atomic_write_text, safe_load


def test_file_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[train]\nepochs = 7\nlr = 0.2\n[model]\narch = "lenet5"\n')
    cfg = load_config(path, ["train.epochs=2", "train.bf16=true", "quant.bits=4"])
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr, cfg.model.arch) == (3, 2, 0.2, "lenet5")
    assert cfg.train.bf16 is True and cfg.quant.bits == 4
    assert parse_overrides(["a.b=1"]) == {"a": {"b": "1"}}


@pytest.mark.parametrize("overrides,match", [
    (["train.epoch=3"], "unknown config key 'train.epoch'.*epochs"),
    (["trian.epochs=3"], "unknown config key 'trian'"),
    (["train.epochs=three"], "expects a int"),
    (["train.epochs"], "key=value"),
    (["quant.bits=9"], "2..8"),
    (["train.optimizer=rmsprop"], "sgd"),
    (["train.lr=-1"], "lr must be > 0"),
])
def test_bad_config_values_say_what_is_wrong(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_run_folder_refuses_a_different_run_and_accepts_the_same(tmp_path):
    cfg = RunConfig().to_dict()
    RunDir(tmp_path / "r", cfg, meta={"git_commit": "x"})
    RunDir(tmp_path / "r", cfg).append_metrics({"epoch": 0})  # same run: resume; now it holds a result
    other = RunConfig()
    other.train.epochs = 99
    with pytest.raises(RunFolderError, match=r"different run.*train.epochs: 15 -> 99"):
        RunDir(tmp_path / "r", other.to_dict())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        RunDir(tmp_path / "junk", cfg)


def test_atomic_write_leaves_no_partial_files(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")

    class Boom(str):
        def encode(self, *a):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_text(target, Boom("new"))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qrobust-pwned",))


def test_a_malicious_pickle_checkpoint_is_refused_and_never_executed(tmp_path):
    marker = "/tmp/qrobust-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to load.*posix.system.*could run code") as err:
        safe_load(path)
    assert not os.path.exists(marker)
    assert "weights_only=False" not in str(err.value) and "corrupt" not in str(err.value)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    lenet = build_model("lenet5", channels=1, num_classes=10, image_size=(28, 28))
    torch.save({"model": lenet.state_dict(), "arch": "lenet5"}, tmp_path / "ckpt.pt")
    convnet = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28))
    with pytest.raises(CheckpointError, match="holds a 'lenet5' model"):
        load_weights(convnet, tmp_path / "ckpt.pt")
    torch.save({"model": lenet.state_dict()}, tmp_path / "noarch.pt")  # no arch tag: shapes still checked
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weights(convnet, tmp_path / "noarch.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(convnet, tmp_path / "missing.pt")


def test_list_fields_and_generic_dataclass_configs(tmp_path):
    from dataclasses import dataclass, field

    from qrobust.config import load_dataclass_config, preset_path

    @dataclass
    class Study:
        bits: list[int] = field(default_factory=lambda: [8, 4])
        name: str = "s"

    path = tmp_path / "s.toml"
    path.write_text("bits = [8, 4, 2]\n")
    assert load_dataclass_config(Study(), path).bits == [8, 4, 2]
    assert load_dataclass_config(Study(), None, ["bits=[2]"]).bits == [2]
    assert load_dataclass_config(Study(), None, ["bits=8,2"]).bits == [8, 2]
    with pytest.raises(ConfigError, match="expects a int"):
        load_dataclass_config(Study(), None, ["bits=[1.5]"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: quick, full, paper"):
        preset_path("qadtr", "huge")


def test_a_folder_from_an_older_version_resumes_when_new_settings_hold_their_defaults(tmp_path):
    old = {"seed": 0, "qat": {"bits": 2}}
    RunDir(tmp_path / "run", old).write_json("results.json", {"complete": True})  # a folder with results
    defaults = {"seed": 0, "qat": {"bits": 8, "act_range": "ema"}}
    RunDir(tmp_path / "run", {"seed": 0, "qat": {"bits": 2, "act_range": "ema"}}, defaults=defaults)
    with pytest.raises(RunFolderError, match="act_range"):
        RunDir(tmp_path / "run", {"seed": 0, "qat": {"bits": 2, "act_range": "learned"}}, defaults=defaults)
    with pytest.raises(RunFolderError, match="bits"):  # a stored setting that changed still refuses
        RunDir(tmp_path / "run", {"seed": 0, "qat": {"bits": 4, "act_range": "ema"}}, defaults=defaults)


def test_atomic_writes_give_plain_file_permissions(tmp_path):
    """Run-folder files and figures get 0o666 minus the umask, like open(), not mkstemp's 0o600."""
    import os

    from qrobust.fileio import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a" / "results.json", b"{}")
        mode = (tmp_path / "a" / "results.json").stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o644
    assert (tmp_path / "a" / "results.json").read_bytes() == b"{}"
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
