"""`model_kwargs`: timm's further keyword arguments, kept in model.json and honoured wherever
a network is rebuilt (labelling, a student started from its teacher, evaluation, `predict`,
the MLflow logged model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from noisy_student import config
from noisy_student.data.ingest import FASHION_MNIST_CLASSES
from noisy_student.errors import UserError
from noisy_student.registry import tracking
from noisy_student.training import models
from tests.conftest import REPO, one_iteration

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMOKE = REPO / "pipeline_config" / "smoke.yaml"
NARROW = {"channels": [16, 16, 32, 64], "stem_width": 8}  # test_resnet's, halved


def _meta(**overrides) -> models.ModelMeta:
    fields = dict(
        model="test_resnet",
        num_classes=10,
        in_chans=1,
        class_names=FASHION_MNIST_CLASSES,
        height=28,
        width=28,
        mode="L",
    )
    return models.ModelMeta(**{**fields, **overrides})


MANIFEST = SimpleNamespace(
    num_classes=10, channels=1, class_names=FASHION_MNIST_CLASSES, height=28, width=28, mode="L"
)


def _parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_keyword_arguments_build_another_network_and_travel_in_model_json(tmp_path):
    torch.manual_seed(0)
    net = models.create("test_resnet", 10, 1, model_kwargs=NARROW).eval()
    assert _parameters(net) < _parameters(models.create("test_resnet", 10, 1)) / 2
    meta = models.ModelMeta.for_data("test_resnet", MANIFEST, net)
    assert meta.model_kwargs == NARROW
    url = models.save(net, meta, str(tmp_path / "ckpt"))
    loaded, loaded_meta = models.load(url)
    assert loaded_meta.model_kwargs == NARROW
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net(x))


def test_a_checkpoint_written_before_the_setting_existed_loads_with_timms_defaults(tmp_path):
    net = models.create("test_resnet", 10, 1)
    url = models.save(net, _meta(), str(tmp_path / "old"))
    meta = models.load_meta(url)
    assert meta.model_kwargs == {}
    models.load(url)  # the same network as before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chanels": [8, 8, 8, 8]}, r"students\.0\.model_kwargs: .*chanels: not a parameter of"),
        ({"channels": 3}, r"students\.0\.model_kwargs: .*test_resnet: model_kwargs: "),
    ],
)
def test_a_keyword_the_network_does_not_take_is_refused_naming_the_key(kwargs, message):
    with pytest.raises(UserError, match=message) as e:
        config.load(SMOKE, [f"students.0.model_kwargs={kwargs}"])
    assert "\n" not in str(e.value)


def test_a_student_started_from_its_teacher_is_built_with_the_teachers_keyword_arguments(
    tmp_path,
):
    teacher = models.create("test_resnet", 10, 1, model_kwargs=NARROW)
    url = models.save(
        teacher, models.ModelMeta.for_data("test_resnet", MANIFEST, teacher), str(tmp_path / "t")
    )
    started = models.student_options("students.0", None, True, url)
    assert started["options"].model_kwargs == NARROW
    student = models.create("test_resnet", 10, 1, **started)
    student.load_state_dict(models.load_state(url))  # the same shapes
    # from scratch, a student is built with its own
    assert models.student_options("students.0", None, False, url)["model_kwargs"] == {}
    with pytest.raises(UserError, match=r"^students\.0\.model_kwargs: .* built with"):
        models.student_options("students.0", None, True, url, {"stem_width": 4})


@pytest.mark.slow  # teacher, labelling, a student from it, MLflow's logged model: ~20 s
def test_every_stage_and_predict_rebuild_the_network_with_its_keyword_arguments(
    tiny_dataset, tmp_path, mlflow_uri, capsys
):
    cfg = config.load(
        SMOKE,
        [
            "teacher.epochs=1",
            f"teacher.model_kwargs={NARROW}",
            "students.0.epochs=1",
            "students.0.init_from_teacher=true",
        ],
    )
    teacher, student = one_iteration(cfg, tiny_dataset, tmp_path, "kwargs-test")
    assert models.load_meta(teacher.url).model_kwargs == NARROW
    assert models.load_meta(student.url).model_kwargs == NARROW
    # the student's run shows its noise: labelled images clean and noised
    picture = tracking.client().download_artifacts(student.mlflow_run_id, "noise.png", tmp_path)
    assert Image.open(picture).size[0] > 8 * 28

    image = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(image)
    cli.main(["predict", str(image), "--model", student.url])
    from_checkpoint = capsys.readouterr().out
    cli.main(["predict", str(image), "--model", student.mlflow_run_id])  # the logged model
    assert capsys.readouterr().out == from_checkpoint
