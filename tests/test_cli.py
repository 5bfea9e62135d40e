"""The command line end to end on synthetic data: train, resume, eval, export, errors."""

import json
import subprocess
import sys
import tomllib

import pytest

from qrobust.cli import main

FAST = ["data.name=synthetic", "train.epochs=2", "train.batch_size=64", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *FAST, "--out", str(root / "fp")]) == 0
    assert main(["train", *FAST, "quant.bits=8", "train.epochs=1", "train.lr=0.01",
                 f"quant.init={root / 'fp'}", "--out", str(root / "q8")]) == 0
    return root


def test_train_writes_a_complete_run_folder(runs):
    fp = runs / "fp"
    config = tomllib.loads((fp / "config.toml").read_text())
    assert config["seed"] == 0 and config["data"]["name"] == "synthetic"
    assert {"git_commit", "torch", "device"} <= set(config["meta"])
    rows = [json.loads(line) for line in (fp / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    results = json.loads((fp / "results.json").read_text())
    assert isinstance(results["test_acc"], float) and results["test_acc"] > 0.5 and results["complete"]
    assert (fp / "checkpoint.pt").is_file() and (fp / "results.md").is_file()


def test_rerunning_a_finished_run_resumes_instead_of_retraining(runs, capsys):
    before = (runs / "fp" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", *FAST, "--out", str(runs / "fp")]) == 0
    assert (runs / "fp" / "checkpoint.pt").stat().st_mtime_ns == before


def test_eval_and_export(runs, capsys):
    assert main(["eval", str(runs / "q8")]) == 0
    assert main(["export", str(runs / "q8"), "--no-speed"]) == 0
    result = json.loads((runs / "q8" / "export-server.json").read_text())
    assert result["twin_int8_agreement"] >= 0.99
    assert result["int8_size_bytes"] < result["twin_size_bytes"] / 2
    assert main(["export", str(runs / "q8"), "--backend", "mobile", "--no-speed"]) == 0


def test_user_errors_are_one_clear_line_and_exit_2(runs, capsys):
    cases = [
        (["train", "model.arch=vgg", *FAST, "--out", str(runs / "x")], "unknown model 'vgg'; choose one of"),
        (["train", *FAST, "data.name=imagenet", "--out", str(runs / "y")], "unknown dataset 'imagenet'"),
        (["train", *FAST, "train.epochs=5", "--out", str(runs / "fp")], "different run"),
        (["export", str(runs / "fp"), "--no-speed"], "only 8-bit QAT runs export"),
        (["eval", str(runs / "nothing")], "not a qrobust run folder"),
        (["run", "qadtr", "nosuch.key=1"], "unknown config key 'nosuch'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("command", ["train", "eval", "export", "demo", "run"])
def test_help_for_each_command(command):
    out = subprocess.run([sys.executable, "-m", "qrobust.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: qrobust" in out.stdout
