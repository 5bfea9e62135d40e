"""The card's fixed battery: four sections, each a list of rows (docs/card.md says what each number is).

A row is ``{"key", "label", "value", "unit", "attack", "budget", "rule"}`` plus ``"strict"`` for
accuracies of the expected/strict rule and ``"na"`` (the reason) when the number does not apply.

Counting rule for every accuracy (DESIGN.md, "one counting rule for all models"): the model is evaluated
``evaluations`` times on each image; *expected* accuracy is the mean over evaluations and images of
"correct", *strict* accuracy the share of images correct on every evaluation. Robust accuracy counts an
image in an evaluation only if the model is right on the clean image and on the attacked one. A
deterministic model gives equal expected and strict figures by construction of the same rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qrobust.errors import ConfigError
from qrobust.metrics import predict, predict_logits, tie_rate
from qrobust.utils import eval_mode

from . import adapters
from .budget import Budget
from .data import CardData
from .sources import Subject

Note = Callable[[str], None]  # shows what a section is doing (the progress bar's text)


def _quiet(_: str) -> None:
    pass


def row(key: str, label: str, value, unit: str = "share", *, attack: str = "", budget: str = "", rule: str = "",
        strict: float | None = None, na: str | None = None) -> dict:
    out = {"key": key, "label": label, "value": None if na else value, "unit": unit, "attack": attack,
           "budget": budget, "rule": rule}
    if strict is not None and not na:
        out["strict"] = strict
    if na:
        out["na"] = na
    return out


def correct_matrix(model: nn.Module, x: Tensor, y: Tensor, evaluations: int) -> Tensor:
    """``[evaluations, N]`` booleans: image i classified correctly in evaluation e (eval mode)."""
    return torch.stack([predict(model, x, 256) == y for _ in range(evaluations)])


def acc_row(key: str, label: str, ok: Tensor, **kw) -> dict:
    return row(key, label, float(ok.float().mean()), strict=float(ok.all(0).float().mean()), **kw)


# ------------------------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """What the battery needs to know about a model, found by probing it."""

    randomised: bool  # two forward passes on the same images differ
    per_call: bool  # ... but copies of an image within one pass agree: one draw per forward (EOT unbatched)
    quantized: bool  # holds qrobust fake or stochastic quantizers
    bits: int | None  # body weight width of a qrobust QAT model
    int8_na: str | None  # why no int8 model exists (None: it does)
    stand_in: nn.Module | None  # BPDA's differentiable stand-in
    stand_in_na: str | None

    def kind(self) -> str:
        if self.randomised:
            return "randomised" + (" (one draw per forward pass)" if self.per_call else "")
        return f"QAT {self.bits}-bit" if self.bits else ("quantized" if self.quantized else "float")


def _differs(a: Tensor, b: Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4 * a.abs().max().clamp_min(1.0))


def profile(model: nn.Module, x: Tensor, num_classes: int, bpda_model: nn.Module | None) -> Profile:
    from qrobust.models import QNet
    from qrobust.quant import get_bit_width, is_quantized
    from qrobust.quant.sq_model import float_twin, has_quantizers

    xb = x[:8]
    with eval_mode(model), torch.no_grad():
        first = model(xb)
        if first.dim() != 2 or first.shape[1] != num_classes:
            raise ConfigError(f"the model returns outputs of shape {tuple(first.shape)} for {len(xb)} images; the "
                              f"card needs logits [N, {num_classes}] (one per class of the data)")
        # several passes: a model with few random choices per pass (e.g. 3 bit widths) may repeat one
        randomised = any(_differs(first, model(xb)) for _ in range(5))
        both = model(torch.cat([xb, xb]))
    per_call = randomised and not _differs(both[: len(xb)], both[len(xb):])
    quantized = has_quantizers(model)
    bits = get_bit_width(model) if is_quantized(model) else None
    if randomised:
        int8_na = "randomised model: no single int8 graph"
    elif not isinstance(model, QNet) or getattr(model, "quant_config", None) is None:
        int8_na = ("float model: int8 needs an 8-bit QAT twin (train one with quant.bits=8)" if isinstance(model, QNet)
                   else "not a qrobust QAT model: int8 export needs qr.quantize + training")
    elif bits != 8:
        int8_na = f"{bits}-bit model: int8 kernels need 8-bit weights and activations"
    else:
        int8_na = None
    if bpda_model is not None:
        stand_in, stand_in_na = bpda_model, None
    elif quantized:
        stand_in, stand_in_na = float_twin(model), None
    else:
        stand_in, stand_in_na = None, ("no quantizers to approximate: BPDA would equal APGD-CE (pass bpda_model= a "
                                       "differentiable stand-in for a model with other non-differentiable steps)")
    return Profile(randomised, per_call, quantized, bits, int8_na, stand_in, stand_in_na)


# ------------------------------------------------------------------------------------------- deployment
@torch.no_grad()
def _latency_ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    xb = x[:1].contiguous()
    model(xb)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(xb)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _speed(model: nn.Module, x: Tensor, b: Budget) -> tuple[float, float]:
    from qrobust.pipeline import images_per_second

    with eval_mode(model):
        return _latency_ms(model, x, b.latency_repeats), images_per_second(model, x, 256, b.latency_seconds)


def deployment(s: Subject, d: CardData, b: Budget, p: Profile, ok: Tensor, note: Note = _quiet) -> dict:
    from qrobust.pipeline import model_size_bytes
    from qrobust.quant.sq_model import float_twin

    n, rule = len(d.eval_y), f"{b.evaluations} evaluations per image; expected (mean) and strict (all correct)"
    rows = [acc_row("clean_acc", "clean accuracy", ok, budget=f"{n} test images", rule=rule)]
    with torch.random.fork_rng(devices=[]):
        rows.append(row("tie_rate", "tie rate (top-1 logit tied)", tie_rate(predict_logits(s.model, d.eval_x)),
                        budget=f"{n} test images, one evaluation", rule="share of images whose largest logit is tied; "
                        "their prediction is decided by argmax picking the lowest class"))
    # fp32 of a quantized model: a copy with quantizers off, in channels-last (as `qrobust export` measures it)
    fp32 = float_twin(s.model).to(memory_format=torch.channels_last) if p.quantized else s.model
    variants = {"fp32": fp32, "twin": s.model if p.quantized else None}
    na = {"fp32": None, "twin": None if p.quantized else "no qrobust quantizers: no fake-quant twin", "int8": p.int8_na}
    int8_info: dict = {}
    if p.int8_na is None:
        paths = {}
        for name, export in (("torch.ao", adapters.int8_torch), ("ONNX Runtime", adapters.int8_onnx)):
            note(f"int8 via {name}")
            try:
                m, size = export(s.model)
            except ConfigError as err:
                int8_info[name] = {"na": str(err)}
                continue
            agree = float((predict(m, d.eval_x) == predict(s.model, d.eval_x)).float().mean())
            speed = _speed(m, d.eval_x, b)
            paths[name] = (m, size, speed)
            int8_info[name] = {"agreement": agree, "acc": float((predict(m, d.eval_x) == d.eval_y).float().mean()),
                               "images_per_s": speed[1], "size_bytes": size}
            rows.append(row(f"int8_agreement_{'onnx' if name[0] == 'O' else 'torch'}",
                            f"int8 top-1 agreement with the twin ({name})", agree, budget=f"{n} test images",
                            rule="share of images where the int8 model's top-1 equals the fake-quant twin's"))
        if paths:
            chosen = max(paths, key=lambda k: paths[k][2][1])
            int8_info["chosen"] = chosen
            variants["int8"] = paths[chosen]
            rows.append(row("int8_path", "int8 path (fastest here, measured)", chosen, "text",
                            rule="the faster of torch.ao and ONNX Runtime at batch 256 (images/s): " + ", ".join(
                                f"{k} {v[2][1]:.0f}" for k, v in paths.items())))
            rows.append(row("int8_acc", f"int8 accuracy ({chosen})", int8_info[chosen]["acc"],
                            budget=f"{n} test images", rule="one evaluation (int8 models are deterministic)"))
        else:
            na["int8"] = "; ".join(v["na"] for v in int8_info.values())
    for name in ("fp32", "twin", "int8"):
        v = variants.get(name)
        if name == "int8" and v is not None:
            model, size, (lat, ips) = v
        elif v is not None:
            model, size = v, model_size_bytes(v)
            lat, ips = _speed(model, d.eval_x, b)
        reason = na[name] if v is None else None
        label = {"fp32": "fp32 (quantizers off)" if p.quantized else "fp32 (as given)", "twin": "fake-quant twin",
                 "int8": "int8"}[name]
        rows.append(row(f"size_{name}", f"size, {label}", None if reason else size, "bytes", na=reason,
                        rule="bytes of the saved weights (state dict; ONNX file for ONNX Runtime)"))
        rows.append(row(f"latency_{name}", f"latency, {label}", None if reason else lat, "ms", na=reason,
                        budget=f"median of {b.latency_repeats} batch-1 forwards",
                        rule=f"{torch.get_num_threads()} CPU thread(s)"))
        rows.append(row(f"throughput_{name}", f"throughput, {label}", None if reason else ips, "images/s", na=reason,
                        budget=f"batch 256 for {b.latency_seconds:g} s", rule=f"{torch.get_num_threads()} CPU thread(s)"))
    return {"rows": rows, "int8": int8_info}


# ------------------------------------------------------------------------------------------- extraction
def extraction(s: Subject, d: CardData, b: Budget, p: Profile, note: Note = _quiet) -> dict:
    from qrobust.models import model_for_data

    q = min(b.knockoff_queries, len(d.pool_y))
    attack = f"KnockoffNets, random sampling, soft answers, clone convnet width {b.clone_width}"
    budget = f"{q} queries, {b.knockoff_epochs} epochs"
    clone_rule = f"clone top-1 accuracy on {len(d.eval_y)} test images"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(b.seed + 11)
        probs = torch.softmax(predict_logits(s.model, d.heldout_x), dim=1)
    rows, out = [], {}
    try:
        params, l1_val = adapters.calibrate_dcp(probs, d.heldout_y, b.l1_budget, b.dcp_gamma, b.dcp_nu)
        dcp_na = None
    except ConfigError as err:
        params, l1_val, dcp_na = None, None, f"no DCP within l1 <= {b.l1_budget}: {err}"
    for tag, defense in (("none", None), ("dcp", params)):
        if tag == "dcp" and dcp_na:
            out[tag] = {"na": dcp_na}
            continue
        note(f"KnockoffNets, {'no defense' if defense is None else 'DCP'}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(b.seed + 12)
            clone = model_for_data("convnet", d.info, width=b.clone_width)
            v = adapters.victim(s.model, defense, q)
            run = adapters.knockoff(v, clone, d.pool_x[:q], queries=q, epochs=b.knockoff_epochs, seed=b.seed,
                                    eval_data=(d.eval_x, d.eval_y))
            view = adapters.victim(s.model, defense, 0)
            run |= {"defender_acc": view.accuracy(d.eval_x, d.eval_y), "l1_eval": view.mean_l1(d.eval_x),
                    "agreement": adapters.agreement(clone, s.model, d.eval_x)}
        out[tag] = run
    none = out["none"]
    rows.append(row("victim_acc", "defender accuracy, no defense", none["defender_acc"], budget=f"{len(d.eval_y)} "
                    "test images, one evaluation", rule="top-1 of the answers the victim serves"))
    rows.append(row("clone_acc_none", "clone accuracy, no defense", none["clone_acc"], attack=attack, budget=budget,
                    rule=clone_rule))
    rows.append(row("clone_agreement_none", "clone/victim agreement, no defense", none["agreement"], attack=attack,
                    budget=budget, rule="share of test images where clone and victim agree"))
    dcp = out["dcp"]
    dcp_name = f"DCP (gamma {b.dcp_gamma:g}, nu {b.dcp_nu:g})"
    rows.append(row("dcp_beta", "DCP strength beta (strongest within l1 budget)", params and params["beta"], "number",
                    attack=dcp_name, budget=f"mean l1 <= {b.l1_budget} on {len(d.heldout_y)} held-out images",
                    rule="calibrate_defense: largest beta within the budget", na=dcp_na))
    rows.append(row("dcp_l1_heldout", "DCP mean l1, held-out images", l1_val, "number", attack=dcp_name,
                    rule="mean over images of sum_k |p_defended - p_clean|", na=dcp_na))
    rows.append(row("dcp_l1_eval", "DCP mean l1, test images", dcp.get("l1_eval"), "number", attack=dcp_name,
                    rule="as above, on the test images", na=dcp_na))
    rows.append(row("defender_acc_dcp", "defender accuracy with DCP", dcp.get("defender_acc"), attack=dcp_name,
                    budget=f"{len(d.eval_y)} test images", rule="top-1 of the defended answers", na=dcp_na))
    drop = None if dcp_na else none["defender_acc"] - dcp["defender_acc"]
    rows.append(row("dcp_acc_drop", "defender's cost: accuracy drop", drop, "points", attack=dcp_name,
                    rule="accuracy without minus with DCP", na=dcp_na))
    rows.append(row("clone_acc_dcp", "clone accuracy, DCP on every answer", dcp.get("clone_acc"), attack=attack,
                    budget=budget, rule=clone_rule, na=dcp_na))
    rows.append(row("clone_agreement_dcp", "clone/victim agreement, DCP", dcp.get("agreement"), attack=attack,
                    budget=budget, rule="share of test images where clone and victim agree", na=dcp_na))
    return {"rows": rows, "runs": out, "dcp_params": params}


# ------------------------------------------------------------------------------------------- patches
def patches(s: Subject, d: CardData, b: Budget, p: Profile, note: Note = _quiet) -> dict:
    n_img = min(b.patch_images, len(d.pool_y))
    x, y = d.pool_x[:n_img], d.pool_y[:n_img]
    made = f"untargeted square patch, random places, Adam {b.patch_steps} steps x {b.patch_batch} images"
    rule = (f"ASR: share of correctly classified test images ({len(d.eval_y)}) the patch flips, mean over "
            f"{b.patch_placements} random places each" + (" and the model's random draws" if p.randomised else ""))
    rows, notes, examples = [], [], {}
    for i, size in enumerate(b.patch_sizes):
        pct = f"{size:.0%}"
        sources = {"random": (s.model, 0), "adaptive": (s.model, b.patch_steps)}
        if s.float_model is not None:
            sources["transfer"] = (s.float_model, b.patch_steps)
        for kind, (source, steps) in sources.items():
            note(f"{pct} patch, {kind}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(b.seed + 21 + i)
                patch, warns = adapters.train_patch(source, x, y, size, steps=steps, batch=b.patch_batch,
                                                    seed=b.seed + 31 + i)
                res = adapters.patch_asr(s.model, d.eval_x, d.eval_y, patch, size, placements=b.patch_placements,
                                         seed=b.seed + 41 + i)
            notes += [f"patch {pct} ({kind}): {w}" for w in warns]
            attack = {"random": "random-noise patch (no optimisation): the floor",
                      "adaptive": f"patch made on this model: {made}",
                      "transfer": f"patch made on the float model ({s.float_source}): {made}"}[kind]
            rows.append(row(f"asr_{kind}_{i}", f"ASR, {pct} patch, {kind}", res["asr"], attack=attack,
                            budget=f"{pct} of the image area", rule=rule))
            if kind == "adaptive":
                examples[pct] = adapters.paste_patch(d.eval_x[:1], patch, size)[0].tolist()
        if s.float_model is None:
            rows.append(row(f"asr_transfer_{i}", f"ASR, {pct} patch, transfer", None, attack="patch made on the "
                            "float model", na="no float model known (a QAT run with quant.init, a study stage, or "
                            "float_model=)" if p.quantized else "this is the float model: transfer = adaptive"))
    return {"rows": rows, "notes": notes, "examples": examples}


# ------------------------------------------------------------------------------------------- white-box
def _attack(name: str, model: nn.Module, p: Profile, b: Budget, x: Tensor, y: Tensor, eps: float, seed: int) -> Tensor:
    """Adversarial versions of ``x`` by white-box attack ``name`` (apgd, square, bpda) at L-inf ``eps``."""
    kw = {"steps": b.apgd_steps, "eot": b.eot if p.randomised else 1, "eot_batched": not p.per_call, "seed": seed}
    if name == "apgd":
        return adapters.apgd(model, x, y, eps, **kw)
    if name == "square":
        return adapters.square(model, x, y, eps, queries=b.square_queries, randomised=p.randomised, seed=seed)
    return adapters.bpda(model, p.stand_in, x, y, eps, **kw)


def whitebox(s: Subject, d: CardData, b: Budget, p: Profile, clean_ok: Tensor, note: Note = _quiet) -> dict:
    x, y = d.eval_x, d.eval_y
    eot = b.eot if p.randomised else 1
    eot_note = f", EOT over {eot} draws per step" if eot > 1 else ""
    rule = (f"robust in an evaluation = correct on the clean and the attacked image; {b.evaluations} evaluations; "
            "expected (mean) and strict (all)")
    attacked = clean_ok.any(0).nonzero().squeeze(1)  # images wrong on every clean evaluation count as not robust
    rows, warnings_, curves, examples = [], [], {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(b.seed + 51)
        checks = adapters.gradient_checks(s.model, x[:32], y[:32], eot)
    warnings_ += [f"set-up check: {m}" for m in checks if "eot=1" not in m]
    for j, (eps, label) in enumerate(zip(b.eps, b.eps_labels, strict=True)):
        oks = {}
        runs = ["apgd", "square"] + (["bpda"] if p.stand_in is not None else [])
        names = {"apgd": f"APGD-CE, {b.apgd_steps} steps{eot_note}", "square": f"Square Attack (black-box), "
                 f"{b.square_queries} queries", "bpda": f"BPDA: APGD-CE with the gradient of the quantizer-free "
                 f"stand-in, {b.apgd_steps} steps{eot_note}"}
        for name in runs:
            note(f"{names[name].split(',')[0].split(':')[0]}, eps {label}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(b.seed + 91 + j)
                x_adv = x.clone()
                if len(attacked):
                    x_adv[attacked] = _attack(name, s.model, p, b, x[attacked], y[attacked], eps, b.seed + 61 + j)
                oks[name] = clean_ok & correct_matrix(s.model, x_adv, y, b.evaluations)
            rows.append(acc_row(f"{name}_{j}", f"robust accuracy, {names[name].split(',')[0].split(':')[0]}, eps {label}",
                                oks[name], attack=names[name], budget=f"L-inf eps {label}, {len(y)} test images",
                                rule=rule))
            if name == "apgd":
                examples[label] = x_adv[0].tolist()
        if "bpda" not in runs:
            rows.append(row(f"bpda_{j}", f"robust accuracy, BPDA, eps {label}", None, attack=names["bpda"],
                            na=p.stand_in_na))
        worst = torch.stack(list(oks.values())).all(0)
        rows.append(acc_row(f"worst_{j}", f"robust accuracy, worst case per image, eps {label}", worst,
                            attack=" + ".join(names[k].split(",")[0].split(":")[0] for k in runs), budget=f"L-inf eps {label}",
                            rule="robust in an evaluation only if robust to every attack above"))
        strict = {k: float(v.all(0).float().mean()) for k, v in oks.items()}
        curves[label] = {k: {"expected": float(v.float().mean()), "strict": strict[k]} for k, v in oks.items()}
        curves[label]["worst"] = {"expected": float(worst.float().mean()), "strict": float(worst.all(0).float().mean())}
        for other in ("square", "bpda"):
            gap = strict["apgd"] - strict.get(other, strict["apgd"])
            if gap > b.masking_margin and gap * len(y) >= b.masking_images - 1e-6:
                warnings_.append(f"gradient masking suspected at eps {label}: {other} leaves "
                                 f"{strict[other]:.1%} robust vs APGD-CE {strict['apgd']:.1%} (margin "
                                 f"{b.masking_margin:.0%} and {b.masking_images} images); trust the worst case, not APGD-CE")
    clean = {"expected": float(clean_ok.float().mean()), "strict": float(clean_ok.all(0).float().mean())}
    return {"rows": rows, "warnings": warnings_, "curves": curves, "clean": clean, "examples": examples,
            "clean_example": x[0].tolist(), "eot": eot, "eot_batched": not p.per_call}


SECTIONS = ("deployment", "extraction", "patches", "whitebox")


__all__ = ["SECTIONS", "Profile", "acc_row", "correct_matrix", "deployment", "extraction", "patches", "profile",
           "row", "whitebox"]
