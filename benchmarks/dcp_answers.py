"""What an output defense does to the answers DFME/MAZE receive, on a divqat study's victim (issue 12).

DCP (reverse sigmoid gated by confidence) only acts on answers whose top probability is below its
threshold. The test images of a good victim are mostly confident, so DCP costs no accuracy there; the
synthetic images a data-free attacker sends are not. This script loads one trained victim of a finished
(or running) divqat study, the defense parameters the study calibrated for it (``defenses.json``), and
reports for several probe sets how often the defense acts and what it does to the answer:

- ``gate``: share of answers with top probability below the threshold (DCP acts on them);
- ``flip``: share whose argmax the defense changes;
- ``l1``: mean l1 distance between defended and clean answers;
- ``tail rho``: mean Spearman correlation between the clean and defended probabilities of the nine
  non-top classes (+1: order kept, -1: reversed). DFME and MAZE fit all log-probabilities, so a reversed
  tail is what they learn from;
- ``margin``: mean gap between the top and second probability, clean -> defended.

    python benchmarks/dcp_answers.py runs/divqat-full --seed 0 --victim qat-server [--defense dcp]

The probe sets: the study's test images, uniform noise, the untrained DFME and MAZE generators at the
study's widths (what the attacks send first; trained, the generators seek the victim's low-confidence
regions), and test images blended with noise. Reads the study folder, writes nothing.

With ``--attack dfme|maze --queries N`` it also runs that attack on the defended victim as the study's
cell does (the cell's seed, a fresh clone, the study's settings but a budget of N queries) and reports
the same statistics over the queries the attack itself sent, in windows of its budget: what the defense
did to the answers the trained generator asked for, which the study's cells do not store.

    python benchmarks/dcp_answers.py runs/divqat-full --seed 0 --victim divqat-op-server --attack dfme \\
        --queries 300000
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import sys
from itertools import pairwise
from pathlib import Path

import torch

from qrobust.attacks.extraction.dfme import Generator
from qrobust.attacks.extraction.metrics import clone_accuracy
from qrobust.defenses.output import make_defense
from qrobust.errors import ConfigError
from qrobust.experiment.settings import stored_study_config
from qrobust.experiment.spec import cell_seed
from qrobust.metrics import predict_logits
from qrobust.quant import QuantConfig, quantize
from qrobust.runs import safe_load
from qrobust.studies.divqat.config import StudyConfig, operating_point_name
from qrobust.studies.divqat.data import SeedData, build_model
from qrobust.studies.divqat.spec import attacked_cell
from qrobust.studies.divqat.victims import operating_point_checkpoint

PROBES = 2000
WINDOWS = (0.0, 0.1, 0.3, 0.6, 1.0)  # shares of the rows the attack was answered: one row of statistics each
STATS = ("median_conf", "gate", "flip", "l1", "tail_rho", "margin_clean", "margin_defended")


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (no ties assumed)."""
    ra, rb = (t.argsort(1).argsort(1).double() for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def answer_stats(p: torch.Tensor, y: torch.Tensor, threshold: float | None) -> dict:
    """How the defended answers ``y`` differ from the clean ``p`` (rows of probabilities)."""
    top = p.argmax(1, keepdim=True)
    keep = torch.ones_like(p, dtype=torch.bool).scatter_(1, top, False)
    k = p.shape[1] - 1
    tail_p, tail_y = p[keep].view(-1, k), y[keep].view(-1, k)
    two_p, two_y = p.topk(2, 1).values, y.topk(2, 1).values
    return {
        "median_conf": p.max(1).values.median().item(),
        "gate": (p.max(1).values < threshold).double().mean().item() if threshold is not None else float("nan"),
        "flip": (y.argmax(1) != p.argmax(1)).double().mean().item(),
        "l1": (y - p).abs().sum(1).mean().item(),
        "tail_rho": spearman_rows(tail_p, tail_y).mean().item(),
        "margin_clean": (two_p[:, 0] - two_p[:, 1]).mean().item(),
        "margin_defended": (two_y[:, 0] - two_y[:, 1]).mean().item(),
    }


class RecordingDefense:
    """An output defense unchanged, plus :func:`answer_stats` of every batch it answers (with its size)."""

    def __init__(self, fn, threshold: float | None):
        self.fn, self.threshold, self.batches = fn, threshold, []

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        y = self.fn(p)
        self.batches.append((p.shape[0], answer_stats(p.double(), y.double(), self.threshold)))
        return y

    def windows(self, edges: tuple[float, ...] = WINDOWS) -> list[dict]:
        """Row-weighted means of the batch statistics over windows of the rows answered (by their
        position in the attack: ``edges`` are shares of all rows answered)."""
        total = sum(n for n, _ in self.batches)
        bounds = [round(e * total) for e in edges]
        groups: list[list] = [[] for _ in bounds[1:]]
        seen = 0
        for n, stats in self.batches:  # a batch goes to the window its first row falls in
            groups[min(bisect.bisect_right(bounds, seen), len(groups)) - 1].append((n, stats))
            seen += n
        out = []
        for (lo, hi), group in zip(pairwise(bounds), groups, strict=True):
            rows = sum(n for n, _ in group)
            if rows:
                out.append({"from": lo, "to": hi, "rows": rows,
                            **{k: sum(n * s[k] for n, s in group) / rows for k in STATS}})
        return out


def attack_answers(cfg: StudyConfig, data: SeedData, seed: int, victim_name: str, model: torch.nn.Module,
                   defense_name: str, defense, threshold: float | None, attack_name: str,
                   queries: int) -> tuple[list[dict], float]:
    """Run ``attack_name`` (dfme / maze) on the defended victim as the study's cell does
    (``DivQATSpec.run_cell``: its seed, clone, output and budget from the settings), at ``queries``;
    returns the per-window answer statistics and the clone's test accuracy."""
    section = getattr(cfg, attack_name)
    cfg = dataclasses.replace(cfg, **{attack_name: dataclasses.replace(section, queries=queries)})
    recorder = RecordingDefense(defense, threshold)
    seed_of_cell = cell_seed(seed, victim_name, defense_name, attack_name)
    with attacked_cell(cfg, data.for_cells(), seed_of_cell, model, recorder, attack_name) as (_, clone, _):
        return recorder.windows(), clone_accuracy(clone, data.test_x, data.test_y)


def load_victim(root: Path, cfg: StudyConfig, seed: int, name: str, info) -> torch.nn.Module:
    """A quantized victim from ``seed-<s>/models/<name>/checkpoint.pt`` (the operating points from the
    epoch snapshot ``divqat_sweep.json`` names)."""
    fp = build_model(cfg, cfg.model.arch, info)
    seed_root = root / f"seed-{seed}"
    if name in (operating_point_name(cfg), operating_point_name(cfg, hinge=True)):
        hinge = name == operating_point_name(cfg, hinge=True)
        key = "divqat_hinge_operating_point" if hinge else "divqat_operating_point"
        point = json.loads((seed_root / "divqat_sweep.json").read_text())[key]
        path = operating_point_checkpoint(seed_root, cfg, point, hinge=hinge)
        backend = cfg.divqat.backend
    else:
        path = seed_root / "models" / name / "checkpoint.pt"
        backend = next((b for b in cfg.qat.backends if name.endswith("-" + b)), None)
    if backend is None:
        raise ConfigError(f"victim {name!r}: give a quantized victim, e.g. qat-server or divqat-op-server")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: that victim has not been trained in this study folder yet")
    q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=backend))
    q.load_state_dict(safe_load(path)["model"])
    return q.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="a divqat study folder (config.toml, seed-<s>/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--victim", default="qat-server")
    parser.add_argument("--defense", default="dcp", help="a defense calibrated in defenses.json (dcp, rs)")
    parser.add_argument("--attack", choices=("dfme", "maze"), help="also run this attack and report its queries")
    parser.add_argument("--queries", type=int, default=300_000, help="the attack's budget (default 300000)")
    args = parser.parse_args(argv)
    if args.queries < 1:
        parser.error(f"--queries {args.queries}: give a positive budget, e.g. 300000")
    try:
        cfg = stored_study_config(StudyConfig(), args.study)
        defenses = json.loads((args.study / f"seed-{args.seed}" / "defenses.json").read_text())
        params = defenses[args.victim][args.defense]["params"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        print(f"error: no calibrated {args.defense!r} for {args.victim!r} in {args.study}/seed-{args.seed}/"
              f"defenses.json ({err}); has that seed reached its defenses stage?", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    data = SeedData(cfg, args.seed, torch.device("cpu"))
    try:
        victim = load_victim(args.study, cfg, args.seed, args.victim, data.info)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    defense = make_defense(args.defense, **params)
    threshold = (params.get("threshold") or params.get("beta")) if args.defense == "dcp" else None
    x = data.test_x[:PROBES]
    shape = data.image_shape
    with torch.no_grad():
        probes = {
            "test images": x,
            "uniform noise": torch.rand(PROBES, *shape),
            "test 0.5 + noise 0.5": 0.5 * x + 0.5 * torch.rand_like(x),
            "DFME generator (untrained)": Generator(shape, cfg.dfme.latent_dim, cfg.dfme.generator_width).train()(
                torch.randn(PROBES, cfg.dfme.latent_dim)),
            "MAZE generator (untrained)": Generator(shape, cfg.maze.latent_dim, cfg.maze.generator_width).train()(
                torch.randn(PROBES, cfg.maze.latent_dim)),
        }
    print(f"{args.study} seed {args.seed}, victim {args.victim}, {args.defense} {params}")
    print(header("probes"))
    for name, images in probes.items():
        p = predict_logits(victim, images, 512).softmax(1).double()
        s = answer_stats(p, defense(p), threshold)
        print(row(name, s))
    if args.attack:
        windows, acc = attack_answers(cfg, data, args.seed, args.victim, victim, args.defense, defense, threshold,
                                      args.attack, args.queries)
        print(f"\n{args.attack.upper()} on the {args.defense}-defended victim, {args.queries} queries (the cell's seed): "
              f"clone accuracy {100 * acc:.1f}%")
        print(header("its queries"))
        for w in windows:
            print(row(f"{w['from']}-{w['to']}", w))
    return 0


def header(first: str) -> str:
    return (f"| {first} | median conf | gate | argmax flipped | l1 | tail rho (clean vs defended) | top margin |\n"
            "|---|---|---|---|---|---|---|")


def row(name: str, s: dict) -> str:
    return (f"| {name} | {s['median_conf']:.3f} | {s['gate']:.3f} | {s['flip']:.3f} | {s['l1']:.3f} | "
            f"{s['tail_rho']:+.2f} | {s['margin_clean']:.3f} -> {s['margin_defended']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
