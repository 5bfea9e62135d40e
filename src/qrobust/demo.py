"""``make demo`` / ``qrobust demo``: float training -> 8-bit QAT -> real int8, on Fashion-MNIST, CPU.

Prints and writes (``<out>/summary.md``, ``summary.json``) the deployment table: accuracy of the fp32
model, its fake-quant twin and the int8 model, size on disk and images/s for each, and the top-1
agreement between twin and int8. Re-running resumes finished/partial runs from their checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from qrobust import pipeline
from qrobust.config import load_config
from qrobust.errors import RunFolderError
from qrobust.metrics import accuracy
from qrobust.runs import atomic_write_text, is_stray_tmp

# Sized so the whole demo finishes in well under 10 minutes on a 2-core CPU.
FP32_DEFAULTS = ["train.epochs=6", "train.lr=0.05"]
QAT_DEFAULTS = ["train.epochs=1", "train.lr=0.005", "train.warmup_epochs=0", "quant.bits=8"]


DEMO_FILES = ("fp32", "qat8", "summary.md", "summary.json")  # everything the demo writes into its folder


def check_demo_folder(out: Path) -> None:
    """RunFolderError unless ``out`` is new, empty or holds only what an earlier demo wrote."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"demo folder {out} is a file, not a folder; choose another --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES and not is_stray_tmp(p))
        if foreign:
            raise RunFolderError(f"demo folder {out} is not empty and holds no qrobust demo (found: "
                                 f"{', '.join(foreign[:3])}); choose another --out")


def run_demo(out: Path, config: str | None = None, overrides: list[str] | None = None,
             progress: bool = False) -> dict:
    """Float training -> 8-bit QAT -> int8 export into ``out`` (``fp32/``, ``qat8/``, ``summary.*``).
    Both configs and the folder are checked before anything is written."""
    out = Path(out)
    overrides = list(overrides or [])
    fp_dir, q_dir = out / "fp32", out / "qat8"
    fp_cfg = load_config(config, FP32_DEFAULTS + overrides)
    q_cfg = load_config(config, FP32_DEFAULTS + QAT_DEFAULTS + overrides + [f"quant.init={fp_dir}"])
    check_demo_folder(out)
    print(f"[1/3] float training: {fp_cfg.model.arch} on {fp_cfg.data.name}, {fp_cfg.train.epochs} epochs -> {fp_dir}")
    pipeline.train(fp_cfg, fp_dir, progress=progress)
    print(f"[2/3] 8-bit QAT ({q_cfg.quant.backend}) from the float model, {q_cfg.train.epochs} epoch(s) -> {q_dir}")
    pipeline.train(q_cfg, q_dir, progress=progress)
    print("[3/3] int8 export, agreement and speed")
    exported = pipeline.export(q_dir)
    _, fp_model, ds = pipeline.load_run(fp_dir)
    fp_acc = accuracy(fp_model, ds.test_x, ds.test_y)
    summary = {
        "data": fp_cfg.data.name,
        "arch": fp_cfg.model.arch,
        "fp32": {"acc": fp_acc, "size_bytes": pipeline.model_size_bytes(fp_model),
                 "images_per_s": pipeline.images_per_second(fp_model, ds.test_x)},
        "fake_quant": {"acc": exported["twin_acc"], "size_bytes": exported["twin_size_bytes"],
                       "images_per_s": exported["twin_images_per_s"]},
        "int8": {"acc": exported["int8_acc"], "size_bytes": exported["int8_size_bytes"],
                 "images_per_s": exported["int8_images_per_s"], "backend": exported["backend"]},
        "twin_int8_agreement": exported["twin_int8_agreement"],
    }
    table = summary_markdown(summary)
    atomic_write_text(out / "summary.md", table)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print()
    print(table)
    return summary


def summary_markdown(s: dict) -> str:
    rows = [("fp32", s["fp32"]), ("fake-quant 8-bit (QAT twin)", s["fake_quant"]),
            (f"int8 ({s['int8']['backend']})", s["int8"])]
    lines = [f"{s['arch']} on {s['data']} (test set)", "",
             "| model | accuracy | size on disk | images/s (batch 256, CPU) |", "|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {100 * r['acc']:.2f}% | {r['size_bytes'] / 1024:.0f} KiB | {r['images_per_s']:.0f} |")
    lines += ["", f"twin/int8 top-1 agreement: {100 * s['twin_int8_agreement']:.2f}%"]
    return "\n".join(lines) + "\n"
