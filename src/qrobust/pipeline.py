"""The single steps a study is made of: train (float or QAT), evaluate, export to int8, measure.

Each step reads a :class:`~qrobust.config.RunConfig` and writes into a run folder
(``qrobust.runs.RunDir``). The CLI (``qrobust train / eval / export / demo``) is a thin layer on these.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from torch import nn

from qrobust import data as datasets
from qrobust.config import RunConfig, config_from_dict, load_config
from qrobust.errors import CheckpointError, ConfigError, RunFolderError
from qrobust.metrics import accuracy, predict_logits, tie_rate
from qrobust.models import QNet, model_for_data
from qrobust.quant import QuantConfig, quantize
from qrobust.runs import DATA_LOCATION_KEYS, RunDir, atomic_write_bytes, environment, safe_load
from qrobust.train.loop import check_loader, fit, resolve_device
from qrobust.train.objectives import CrossEntropy


def load_data(cfg: RunConfig) -> datasets.ImageData:
    return datasets.load_dataset(cfg.data.name, data_dir=cfg.data.dir or None, download=cfg.data.download)


def quant_config(cfg: RunConfig) -> QuantConfig | None:
    q = cfg.quant
    if q.bits == 32:
        return None
    return QuantConfig(weight_bits=q.bits, act_bits=q.act_bits or q.bits, backend=q.backend,
                       first_last_bits=q.first_last_bits or None, act_range=q.act_range,
                       edge_bits=q.edge_bits, float_logits=q.float_logits)


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint path, or a run folder (its ``checkpoint.pt``)."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a qrobust checkpoint into ``model`` (weights only), checking that the architecture matches."""
    file = checkpoint_file(path)
    state = safe_load(file)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{file} is not a qrobust checkpoint (no 'model' entry)")
    arch = state.get("arch")
    if arch is not None and isinstance(model, QNet) and arch != model.arch:
        raise CheckpointError(f"{file} holds a '{arch}' model but the config asks for '{model.arch}'; "
                              f"set model.arch={arch} or use a checkpoint of a {model.arch}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{file} does not fit this model (another architecture or data set?): "
                              f"{str(err).splitlines()[0][:300]}") from None
    return state


def build_model(cfg: RunConfig, info: datasets.DatasetInfo, *, load_init: bool = True) -> nn.Module:
    """The float model, or its QAT twin (initialised from ``quant.init`` when given and ``load_init``)."""
    model = model_for_data(cfg.model.arch, info)
    qcfg = quant_config(cfg)
    if qcfg is None:
        if cfg.quant.init:
            raise ConfigError("quant.init is for QAT runs; set quant.bits to 2..8 or drop quant.init")
        return model
    if cfg.quant.init and load_init:
        try:
            load_weights(model, cfg.quant.init)
        except CheckpointError as err:
            raise CheckpointError(f"quant.init: {err}") from None
    return quantize(model, qcfg)


def run_extra_state(cfg: RunConfig) -> dict:
    return {"arch": cfg.model.arch, "quant": cfg.to_dict()["quant"], "data": cfg.data.name}


def train(cfg: RunConfig, out: str | Path, *, progress: bool = False, stop_after_epoch: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg`` into ``out``; returns ``results.json``'s content.

    Everything that can be checked before training (config, device, data set, architecture, the
    ``quant.init`` checkpoint, batch size vs training set) is checked before the run folder is created,
    so a failed start leaves nothing behind."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    ds = load_data(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output folder {out} is a file, not a folder; choose another --out")
    resuming = (out / "checkpoint.pt").is_file()  # the checkpoint replaces quant.init's weights anyway
    model = build_model(cfg, ds.info, load_init=not resuming)
    loader = datasets.BatchLoader(ds.train_x, ds.train_y, cfg.train.batch_size, shuffle=True,
                                  augment=cfg.data.augment, info=ds.info, device=device, drop_last=True,
                                  seed=cfg.seed)
    check_loader(loader, cfg.train)
    run = RunDir(out, cfg.to_dict(), meta=environment(str(device)), ignore=DATA_LOCATION_KEYS)
    done = run.read_json("results.json")
    if done is not None and done.get("complete"):
        return done
    objective = CrossEntropy(cfg.train.label_smoothing)

    def evaluate(m: nn.Module) -> dict:
        return {"test_acc": accuracy(m, ds.test_x, ds.test_y, cfg.train.eval_batch_size, device)}

    t0 = time.perf_counter()
    rows = fit(model, loader, objective, cfg.train, run=run, evaluate=evaluate, device=device,
               progress=progress, stop_after_epoch=stop_after_epoch, extra_state=run_extra_state(cfg))
    complete = bool(rows) and rows[-1]["epoch"] + 1 >= cfg.train.epochs
    results = {
        "complete": complete,
        "epochs_done": len(rows),
        "test_acc": rows[-1]["test_acc"] if rows else float("nan"),
        "train_seconds_this_call": time.perf_counter() - t0,
        "train_seconds_total": sum(r["epoch_seconds"] for r in rows),
        "bits": cfg.quant.bits,
    }
    run.write_json("results.json", results)
    run.write_text("results.md", results_markdown(cfg, results))
    return results


def results_markdown(cfg: RunConfig, results: dict) -> str:
    kind = "float (fp32)" if cfg.quant.bits == 32 else f"QAT {cfg.quant.bits}-bit ({cfg.quant.backend})"
    return (f"| model | data | kind | epochs | test acc |\n|---|---|---|---|---|\n"
            f"| {cfg.model.arch} | {cfg.data.name} | {kind} | {results['epochs_done']} | "
            f"{100 * results['test_acc']:.2f}% |\n")


def load_run(path: str | Path) -> tuple[RunConfig, nn.Module, datasets.DatasetInfo | None]:
    """Rebuild a trained run's model from its folder (config.toml + checkpoint.pt)."""
    import tomllib

    path = Path(path)
    cfg_file = path / "config.toml"
    if not cfg_file.is_file():
        raise ConfigError(f"{path} is not a qrobust run folder (no config.toml); give the folder that "
                          "`qrobust train --out` wrote")
    try:
        values = tomllib.loads(cfg_file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{cfg_file} is corrupt (not valid UTF-8 TOML); the run folder {path} cannot be "
                          "read, train it again") from None
    values.pop("meta", None)
    if "quant" in values and "edge_bits" not in values["quant"]:
        values["quant"]["edge_bits"] = 0  # written before edge_bits existed: its input and logits followed the body
    cfg = config_from_dict(values)
    ds = load_data(cfg)
    model = model_for_data(cfg.model.arch, ds.info)
    qcfg = quant_config(cfg)
    if qcfg is not None:
        model = quantize(model, qcfg)
    load_weights(model, path)
    return cfg, model.eval(), ds


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size on disk of the weights."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


@torch.no_grad()
def images_per_second(model: nn.Module, x: torch.Tensor, batch_size: int = 256, min_seconds: float = 1.0) -> float:
    """Inference throughput on CPU in eval mode at ``batch_size`` (warm-up batch excluded)."""
    model.eval()
    xb = x[:batch_size].float().div(255) if x.dtype == torch.uint8 else x[:batch_size].float()
    xb = xb.contiguous(memory_format=torch.channels_last)
    model(xb)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds or n < 3:
        model(xb)
        n += 1
    return n * len(xb) / (time.perf_counter() - t0)


def export(path: str | Path, backend: str | None = None, *, measure_speed: bool = True,
           format: str = "torch") -> dict:
    """Export a trained 8-bit QAT run to int8 and check it against its fake-quant twin.

    ``format="torch"``: torch.ao int8 modules, ``int8-<backend>.pt`` and ``export-<backend>.json``.
    ``format="onnx"``: a QDQ ONNX graph run by ONNX Runtime, ``model-int8.onnx`` and ``export-onnx.json``
    (see :func:`_export_onnx`)."""
    from qrobust.quant.deploy import export_int8, twin_agreement

    if format not in ("torch", "onnx"):
        raise ConfigError(f"export format '{format}' is unknown; use 'torch' or 'onnx'")
    cfg, twin, ds = load_run(path)
    if cfg.quant.bits != 8:
        raise ConfigError(f"run {path} is {'a float' if cfg.quant.bits == 32 else f'a {cfg.quant.bits}-bit'} "
                          "model; only 8-bit QAT runs export to int8 (train one with quant.bits=8)")
    backend = backend or cfg.quant.backend
    if format == "onnx":
        return _export_onnx(path, cfg, twin, ds, backend, measure_speed)
    int8 = export_int8(twin, backend)
    run = RunDir(path, cfg.to_dict(), ignore=DATA_LOCATION_KEYS)
    buffer = io.BytesIO()
    torch.save(int8.state_dict(), buffer)
    atomic_write_bytes(Path(path) / f"int8-{backend}.pt", buffer.getvalue())
    result = {
        "backend": backend,
        "twin_acc": accuracy(twin, ds.test_x, ds.test_y),
        "int8_acc": accuracy(int8, ds.test_x, ds.test_y),
        "twin_int8_agreement": twin_agreement(twin, int8, ds.test_x),
        "twin_size_bytes": model_size_bytes(twin),
        "int8_size_bytes": len(buffer.getvalue()),
    }
    if measure_speed:
        result["twin_images_per_s"] = images_per_second(twin, ds.test_x)
        result["int8_images_per_s"] = images_per_second(int8, ds.test_x)
    run.write_json(f"export-{backend}.json", result)
    return result


def _export_onnx(path, cfg: RunConfig, twin: nn.Module, ds, backend: str, measure_speed: bool) -> dict:
    """``model-int8.onnx`` + ``export-onnx.json``: ONNX Runtime's accuracy and top-1 agreement with the
    twin on the test set (target >= 0.99), the int8 kernels it runs, and images/s of fp32 (torch,
    channels-last, the twin's weights without quantizers), the twin, torch int8 and ONNX Runtime int8
    measured one after the other in this call."""
    import copy

    import onnxruntime

    from qrobust.quant import onnx as qonnx
    from qrobust.quant import set_quantization_enabled
    from qrobust.quant.deploy import export_int8, twin_agreement

    proto = qonnx.export_onnx(twin, backend)
    run = RunDir(path, cfg.to_dict(), ignore=DATA_LOCATION_KEYS)
    size = qonnx.save_onnx(proto, Path(path) / "model-int8.onnx")
    ort_model = qonnx.OrtModel(proto)
    ops = qonnx.optimized_op_counts(proto)
    result = {
        "format": "onnx", "backend": backend, "opset": qonnx.OPSET, "onnxruntime": onnxruntime.__version__,
        "logits": "float" if qonnx.has_float_logits(twin) else "8-bit",
        "twin_acc": accuracy(twin, ds.test_x, ds.test_y),
        "onnx_acc": accuracy(ort_model, ds.test_x, ds.test_y),
        "twin_onnx_agreement": twin_agreement(twin, ort_model, ds.test_x),
        "int8_ops": qonnx.int8_op_counts(ops), "float_compute_ops": qonnx.float_compute_ops(ops),
        "twin_size_bytes": model_size_bytes(twin), "onnx_size_bytes": size,
    }
    if measure_speed:
        fp32 = set_quantization_enabled(copy.deepcopy(twin), False).to(memory_format=torch.channels_last)
        speed = {"fp32": images_per_second(fp32, ds.test_x), "twin": images_per_second(twin, ds.test_x)}
        try:
            speed["torch_int8"] = images_per_second(export_int8(twin, backend), ds.test_x)
        except ConfigError as err:  # e.g. float logits: torch's int8 modules cannot deploy them
            result["torch_int8_skipped"] = str(err)
        speed["onnx_int8"] = images_per_second(ort_model, ds.test_x)
        result |= {f"{name}_images_per_s": value for name, value in speed.items()}
        result["onnx_int8_speedup_over_fp32"] = speed["onnx_int8"] / speed["fp32"]
        result["threads"] = torch.get_num_threads()
    run.write_json("export-onnx.json", result)
    return result


def evaluate(path: str | Path) -> dict:
    """Test accuracy and tie rate of a trained run's model (the fake-quant twin for QAT runs).

    ``tie_rate`` is the share of test images whose top-1 logit is tied: their prediction is decided by
    ``argmax`` picking the lowest class index (see :func:`qrobust.metrics.tie_rate`)."""
    cfg, model, ds = load_run(path)
    logits = predict_logits(model, ds.test_x)
    return {"test_acc": float((logits.argmax(1) == ds.test_y.cpu()).float().mean()), "tie_rate": tie_rate(logits),
            "bits": cfg.quant.bits, "edge_bits": cfg.quant.edge_bits if cfg.quant.bits != 32 else 32,
            "arch": cfg.model.arch}


__all__ = ["build_model", "evaluate", "export", "images_per_second", "load_config", "load_run", "load_weights",
           "model_size_bytes", "train"]
