"""The README's Python block runs as written (on a small synthetic stand-in for Fashion-MNIST)."""

import re
import warnings
from pathlib import Path

import torch

import qrobust as qr

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_block_runs(monkeypatch, capsys):
    code = _python_block()
    assert "import qrobust as qr" in code and "qr.pgd(" in code and "qr.Victim(" in code
    small = qr.load_dataset("synthetic", num_train=2048, num_test=256)
    monkeypatch.setattr(qr, "load_dataset", lambda name, **kw: small)
    torch.manual_seed(0)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the README's usage must not trigger our own misuse warnings
        exec(compile(code, str(README), "exec"), scope)
    x, x_adv = scope["x"], scope["x_adv"]
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6  # the L-inf budget the block names holds
    assert scope["answers"].shape == (64, small.info.num_classes)
    assert torch.allclose(scope["answers"].sum(1), torch.ones(64), atol=1e-4)  # defended answers stay probabilities
    assert scope["victim"].used == 64
    printed = capsys.readouterr().out.split()
    assert 0.0 <= float(printed[0]) <= 1.0 and 0.0 <= float(printed[1]) <= 1.0
