"""``qrobust`` command line: train / eval / export / card / demo / run <study> / status <folder>.

Configs: ``--config FILE.toml`` fills the defaults and ``section.key=value`` arguments override it
(e.g. ``qrobust train train.epochs=3 quant.bits=4``). User errors print one clear line (exit 2), never a
traceback; an interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qrobust.errors import ConfigError, QrobustError

STUDIES = {
    "divqat": "model-extraction study (issue 3)",
    "qadtr": "adversarial-patch study (issue 4)",
    "sq": "white-box study with the stochastic quantizer (issue 5)",
}


def _config_args(p: argparse.ArgumentParser, config_help: str = "TOML config file (see configs/)") -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--data-dir", help="data folder (default: $QROBUST_DATA or the data set's standard place)")
    p.add_argument("--download", action="store_true", help="download the data set if missing (checksums verified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")


def _data_overrides(args) -> list[str]:
    """``--data-dir`` / ``--download`` as config overrides."""
    out = [f"data.dir={args.data_dir}"] if args.data_dir else []
    return out + (["data.download=true"] if args.download else [])


def _resolve(args) -> tuple:
    from qrobust.config import load_config

    return load_config(args.config, list(args.overrides) + _data_overrides(args))


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


def cmd_card(args) -> int:
    from qrobust.cards import card_folders

    result, out = card_folders(args.runs, args.budget, args.out, progress=not args.no_progress)
    for m in result["models"]:
        for warning in m["warnings"]:
            print(f"warning ({m['name']}): {warning}", file=sys.stderr)
    print(f"card: {out / 'card.html'} (and card.md, card.json) in {result['seconds_total']:.0f} s "
          f"({result['cpu_seconds_total']:.0f} s of CPU time)")
    return 0


def cmd_demo(args) -> int:
    from qrobust.demo import run_demo

    run_demo(Path(args.out), config=args.config, overrides=list(args.overrides) + _data_overrides(args),
             progress=not args.no_progress)
    return 0


# Study settings that choose where a study runs and how it shows progress, not what it computes: they
# do not make the default folder name differ (see study_folder_name).
_RUN_ONLY_KEYS = ("name", "out_root", "progress", "threads", "data.dir", "data.download")


def study_folder_name(study, path, overrides: list[str], flags: list[str]) -> tuple[object, str]:
    """The study config and a note on its folder name. When ``overrides`` change what the study computes
    (the resolved config differs from the one without them), the default name gets ``-<8 hex digits>``,
    a hash of the changed settings, so that the plain command and the one with overrides each have their
    folder. An explicit ``name=`` / ``out_root=`` override or ``--out`` keeps the name as given."""
    import hashlib

    from qrobust.config import parse_overrides
    from qrobust.experiment import study_toml
    from qrobust.runs import without_keys

    cfg = study.load_study_config(path, overrides + flags)
    if set(parse_overrides(overrides + flags)) & {"name", "out_root"}:  # the folder is chosen
        return cfg, ""
    plain = study.load_study_config(path, flags)
    new, old = (without_keys(study_toml(c), _RUN_ONLY_KEYS) for c in (cfg, plain))
    changed = {k: v for k, v in _flatten(new).items() if _flatten(old).get(k) != v}
    if not changed:
        return cfg, ""
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    base = cfg.name
    cfg.name = f"{base}-{digest}"
    listed = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
    return cfg, f"{base} + overrides ({listed}); give --out to choose the folder"


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def which_study(folder: Path) -> tuple[str, Any]:
    """The study a folder holds and its settings, from its ``config.toml`` (the study whose config accepts
    them). ConfigError if the folder holds no study."""
    import importlib

    path = folder / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.toml: give the folder of a study run (e.g. runs/divqat-quick), "
                          "the one `qrobust run` printed as 'study folder'")
    errors = []
    for name in sorted(STUDIES):
        study = importlib.import_module(f"qrobust.studies.{name}")
        try:
            return name, study.load_study_config(path)
        except ConfigError as err:
            errors.append(f"{name}: {err}")
    raise ConfigError(f"{path} is not the config of a study run ({'; '.join(errors)})")


def cmd_status(args) -> int:
    """Where a study folder stands: cells done and left per seed, and the compute the rest needs."""
    import importlib

    from qrobust.experiment.status import format_status, study_status

    folder = Path(args.folder)
    name, cfg = which_study(folder)
    status = study_status(importlib.import_module(f"qrobust.studies.{name}").SPEC, cfg, folder)
    print(json.dumps(status, indent=2) if args.json else format_status(name, status))
    return 0


def cmd_run(args) -> int:
    """Run (or resume) a study, then print its report (results.md) and where everything is."""
    import importlib

    study = importlib.import_module(f"qrobust.studies.{args.study}")  # argparse admits only STUDIES' names
    flags = _data_overrides(args) + (["progress=false"] if args.no_progress else [])
    if args.out:
        out = Path(args.out) if Path(args.out).name else Path(args.out).resolve()  # "." has no name
        flags += [f"out_root={out.parent}", f"name={out.name}"]
    cfg, note = study_folder_name(study, args.config or study.preset_path(args.preset), list(args.overrides), flags)
    folder = Path(cfg.out_root) / cfg.name
    from qrobust.experiment import make_executor

    executor = make_executor(args.executor, address=args.ray_address or "", num_cpus=args.ray_cpus,
                             task_gpus=args.ray_gpus_per_task)
    print(f"study folder: {folder}" + (f" ({note})" if note else "")
          + (f"; executor: {args.executor}" if args.executor != "local" else ""), flush=True)
    try:
        study.run_study(cfg, executor=executor)
    finally:
        executor.close()
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

    p = sub.add_parser("card", help="robustness card of one or two trained models (deployment, extraction, "
                                    "patches, white-box): card.md, card.html, card.json")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER",
                   help="a `qrobust train` run folder or a study's model stage (<study>/seed-<s>/models/<stage>, "
                        "@<bits> or @rand for a qadtr defense); two for a side-by-side card")
    p.add_argument("--budget", default="quick", metavar="{quick,standard}",
                   help="quick: ~1.5 min of CPU time for a Fashion-MNIST convnet (one thread); standard: ~7 min "
                        "(docs/card.md lists every setting)")
    p.add_argument("--out", help="folder for the card (default: the run folder; for two, <first>/card-vs-<second>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("status", help="where a study folder stands: cells done and left per seed, time left")
    p.add_argument("folder", help="a study folder (the 'study folder' `qrobust run` printed)")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="float -> 8-bit QAT -> int8 on Fashion-MNIST, with a summary table")
    _config_args(p)
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a whole study")
    p.add_argument("study", choices=sorted(STUDIES))
    _config_args(p, "TOML study config (default: configs/<study>-<preset>.toml)")
    p.add_argument("--preset", choices=["smoke", "quick", "full", "paper"], default="quick",
                   help="smoke: seconds, synthetic data (a check that everything runs); quick: minutes on "
                        "Fashion-MNIST; full: 3 seeds, CPU-hours (each configs/<study>-full.toml says how "
                        "many; spread it with --executor ray); paper: the paper's setting (GPU)")
    p.add_argument("--out", help="study folder (default runs/<study>-<preset>, plus -<hash> when key=value "
                                 "overrides change the study)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in this process (default); ray: seeds and cells as Ray tasks")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. auto or ray://host:10001); default: start "
                                         "a local Ray on this machine")
    p.add_argument("--ray-cpus", type=int, default=0, help="CPUs of a local Ray (default: all)")
    p.add_argument("--ray-gpus-per-task", type=float, default=0.0,
                   help="GPU share each Ray task reserves (e.g. 1, or 0.25 for four tasks per GPU); needed for "
                        "device=cuda on Ray")
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
    except UnicodeDecodeError as err:  # a user-given file that is not text
        print(f"qrobust: error: a file given to qrobust is not UTF-8 text ({err.reason} at byte {err.start}); "
              "check the paths you gave", file=sys.stderr)
        return 2
    except OSError as err:  # a user-given path that cannot be read or written
        where = f": {err.filename}" if err.filename else ""
        print(f"qrobust: error: {err.strerror or err}{where}; check the path (--out, --config, --data-dir, "
              "a run folder) and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qrobust: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
