"""The public API (``import qrobust as qr``) and the layering rules of docs/ARCHITECTURE.md."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qrobust as qr

SRC = Path(qr.__file__).resolve().parent


@pytest.mark.parametrize("name", qr.__all__)
def test_every_public_name_resolves(name):
    assert getattr(qr, name) is not None
    assert name in dir(qr)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qr.nope  # noqa: B018


def test_from_import_works_and_is_the_defining_object():
    from qrobust import pgd, quantize
    from qrobust.attacks.whitebox import pgd as deep_pgd
    from qrobust.quant import quantize as deep_quantize

    assert pgd is deep_pgd and quantize is deep_quantize


def test_importing_qrobust_loads_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, qrobust, qrobust.errors; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_private_name_is_imported_across_modules():
    """``from qrobust.x import _name`` couples a module to another's internals (issue 11)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qrobust"):
                offenders += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders
