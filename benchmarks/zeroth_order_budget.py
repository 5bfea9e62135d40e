"""DFME / MAZE at a working budget on a finished divqat study's victims, over its seeds (issue 12).

The divqat study trains its victims (QAT, the DivQAT operating point, ...) once per seed; its DFME and
MAZE cells then run at the preset's budget (quick: ~50k queries, where clones stay far from converged).
This script re-runs only the DFME / MAZE cells of a *finished* study at another budget and generator,
on the same trained victims (loaded from the study folder, never retrained) and with the study's own
cell function (``DivQATSpec.run_cell``: a fresh clone, a fresh budget, seeded per cell), so the answer to
"does DivQAT at its operating point raise the data-free adversary's error at a budget where it learns?"
gets mean +- std over the study's seeds without re-running the rest of the study.

    python benchmarks/zeroth_order_budget.py runs/divqat-quick --out runs/zo-budget \\
        dfme.queries=200192 dfme.generator_width=64 dfme.latent_dim=256 [--shard 0/2]

``key=value`` overrides change the attack settings (``dfme.*``, ``maze.*``, ``attack.zeroth_order_*``, and
``attack.names``, e.g. ``'attack.names=["dfme","maze"]'`` for a study that ran without them);
everything that decides the victims stays as the study ran it (an override of another section is refused).
The study folder is read, not written: the victims are loaded from a private copy of it. Records go to
``OUT/records.json`` as each cell finishes (a rerun skips finished cells; ``--shard i/n`` runs every n-th
cell, so several processes can share the work), then ``OUT/summary.json`` and ``OUT/summary.md`` (with each
DivQAT victim's gain over QAT, paired by seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from qrobust.config import load_dataclass_config
from qrobust.errors import ConfigError
from qrobust.experiment.aggregate import mean_std
from qrobust.experiment.engine import seed_stages
from qrobust.experiment.settings import stored_study_config
from qrobust.runs import atomic_write_text
from qrobust.studies.divqat.config import StudyConfig
from qrobust.studies.divqat.spec import SPEC
from qrobust.studies.tables import paired_differences

ATTACK_SECTIONS = ("dfme.", "maze.", "attack.names=", "attack.zeroth_order_victims=", "attack.zeroth_order_defenses=")
ZEROTH_ORDER = ("dfme", "maze")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="a finished divqat study folder (with config.toml)")
    parser.add_argument("--out", type=Path, required=True, help="folder for records.json and the summary")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (default 0/1)")
    parser.add_argument("overrides", nargs="*", help="dfme.* / maze.* / attack.zeroth_order_* settings")
    args = parser.parse_intermixed_args(argv)
    for item in args.overrides:
        if not item.startswith(ATTACK_SECTIONS):
            parser.error(f"{item!r}: only DFME/MAZE settings may change (keys starting with {', '.join(ATTACK_SECTIONS)})")
    try:
        index, count = (int(v) for v in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        parser.error(f"--shard {args.shard!r}: give i/n with 0 <= i < n, e.g. 0/2")
    args.shard_index, args.shard_count = index, count
    if not (args.study / "config.toml").is_file():
        parser.error(f"{args.study} holds no config.toml: give the folder of a divqat study run")
    return args


def stored_config(study: Path, overrides: list[str]) -> StudyConfig:
    """The study's config as it ran (its ``config.toml``, written by the engine), plus ``overrides``."""
    return load_dataclass_config(stored_study_config(StudyConfig(), study), None, overrides)


def read_records(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is corrupt ({err}); delete it to start the cells again") from None


def summarise(records: dict, reference: str = "qat-server") -> dict:
    """Per victim/defense/attack: clone and defender accuracy, mean +- std over seeds, and the curves; for
    every other victim, ``gain``: the adversary error gain over the ``reference`` victim with the same
    defense and attack, paired by seed (``clone_acc_ref(s) - clone_acc(s)``, in points; positive = the
    victim's clone is worse), over the seeds both cells have."""
    groups: dict[str, dict[int, dict]] = {}
    for key, record in records.items():
        seed, cell = key.split("@", 1)
        groups.setdefault(cell, {})[int(seed)] = record
    out = {}
    for cell, per_seed in sorted(groups.items()):
        seeds = sorted(per_seed)
        recs = [per_seed[seed] for seed in seeds]
        row = {"seeds": len(recs), "seed_ids": seeds, "queries_used": [r["queries_used"] for r in recs]}
        for name in ("clone_acc", "defender_acc", "agreement"):
            values = [100 * r[name] for r in recs]
            row[name] = {**mean_std(values), "values": values}
        row["histories"] = [r.get("history") for r in recs]
        victim, rest = cell.split("/", 1)
        ref = groups.get(f"{reference}/{rest}")
        if ref is not None and victim != reference:
            diff = paired_differences({s: 100 * r["clone_acc"] for s, r in ref.items()},
                                      {s: 100 * r["clone_acc"] for s, r in per_seed.items()})
            if diff is not None:
                row["gain"] = {"reference": f"{reference}/{rest}", **diff}
        out[cell] = row
    return out


def markdown(summary: dict, overrides: list[str], study: Path, reference: str = "qat-server") -> str:
    lines = [f"# DFME / MAZE at a working budget on the victims of `{study}`", "",
             f"Overrides: `{' '.join(overrides) or '(none)'}`. Accuracies in %, mean ± std over seeds; gain: "
             f"`{reference}`'s clone minus this victim's, paired by seed (positive = this victim's clone is worse).", "",
             "| victim / defense / attack | seeds | queries | defender acc | clone acc | agreement | gain, paired (per seed) |",
             "|---|---|---|---|---|---|---|"]
    for cell, row in summary.items():
        acc = {k: f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in ("defender_acc", "clone_acc", "agreement")}
        gain = row.get("gain")
        gain_text = (f"{gain['mean']:+.1f} ± {gain['std']:.1f} ({', '.join(f'{g:+.1f}' for g in gain['values'])})"
                     if gain else "-")
        lines.append(f"| {cell} | {row['seeds']} | {max(row['queries_used']):,} | {acc['defender_acc']} | "
                     f"{acc['clone_acc']} | {acc['agreement']} | {gain_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    study_cfg, attack_cfg = stored_config(args.study, []), stored_config(args.study, args.overrides)
    study_cfg.progress = attack_cfg.progress = False
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / f"records-{args.shard_index}of{args.shard_count}.json"
    records = read_records(records_path)
    work = [(seed, cell) for seed in study_cfg.seeds for cell in SPEC.cells(attack_cfg, seed)
            if cell.params["attack"] in ZEROTH_ORDER]
    if not work:
        raise SystemExit(f"{args.study}: no DFME/MAZE cells to run (attack.names = {attack_cfg.attack.names}, zeroth_order_victims = "
                         f"{attack_cfg.attack.zeroth_order_victims}); add 'attack.names=[\"dfme\",\"maze\"]' and "
                         "the victims with 'attack.zeroth_order_victims=[...]'")
    work.sort(key=lambda item: (item[1].params["attack"], item[0], item[1].key))  # shards share DFME and MAZE
    work = work[args.shard_index::args.shard_count]
    with tempfile.TemporaryDirectory(prefix="zo-budget-") as tmp:
        copy = Path(tmp) / "study"
        shutil.copytree(args.study, copy)  # the study folder itself is never written
        contexts: dict[int, dict] = {}
        for i, (seed, cell) in enumerate(work):
            key = f"{seed}@{cell.key}"
            if key in records:
                continue
            if seed not in contexts:
                contexts[seed] = SPEC.prepare(study_cfg, seed, seed_stages(SPEC, study_cfg, copy, seed))[1]
            print(f"[{i + 1}/{len(work)}] seed {seed} {cell.key}", file=sys.stderr, flush=True)
            records[key] = SPEC.run_cell(attack_cfg, contexts[seed], cell)
            atomic_write_text(records_path, json.dumps(records, indent=1) + "\n")
    everything = {}
    for path in sorted(args.out.glob("records-*.json")):
        everything |= read_records(path)
    reference = f"qat-{study_cfg.divqat.backend}"
    summary = summarise(everything, reference)
    text = markdown(summary, args.overrides, args.study, reference)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(args.out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    main()
