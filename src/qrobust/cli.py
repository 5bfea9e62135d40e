"""``qrobust`` command line: train / eval / export / demo / run <study>.

Configs: ``--config FILE.toml`` fills the defaults and ``section.key=value`` arguments override it
(e.g. ``qrobust train train.epochs=3 quant.bits=4``). User errors print one clear line (exit 2), never a
traceback; an interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qrobust.errors import QrobustError

STUDIES = {
    "divqat": "model-extraction study (issue 3)",
    "qadtr": "adversarial-patch study (issue 4)",
    "sq": "white-box study with the stochastic quantizer (issue 5)",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (see configs/)")
    p.add_argument("--data-dir", help="data folder (default: $QROBUST_DATA or the data set's standard place)")
    p.add_argument("--download", action="store_true", help="download the data set if missing (checksums verified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")


def _resolve(args) -> tuple:
    from qrobust.config import load_config

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    if args.download:
        overrides.append("data.download=true")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from qrobust import pipeline

    cfg = _resolve(args)
    name = cfg.name or f"{cfg.model.arch}-{cfg.data.name}-{'fp32' if cfg.quant.bits == 32 else f'q{cfg.quant.bits}'}"
    out = Path(args.out or Path("runs") / name)
    results = pipeline.train(cfg, out, progress=not args.no_progress)
    print(json.dumps(results, indent=2))
    print(f"run folder: {out}")
    return 0


def cmd_eval(args) -> int:
    from qrobust import pipeline

    print(json.dumps(pipeline.evaluate(args.run), indent=2))
    return 0


def cmd_export(args) -> int:
    from qrobust import pipeline

    result = pipeline.export(args.run, args.backend, measure_speed=not args.no_speed, format=args.format)
    print(json.dumps(result, indent=2))
    return 0


def cmd_demo(args) -> int:
    from qrobust.demo import run_demo

    run_demo(Path(args.out), config=args.config, overrides=args.overrides, progress=not args.no_progress)
    return 0


def cmd_run(args) -> int:
    """Run (or resume) a study, then print its report (results.md) and where everything is."""
    import importlib

    if args.study not in ("divqat", "qadtr", "sq"):
        raise QrobustError(
            f"study '{args.study}' ({STUDIES[args.study]}) is not implemented yet; its building blocks are in "
            "qrobust.attacks / qrobust.defenses. Use `qrobust train`, `eval` and `export` meanwhile."
        )
    study = importlib.import_module(f"qrobust.studies.{args.study}")
    cfg = study.load_study_config(args.config or study.preset_path(args.preset), list(args.overrides))
    study.run_study(cfg)
    folder = Path(cfg.out_root) / cfg.name
    report = folder / "results.md"
    if report.is_file():
        print()
        print(report.read_text())
    print(f"run folder: {folder} (results.md, results.json, PNGs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrobust", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a float or QAT model (resumes if the run folder has a checkpoint)")
    _config_args(p)
    p.add_argument("--out", help="run folder (default runs/<arch>-<data>-<fp32|qN>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a trained run")
    p.add_argument("run", help="run folder written by `qrobust train`")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export an 8-bit QAT run to a real int8 model and check it")
    p.add_argument("run", help="run folder of an 8-bit QAT run")
    p.add_argument("--format", choices=["torch", "onnx"], default="torch",
                   help="torch: torch.ao int8 modules (int8-<backend>.pt); onnx: QDQ ONNX graph for ONNX Runtime "
                        "(model-int8.onnx, export-onnx.json)")
    p.add_argument("--backend", choices=["server", "mobile"], help="int8 target (default: the run's)")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput measurement")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="float -> 8-bit QAT -> int8 on Fashion-MNIST, with a summary table")
    _config_args(p)
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a whole study")
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--config")
    p.add_argument("--preset", choices=["quick", "full", "paper"], default="quick")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere among the options: collect those argparse left over
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except QrobustError as err:
        print(f"qrobust: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qrobust: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
