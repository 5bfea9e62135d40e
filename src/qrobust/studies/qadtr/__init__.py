"""The QADT-R patch study: ``qrobust run qadtr [--preset smoke|quick|full|paper] [--executor local|ray]``.

Paper: A. Guesmi, B. Ouni, M. Shafique, "Breaking the Limits of Quantization-Aware Defenses: QADT-R for
Robustness Against Patch-Based Adversarial Attacks in QNNs", arXiv:2503.07058 (2025).

Threat model (DESIGN.md, 2): a universal patch (Brown et al. 2017) made white-box on a source model at
bit width ``b_s`` is pasted on test images fed to a target at ``b_t``; ASR = share of clean-correct
test images whose prediction the patch flips (untargeted). Patches are made on attacker images (train
images no model was trained on) and evaluated on held-out test images.

What the study measures, per seed (``runs/<name>/seed-<s>/``):

* **Table 1** (transfer): a float model and QAT models at 8/4/2 bits fine-tuned from it; a patch made on
  each source, its ASR on each target: ``ASR[b_s][b_t]`` (paper claim: > 70% down to 2 bits). With
  ``attack.table1_switched`` also for one 8-bit QAT model switched between widths.
* **Table 2** (defenses): none (the per-width QAT models), PBAT, DWQ, A-QAPA, A-QAPA+DBWT, QADT-R (and
  more ablations in ``full``), each at 8/4/2 bits (+ ``rand``: random precision inference, for the
  randomised ones): clean accuracy, ASR on *seen* patch configurations (training shape/sizes, placed
  in the training region) and on *unseen* ones (other shapes/sizes, placed outside it), for patches
  transferred from the float model and for adaptive patches made against the defended model itself
  at that width (``rand``: over random widths, one per optimisation step).
* **Gradients**: cosine similarity and MSE between input gradients of the float and the 8/4/2-bit
  models at clean, patched and PGD (pixel) inputs (paper Fig. 4), and per defense the alignment of
  input gradients between its own widths (what GIR targets).
* **Feature maps**: the first layers' channel-mean activations, clean vs patched, per width (Fig. 3),
  with the relative change ``||F(x_p) - F(x)|| / ||F(x)||`` as a table.

Layout: :mod:`.config` (settings, presets), :mod:`.defenses` (models, the defense registry, width
views), :mod:`.prepare` (data and trained models: the seed's context), :mod:`.cells` (what one cell
computes), :mod:`.spec` (the grid and the tables assembled from its records), :mod:`.report`.
"""

from qrobust.experiment import PRESETS
from qrobust.studies.qadtr.config import StudyConfig, load_study_config, preset_path
from qrobust.studies.qadtr.defenses import DEFENSES, LABELS, build_float_model, qat_model
from qrobust.studies.qadtr.spec import CELL_KINDS, SPEC, QADTRSpec, run_study

__all__ = [
    "CELL_KINDS", "DEFENSES", "LABELS", "PRESETS", "SPEC", "QADTRSpec", "StudyConfig", "build_float_model",
    "load_study_config", "preset_path", "qat_model", "run_study",
]
