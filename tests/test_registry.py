"""Every named component is reachable by string, and unknown names list the valid ones."""

import pytest

from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS, DATASETS, DEFENSES, MODELS, OBJECTIVES, PATCH_ATTACKS


def test_builtin_components_are_registered_by_name():
    assert {"fgsm", "pgd", "apgd-ce"} <= set(ATTACKS.names())
    assert {"universal", "random"} <= set(PATCH_ATTACKS.names())
    assert {"knockoff", "dfme", "maze", "noise"} <= set(ATTACKS.names())
    assert {"none", "rs", "dcp", "round", "topk", "label", "mi-detector"} <= set(DEFENSES.names())
    assert {"ce", "mi-ensemble", "pbat", "dwq", "qadtr"} <= set(OBJECTIVES.names())
    assert {"convnet", "lenet5", "resnet8", "resnet20", "resnet18"} <= set(MODELS.names())
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "gtsrb", "synthetic"} <= set(DATASETS.names())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown attack 'cw'; choose one of: .*pgd"):
        ATTACKS.get("cw")
