"""qrobust: security of quantized neural networks (extraction, patches, white-box attacks).

The public API, for ``import qrobust as qr``::

    data = qr.load_dataset("fashion-mnist")
    model = qr.model_for_data("convnet", data.info, width=16)
    qat = qr.quantize(model, qr.QuantConfig(weight_bits=4))       # input and logits stay 8-bit
    qr.calibrate(qat, data.train_x[:512])                           # activation ranges only
    qr.fit(qat, qr.BatchLoader(data.train_x, data.train_y, 256), qr.CrossEntropy(), qr.TrainSection(epochs=1))
    x_adv = qr.pgd(qat, x, y, eps=0.1, steps=10)

Names resolve on first use (PEP 562), so ``import qrobust.errors`` stays light and has no import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    # data and models
    "load_dataset": "qrobust.data", "dataset_names": "qrobust.data", "BatchLoader": "qrobust.data",
    "TensorLoader": "qrobust.data", "split_indices": "qrobust.data",
    "model_for_data": "qrobust.models", "build_model": "qrobust.models", "model_names": "qrobust.models",
    # quantization
    "QuantConfig": "qrobust.quant", "quantize": "qrobust.quant", "calibrate": "qrobust.quant",
    "set_bit_width": "qrobust.quant", "get_bit_width": "qrobust.quant", "is_quantized": "qrobust.quant",
    "set_quantization_enabled": "qrobust.quant", "activation_quantizers": "qrobust.quant",
    "export_int8": "qrobust.quant.deploy", "twin_agreement": "qrobust.quant.deploy",
    "export_onnx": "qrobust.quant.onnx", "OrtModel": "qrobust.quant.onnx", "to_art": "qrobust.interop",
    "SQConfig": "qrobust.quant.stochastic", "StochasticQuantizer": "qrobust.quant.stochastic",
    "insert_stochastic_quantizers": "qrobust.quant.stochastic", "EnsembleSQ": "qrobust.quant.stochastic",
    "ensemble_predict": "qrobust.quant.stochastic", "ensemble_entropies": "qrobust.quant.stochastic",
    "SwitchableBatchNorm2d": "qrobust.quant", "RandomPrecision": "qrobust.quant",
    "make_switchable_bn": "qrobust.quant", "BitWidthSchedule": "qrobust.quant",
    # training
    "fit": "qrobust.train.loop", "TrainSection": "qrobust.config", "CrossEntropy": "qrobust.train.objectives",
    "DivQATLoss": "qrobust.train.divqat", "MIEnsembleLoss": "qrobust.train.sq_objective",
    "PBAT": "qrobust.defenses.patch_training", "DWQ": "qrobust.defenses.patch_training",
    "QADTR": "qrobust.defenses.patch_training", "PBATConfig": "qrobust.defenses.patch_training",
    "DWQConfig": "qrobust.defenses.patch_training", "QADTRConfig": "qrobust.defenses.patch_training",
    # evaluation
    "accuracy": "qrobust.metrics", "predict": "qrobust.metrics", "predict_logits": "qrobust.metrics",
    "tie_rate": "qrobust.metrics", "expected_calibration_error": "qrobust.metrics", "nll": "qrobust.metrics",
    # white-box and score-based attacks
    "fgsm": "qrobust.attacks.whitebox", "pgd": "qrobust.attacks.whitebox", "apgd_ce": "qrobust.attacks.whitebox",
    "robust_accuracy": "qrobust.attacks.whitebox", "input_gradient": "qrobust.attacks.whitebox",
    "square_attack": "qrobust.attacks.blackbox", "bpda": "qrobust.attacks.whitebox",
    "make_evasion_attack": "qrobust.attacks.evasion", "register_evasion": "qrobust.attacks.evasion",
    # patches
    "PatchConfig": "qrobust.attacks.patch", "apply_patch": "qrobust.attacks.patch", "train_patch": "qrobust.attacks.patch",
    "attack_success_rate": "qrobust.attacks.patch", "patch_transfer_matrix": "qrobust.attacks.patch",
    "make_patch_attack": "qrobust.attacks.patch", "UniversalPatch": "qrobust.attacks.patch",
    # extraction
    "Victim": "qrobust.attacks.extraction.victim", "KnockoffNets": "qrobust.attacks.extraction.knockoff",
    "DFME": "qrobust.attacks.extraction.dfme", "MAZE": "qrobust.attacks.extraction.maze",
    "clone_accuracy": "qrobust.attacks.extraction.metrics", "agreement": "qrobust.attacks.extraction.metrics",
    "RandomNoise": "qrobust.attacks.extraction.knockoff", "KnockoffConfig": "qrobust.attacks.extraction.knockoff",
    "DFMEConfig": "qrobust.attacks.extraction.dfme", "MAZEConfig": "qrobust.attacks.extraction.maze",
    "make_extraction_attack": "qrobust.attacks.extraction.base", "CountingModule": "qrobust.attacks.extraction.victim",
    # defenses
    "make_defense": "qrobust.defenses.output", "calibrate_defense": "qrobust.defenses.output",
    "reverse_sigmoid": "qrobust.defenses.output", "dcp": "qrobust.defenses.output",
    "MIDetector": "qrobust.defenses.detection", "mutual_information": "qrobust.defenses.detection",
    # the robustness card
    "card": "qrobust.cards",
    # studies
    "run_study": "qrobust.experiment", "StudySpec": "qrobust.experiment", "Cell": "qrobust.experiment",
    # errors
    "QrobustError": "qrobust.errors", "ConfigError": "qrobust.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'qrobust' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
