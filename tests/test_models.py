"""Model registry and shapes."""

import pytest
import torch

from qrobust.errors import ConfigError
from qrobust.models import build_model, model_names


@pytest.mark.parametrize("arch", ["lenet5", "convnet", "resnet8", "resnet20", "resnet18"])
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 43)])
def test_every_model_is_sized_from_the_data(arch, channels, size, classes):
    model = build_model(arch, channels=channels, num_classes=classes, image_size=(size, size)).eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, classes)


def test_normalisation_is_inside_forward():
    a = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28), mean=(0.5,), std=(0.25,))
    b = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28), mean=(0.0,), std=(1.0,))
    b.load_state_dict(a.state_dict() | {"normalize.mean": b.normalize.mean, "normalize.std": b.normalize.std})
    a.eval(), b.eval()
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(a(x), b((x - 0.5) / 0.25))


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError, match="resnet20") as err:
        build_model("vgg", channels=1, num_classes=10, image_size=(28, 28))
    assert "unknown model 'vgg'" in str(err.value)
    assert set(model_names()) == {"lenet5", "convnet", "resnet8", "resnet20", "resnet18"}


def test_bad_model_sizes_are_refused():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("convnet", channels=1, num_classes=1, image_size=(28, 28))
    with pytest.raises(ConfigError, match="too small"):
        build_model("convnet", channels=1, num_classes=10, image_size=(4, 4))
    with pytest.raises(ConfigError, match="one value per channel"):
        build_model("convnet", channels=3, num_classes=10, image_size=(32, 32), mean=(0.5,), std=(0.2,))


def test_model_registry_passes_architecture_settings(synthetic):
    from qrobust.models import model_for_data

    narrow = model_for_data("convnet", synthetic.info, width=8)
    assert narrow.body[0].conv.out_channels == 8 and narrow.body[2].conv.out_channels == 32
    assert model_for_data("convnet", synthetic.info).body[0].conv.out_channels == 32  # the default
    with pytest.raises(ConfigError, match="no setting width"):
        model_for_data("lenet5", synthetic.info, width=8)
    with pytest.raises(ConfigError, match="whole number"):
        model_for_data("convnet", synthetic.info, width=0)
