"""The DivQAT extraction study: ``qrobust run divqat [--preset smoke|quick|full|paper] [--executor ray]``.

Paper: "DivQAT: Enhancing Robustness of Quantized Convolutional Neural Networks against Model
Extraction Attacks", arXiv:2512.23948. DivQAT trains the quantized model with

    L = CE(y, f_q(x)) - alpha * KL(f_q(x) || f_fp(x))          (qrobust.train.divqat.DivQATLoss)

so that its probabilities deviate from the float model's and a clone trained on them is worse.

Threat model (DESIGN.md, 1): the victim is a deployed 8-bit (fake-quantized) model behind a budgeted
:class:`~qrobust.attacks.extraction.victim.Victim` that answers defended probabilities (top-1 labels
for the hard-label row). Every query counts, zeroth-order probes included; the defense applies to all.

Per seed (``runs/<name>/seed-<s>/``), on the study engine (:mod:`qrobust.experiment`):

1. **Splits** (data.py): the victim data set's training images are cut by seed into disjoint victim-train /
   attacker pool / validation sets (``split_indices``); test images are a fixed subset of the test set.
2. **Victims** (victims.py; each its own resumable run folder under ``models/``): the float model; plain QAT
   victims for each backend ('server' = x86, 'mobile' = ARM); DivQAT victims over the alpha sweep,
   all fine-tuned from the float model. For each quantized victim: test accuracy and the mean
   ``KL(f_q || f_fp)`` on test images (the mechanism). A DivQAT victim that lost more than
   ``divqat.max_acc_drop`` accuracy vs plain QAT stops the study with a clear error (its folder is kept);
   the objective's own guard stops it earlier, during training, at the same threshold vs the teacher.
   **Operating point** (``divqat.search_alphas``): over all alphas and every epoch checkpoint, the largest
   validation KL within ``divqat.max_acc_cost`` (3.66) points of plain QAT's validation accuracy
   (``divqat_operating_point`` in results.json, ``divqat_transition.png``), attacked as
   ``divqat-op-<backend>``; ``divqat.hinge_cap``: the same for the beyond-paper DivQAT-hinge loss.
3. **Defenses** (victims.py): none, RS and DCP, each calibrated per victim to the strongest parameter with
   mean l1 <= ``defense.l1_budget`` (0.6) on the validation probabilities (``calibrate_defense``).
4. **Cells** (spec.py, attacks.py): one per victim x defense x attack: KnockoffNets (soft labels, transfer
   set = the attacker split or a named data set; ``knockoff.ladder``: its curve over budgets), the
   defense-aware KnockoffNets beside every output defense, hard-label KnockoffNets (the paper's stated
   limit), DFME, MAZE (``attack.zeroth_order_victims/defenses``), and the random-noise floor (a reference:
   KnockoffNets' fit on as many uniform-noise queries). Each records defender accuracy, clone accuracy,
   clone/victim agreement, l1 (test), queries used, the victim's ledger and its independent query counts;
   the engine stores them in ``cells.json`` as they finish and skips them on re-run. Per victim x defense
   the table also has ECE (15 bins) and NLL of the answers served.

Top level: ``results.json`` (mean and std over seeds), ``results.md``, ``defender_vs_clone.png``,
``clone_vs_queries.png`` and ``divqat_transition.png`` (report.py). Settings and presets: config.py, ``configs/divqat-<preset>.toml``.
"""

from qrobust.experiment import PRESETS
from qrobust.studies.divqat.attacks import ATTACK_LABELS, EXTRACTION_ATTACKS, ExtractionAttack
from qrobust.studies.divqat.config import (
    ATTACKS,
    DEFENSES,
    StudyConfig,
    cell_plan,
    load_study_config,
    preset_path,
    victim_names,
)
from qrobust.studies.divqat.report import defense_warnings, error_gains
from qrobust.studies.divqat.spec import SPEC, DivQATSpec, aggregate, run_study

__all__ = ["ATTACKS", "ATTACK_LABELS", "DEFENSES", "EXTRACTION_ATTACKS", "PRESETS", "SPEC", "DivQATSpec",
           "ExtractionAttack", "StudyConfig", "aggregate", "cell_plan", "defense_warnings", "error_gains",
           "load_study_config", "preset_path", "run_study", "victim_names"]
