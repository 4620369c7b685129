"""Stems that fit small images and pretrained weights fed as they were trained: built by
`models.create`, recorded in model.json, rebuilt the same way by every stage."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from noisy_student import config
from noisy_student.data.ingest import FASHION_MNIST_CLASSES
from noisy_student.errors import UserError
from noisy_student.training import augment, models
from tests.conftest import one_iteration

pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = Path(__file__).resolve().parent.parent

# side of the feature map before pooling, for a 32 px input: imagenet, half, stride1
FAMILIES = {
    "test_resnet": (1, 2, 4),  # ResNet, deep stem (conv1 a Sequential) + max-pool
    "resnet10t": (1, 2, 4),  # ResNet-T
    "resnet18d": (1, 2, 4),  # ResNet-D
    "test_efficientnet": (1, 2, 2),  # one stride-2 stem convolution, no pool
    "mobilenetv3_small_050": (1, 2, 2),
    "regnetx_002": (1, 2, 2),
    "test_convnext": (1, 2, 4),  # 4x4 patches at stride 4
}


def _meta(name: str, **fields) -> models.ModelMeta:
    return models.ModelMeta(name, 10, 1, FASHION_MNIST_CLASSES, 32, 32, "L", **fields)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_stem_keeps_the_output_and_enlarges_the_map_before_pooling(name):
    x = torch.randn(2, 1, 32, 32)
    for stem, side in zip(models.STEMS, FAMILIES[name], strict=True):
        torch.manual_seed(0)
        net = models.create(name, 10, 1, stem=stem).eval()
        with torch.no_grad():
            assert net(x).shape == (2, 10)
            assert net.forward_features(x).shape[-2:] == (side, side), stem


def test_a_stem_changes_no_weight_shape_so_pretrained_weights_load_into_it(tmp_path):
    torch.manual_seed(1)
    state = timm.create_model("resnet10t", num_classes=1000, in_chans=3).state_dict()
    path = str(tmp_path / "resnet10t.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    net = models.create("resnet10t", 10, 1, pretrained=True, checkpoint=path, stem="stride1")
    got = net.state_dict()
    torch.testing.assert_close(got["layer4.0.conv2.weight"], state["layer4.0.conv2.weight"])
    assert net.conv1[0].stride == (1, 1)
    assert models.options_of(net).stem == "stride1"


def test_a_family_without_a_known_stem_is_a_user_error_naming_the_option():
    with pytest.raises(UserError, match=r"^stem: half: not available for test_vit"):
        models.create("test_vit", 10, 1, stem="half")
    models.create("test_vit", 10, 1)  # timm's own stem works for every model
    assert models.has_stem("test_vit", "imagenet") and not models.has_stem("test_vit", "half")


@pytest.mark.parametrize("name", FAMILIES)
def test_has_stem_says_yes_for_every_stem_of_the_families_create_builds(name):
    assert all(models.has_stem(name, stem) for stem in models.STEMS)


def test_a_typo_in_the_stem_fails_with_its_config_key():
    with pytest.raises(UserError, match=r"teacher\.stem: Input should be 'imagenet'"):
        config.load(REPO / "pipeline_config/smoke.yaml", ["teacher.stem=half_"])


def test_the_stem_is_in_model_json_and_load_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    net = models.create("test_resnet", 10, 1, stem="half").eval()
    url = models.save(net, _meta("test_resnet", stem="half"), str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / models.META).read_text())["stem"] == "half"
    loaded, meta = models.load(url)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert loaded.eval().forward_features(x).shape[-2:] == (2, 2)
        torch.testing.assert_close(loaded(x), net(x))
    assert meta.options == models.options_of(loaded)


def test_a_checkpoint_written_before_stems_existed_loads_with_timms_stem(tmp_path):
    net = models.create("test_resnet", 10, 1)
    url = models.save(net, _meta("test_resnet"), str(tmp_path / "old"))
    meta_file = tmp_path / "old" / models.META
    old = {
        k: v
        for k, v in json.loads(meta_file.read_text()).items()
        if k not in ("stem", "mean", "std", "interpolation", "crop_pct")
    }
    meta_file.write_text(json.dumps(old))
    loaded, meta = models.load(url)
    assert (meta.stem, meta.mean, meta.std) == ("imagenet", (0.5,), (0.5,))
    assert not loaded._forward_pre_hooks  # the [-1, 1] input as it always was


# --- normalisation of pretrained weights


def test_pretrained_weights_see_their_own_mean_and_std(tmp_path):
    torch.manual_seed(2)
    state = timm.create_model("resnet10t", num_classes=1000, in_chans=3).state_dict()
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    net = models.create("resnet10t", 1000, 3, pretrained=True, checkpoint=path).eval()
    options = models.options_of(net)
    assert options.mean == pytest.approx((0.485, 0.456, 0.406))
    assert options.std == pytest.approx((0.229, 0.224, 0.225))
    assert options.interpolation == "bicubic"

    plain = timm.create_model("resnet10t", num_classes=1000, in_chans=3).eval()
    plain.load_state_dict(state)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(options.mean).view(1, 3, 1, 1)
    std = torch.tensor(options.std).view(1, 3, 1, 1)
    with torch.no_grad():
        # what timm's ToTensor + Normalize would hand the network
        expected = plain((pixels / 255 - mean) / std)
        torch.testing.assert_close(net(augment.to_float(pixels)), expected, rtol=1e-4, atol=1e-4)
        # the EMA copy of the training loop and a loaded checkpoint normalise the same way
        torch.testing.assert_close(copy.deepcopy(net)(augment.to_float(pixels)), expected)
    url = models.save(
        net, models.ModelMeta.for_data("resnet10t", _Manifest(3), net), str(tmp_path / "c")
    )
    loaded, meta = models.load(url)
    assert meta.mean == options.mean and meta.interpolation == "bicubic"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(augment.to_float(pixels)), expected)


class _Manifest:
    def __init__(self, channels: int):
        self.num_classes, self.channels, self.class_names = (
            1000,
            channels,
            [str(i) for i in range(1000)],
        )
        self.height = self.width = 32
        self.mode = "RGB" if channels == 3 else "L"


def test_grey_images_with_rgb_weights_use_the_channels_average_mean_and_std(tmp_path):
    state = timm.create_model("resnet10t", num_classes=1000, in_chans=3).state_dict()
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    net = models.create("resnet10t", 10, 1, pretrained=True, checkpoint=path)
    options = models.options_of(net)
    assert options.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert options.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    assert net.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_a_network_without_pretrained_weights_sees_the_input_unchanged():
    from noisy_student.training.small_maps import plain_convolutions

    torch.manual_seed(0)
    with plain_convolutions():
        net = models.create("resnet10t", 10, 1).eval()
    assert not net._forward_pre_hooks
    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))  # bit-identical: the default runs did not move
        # with the convolutions on small maps (the default): the same up to float rounding
        fast = models.create("resnet10t", 10, 1).eval()
        fast.load_state_dict(net.state_dict())
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


# --- students


def test_a_student_takes_its_teachers_stem_unless_it_names_its_own(tmp_path):
    teacher = models.create("test_resnet", 10, 1, stem="half")
    url = models.save(teacher, _meta("test_resnet", stem="half"), str(tmp_path / "t"))
    own = {"model_kwargs": {}}
    assert models.student_options("students.0", None, False, url) == {"stem": "half", **own}
    assert models.student_options("students.0", "stride1", False, url) == {
        "stem": "stride1",
        **own,
    }
    # started from the teacher's weights: built and fed exactly as the teacher
    same = models.student_options("students.0", None, True, url)
    assert same == {"options": models.Options(stem="half")}
    # ... but for a stem of its own: the weights keep their shapes
    own_stem = models.student_options("students.0", "stride1", True, url)
    assert own_stem == {"options": models.Options(stem="stride1")}
    student = models.create("test_resnet", 10, 1, **own_stem)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        maps = student.forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:]
        assert maps != teacher.forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:]


@pytest.mark.slow  # teacher and student stages with MLflow: 14 s
def test_teacher_and_student_stages_record_the_stem_and_label_with_it(
    tiny_dataset, tmp_path, mlflow_uri
):
    cfg = config.load(
        REPO / "pipeline_config/smoke.yaml",
        ["teacher.epochs=1", "teacher.stem=half", "students.0.epochs=1"],
    )
    teacher, student = one_iteration(cfg, tiny_dataset, tmp_path, "stem-test")
    assert models.load_meta(teacher.url).stem == "half"
    meta = models.load_meta(student.url)
    assert meta.stem == "half"  # students.0.stem is null: the teacher's
    net, _ = models.load(student.url)
    with torch.no_grad():
        assert net.eval().forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:] == (2, 2)
    assert re.fullmatch(r"[0-9a-f]{32}", student.mlflow_run_id)
