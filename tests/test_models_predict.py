"""Checkpoints (safetensors + timm config), offline pretrained weights, and `predict`."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cli
from noisy_student import stages
from noisy_student.data import storage
from noisy_student.data.ingest import FASHION_MNIST_CLASSES
from noisy_student.errors import UserError
from noisy_student.registry import model_ref, predict, tracking
from noisy_student.training import models

pytestmark = pytest.mark.usefixtures("torch_one_thread")


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


@pytest.fixture()
def checkpoint(tmp_path) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = models.create("test_resnet", 10, 1).eval()
    url = models.save(model, _meta(), str(tmp_path / "ckpt"))
    return url, model


@pytest.fixture()
def png(tmp_path) -> str:
    """An RGB image of another size than the model's: predict converts and resizes it."""
    path = tmp_path / "shirt.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
    return str(path)


# --- checkpoints


def test_saved_checkpoint_loads_back_to_identical_outputs(checkpoint):
    url, model = checkpoint
    loaded, meta = models.load(url)
    assert meta == _meta()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_checkpoint_weights_are_plain_safetensors(checkpoint):
    url, model = checkpoint
    assert sorted(os.listdir(url)) == [models.META, models.WEIGHTS]
    state = load_file(os.path.join(url, models.WEIGHTS))  # would fail on a pickle
    assert state.keys() == model.state_dict().keys()


class _Exploit:
    """Unpickling this creates a file: what a pickled checkpoint could do to its reader."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_a_checkpoint_never_unpickles(checkpoint, tmp_path):
    url, _ = checkpoint
    marker = tmp_path / "pwned"
    with open(os.path.join(url, models.WEIGHTS), "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        models.load(url)
    assert not marker.exists()


def test_folder_without_model_json_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint here \(model\.json missing\)"):
        models.load(str(tmp_path))


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown timm model 'resnet9000'"):
        models.create("resnet9000", 10, 1)


# --- pretrained weights from a local or remote file, never the hub


@pytest.fixture(scope="module")
def imagenet_like_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A resnet10t state dict as a hub checkpoint would hold it: RGB input, 1000 classes."""
    torch.manual_seed(1)
    state = timm.create_model("resnet10t", num_classes=1000, in_chans=3).state_dict()
    path = str(tmp_path_factory.mktemp("weights") / "resnet10t.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, state


def _check_adapted(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    # the RGB stem is summed over channels for one grey channel
    torch.testing.assert_close(got["conv1.0.weight"], state["conv1.0.weight"].sum(1, keepdim=True))
    # deep layers are taken as they are
    torch.testing.assert_close(got["layer4.0.conv2.weight"], state["layer4.0.conv2.weight"])
    # the 1000-way classifier is dropped for a fresh 10-way one
    assert got["fc.weight"].shape == (10, state["fc.weight"].shape[1])


def test_pretrained_weights_load_from_a_local_file_adapting_channels_and_classes(
    imagenet_like_weights, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub download would fail, not pass silently
    path, state = imagenet_like_weights
    model = models.create("resnet10t", 10, 1, pretrained=True, checkpoint=path)
    _check_adapted(model, state)


def test_pretrained_weights_load_from_a_pytorch_file(imagenet_like_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, state = imagenet_like_weights
    path = str(tmp_path / "resnet10t.pth")
    torch.save(state, path)
    _check_adapted(models.create("resnet10t", 10, 1, pretrained=True, checkpoint=path), state)


def test_pretrained_weights_load_from_s3(imagenet_like_weights, s3_endpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, state = imagenet_like_weights
    url = "s3://ns-test/weights/resnet10t.safetensors"
    with open(path, "rb") as f:
        storage.write_bytes(url, f.read())
    _check_adapted(models.create("resnet10t", 10, 1, pretrained=True, checkpoint=url), state)


def test_missing_pretrained_checkpoint_is_a_user_error(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match=re.escape(f"{missing}: pretrained checkpoint not found")):
        models.create("resnet10t", 10, 1, pretrained=True, checkpoint=missing)


# --- predict


def _ranked(out: str) -> list[tuple[str, float]]:
    """`  1. Trouser               12.34%` lines -> [(name, percent)]."""
    lines = re.findall(r"^\s+(\d)\. (.+?)\s+([\d.]+)%$", out, re.M)
    assert [int(r) for r, _, _ in lines] == list(range(1, len(lines) + 1))
    return [(name, float(p)) for _, name, p in lines]


def _check_top5(out: str, image: str) -> None:
    assert out.splitlines()[0] == image
    ranked = _ranked(out)
    assert len(ranked) == 5
    names = [n for n, _ in ranked]
    assert len(set(names)) == 5 and set(names) <= set(FASHION_MNIST_CLASSES)
    percents = [p for _, p in ranked]
    assert percents == sorted(percents, reverse=True)
    assert 0 < sum(percents) <= 100.0 + 0.05  # 5 of 10 classes, each rounded to 0.01


def test_predict_prints_top_five_classes_from_a_checkpoint_folder(checkpoint, png, capsys):
    url, _ = checkpoint
    cli.main(["predict", png, "--model", url])
    _check_top5(capsys.readouterr().out, png)


def test_predict_accepts_the_weights_file_itself(checkpoint, png, capsys):
    url, _ = checkpoint
    cli.main(["predict", png, "--model", os.path.join(url, models.WEIGHTS), "--top-k", "2"])
    assert len(_ranked(capsys.readouterr().out)) == 2


def test_predict_agrees_with_the_model_on_the_same_pixels(checkpoint, tmp_path):
    from noisy_student.registry import predict
    from noisy_student.training import engine

    url, model = checkpoint
    arr = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    path = str(tmp_path / "grey.png")
    Image.fromarray(arr).save(path)
    loaded, meta = predict.load_model(url)
    top = predict.top_k(loaded, meta, path, k=10)
    probs = engine.predict_probs(model, torch.from_numpy(arr)[None, None], 1)[0]
    assert top[0][0] == FASHION_MNIST_CLASSES[int(probs.argmax())]
    assert top[0][1] == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_with_an_unknown_model_reference_exits_2(png, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", png, "--model", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    assert "not an MLflow run id, registered model or checkpoint" in capsys.readouterr().err


def test_predict_on_a_corrupt_image_exits_2_naming_it(checkpoint, tmp_path, capsys):
    url, _ = checkpoint
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", str(bad), "--model", url])
    assert exc.value.code == 2
    assert f"error: {bad}: corrupt image" in capsys.readouterr().err


def _logged_run(checkpoint_url: str) -> str:
    run_id = tracking.start_run("ns-unit", "teacher-1")
    tracking.log_checkpoint(run_id, checkpoint_url)
    tracking.end_run(run_id)
    return run_id


@pytest.mark.slow  # logs a model to MLflow: 10 s
def test_predict_by_mlflow_run_id(checkpoint, png, mlflow_uri, capsys):
    run_id = _logged_run(checkpoint[0])
    cli.main(["predict", png, "--model", run_id])
    _check_top5(capsys.readouterr().out, png)
    cli.main(["predict", png, "--model", f"runs:/{run_id}/model"])
    _check_top5(capsys.readouterr().out, png)


@pytest.mark.slow  # registers a model in MLflow: 7 s
def test_predict_by_registered_model_version(checkpoint, png, mlflow_uri, capsys):
    run_id = _logged_run(checkpoint[0])
    assert str(tracking.register(run_id, "ns-test")) == "1"
    cli.main(["predict", png, "--model", "models:/ns-test/1"])
    _check_top5(capsys.readouterr().out, png)
    cli.main(["predict", png, "--model", "models:/ns-test"])  # latest version
    _check_top5(capsys.readouterr().out, png)


def test_a_checkpoint_with_broken_weights_fails_in_one_line(checkpoint, tmp_path, capsys):
    import shutil

    checkpoint, _ = checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / models.WEIGHTS).write_bytes(b"not safetensors")
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(png), "--model", str(broken)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {broken / models.WEIGHTS}: not a valid safetensors file")


# --- predict with a timm model by name, as its model card does


@pytest.fixture(scope="module")
def noisy_student_b0(tmp_path_factory) -> str:
    """tf_efficientnet_b0.ns_jft_in1k's architecture with random weights, as a file: the
    hub's weights are out of reach here, and any weights of the right shapes will do."""
    torch.manual_seed(3)
    net = timm.create_model("tf_efficientnet_b0.ns_jft_in1k", pretrained=False)
    path = str(tmp_path_factory.mktemp("b0") / "b0.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture()
def photo(tmp_path) -> str:
    """A non-square RGB photo: timm's eval resizes its short side and crops the centre."""
    path = tmp_path / "dog.jpg"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (300, 400, 3), np.uint8)).save(path)
    return str(path)


def test_predict_a_timm_model_by_name_prints_imagenet_classes(noisy_student_b0, photo, capsys):
    from timm.data import ImageNetInfo

    cli.main(
        ["predict", photo, "--model", "timm:tf_efficientnet_b0.ns_jft_in1k"]
        + ["--checkpoint", noisy_student_b0]
    )
    out = capsys.readouterr().out
    ranked = _ranked(out)
    assert out.splitlines()[0] == photo and len(ranked) == 5
    imagenet = {d.split(",")[0] for d in ImageNetInfo().label_descriptions()}
    assert {n for n, _ in ranked} <= imagenet


def test_a_timm_model_sees_the_photo_as_timms_own_eval_transform_gives_it(noisy_student_b0, photo):

    net, meta = predict.load_timm("tf_efficientnet_b0.ns_jft_in1k", noisy_student_b0)
    assert (meta.height, meta.width, meta.crop_pct, meta.interpolation) == (
        224,
        224,
        0.875,
        "bicubic",
    )
    got = dict(predict.top_k(net, meta, photo, k=1000))

    plain = timm.create_model("tf_efficientnet_b0.ns_jft_in1k", pretrained=False).eval()
    plain.load_state_dict(load_file(noisy_student_b0))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=plain))
    with torch.no_grad():
        expected = plain(transform(Image.open(photo).convert("RGB"))[None]).softmax(1)[0]
    top = expected.topk(5)
    for p, i in zip(top.values, top.indices.tolist(), strict=True):
        assert got[meta.class_names[i]] == pytest.approx(float(p), abs=1e-4)


def test_a_timm_model_loads_its_weights_from_a_pytorch_file(tmp_path, photo):

    torch.manual_seed(5)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    path = str(tmp_path / "resnet10t.pth")
    torch.save(state, path)
    net, meta = predict.load_timm("resnet10t", path)
    torch.testing.assert_close(net.state_dict()["fc.weight"], state["fc.weight"])
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and len(meta.class_names) == 1000
    assert len(predict.top_k(net, meta, photo)) == 5


def test_a_timm_model_without_reachable_weights_exits_2_saying_what_to_do(
    photo, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", photo, "--model", "timm:resnet10t.a1_in1k"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resnet10t.a1_in1k: timm's hub: ") and "checkpoint" in err
    with pytest.raises(SystemExit):
        cli.main(["predict", photo, "--model", "timm:resnet9000"])
    assert "unknown timm model 'resnet9000'" in capsys.readouterr().err


def test_weights_of_another_architecture_exit_2_naming_the_file(noisy_student_b0, photo, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", photo, "--model", "timm:resnet10t", "--checkpoint", noisy_student_b0])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: resnet10t: {noisy_student_b0}: ")


def test_checkpoint_is_refused_for_a_pipeline_model(checkpoint, png, capsys):
    url, _ = checkpoint
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", png, "--model", url, "--checkpoint", "w.pth"])
    assert exc.value.code == 2
    assert "--checkpoint is for --model timm:NAME" in capsys.readouterr().err


RUN = "0123456789abcdef0123456789abcdef"
Ref = model_ref.ModelRef


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("champion", Ref("champion")),
        ("models:/ns", Ref("registered", name="ns")),
        ("models:/ns/3", Ref("registered", name="ns", version="3")),
        ("models:/ns@champion", Ref("registered", name="ns", alias="champion")),
        (RUN, Ref("run", run_id=RUN)),
        (f"runs:/{RUN}/model", Ref("run", run_id=RUN)),
        ("timm:resnet10t.a1_in1k", Ref("timm", name="resnet10t.a1_in1k")),
        (
            "s3://b/run/iteration-1/student/",
            Ref("checkpoint", url="s3://b/run/iteration-1/student"),
        ),
        ("s3://b/student/model.safetensors", Ref("checkpoint", url="s3://b/student")),
        ("runs/x/student/model.json", Ref("checkpoint", url=os.path.abspath("runs/x/student"))),
        ("0123456789ABCDEF", Ref("checkpoint", url=os.path.abspath("0123456789ABCDEF"))),
    ],
)
def test_one_parser_reads_every_model_reference(ref, expected):
    assert model_ref.parse(ref) == expected


def test_a_timm_model_is_no_teacher(mlflow_uri):
    with pytest.raises(UserError, match="teacher timm:resnet10t: a teacher is a model trained"):
        stages.existing_teacher("timm:resnet10t", "ns-test")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("models:/nobody", "registered model 'nobody' has no versions"),
        ("models:/nobody/3", "nobody"),
        ("models:/nobody@champion", "nobody"),
    ],
)
def test_a_registered_model_that_is_not_there_fails_in_one_line_for_predict_and_teacher(
    ref, message, mlflow_uri
):
    """One resolver reads a reference for `predict --model` and for `run --teacher`."""
    for asked_for, resolve in (
        ("--model", lambda: predict.load_model(ref)),
        ("teacher", lambda: stages.existing_teacher(ref, "ns-test")),
    ):
        with pytest.raises(UserError, match=f"^{asked_for} {ref}: .*{message}"):
            resolve()


def test_a_run_without_a_model_fails_in_one_line(mlflow_uri):
    run_id = tracking.start_run("ns-unit", "no-model")
    tracking.end_run(run_id)
    with pytest.raises(UserError, match=f"--model {run_id}: no model in MLflow run {run_id}"):
        predict.load_model(run_id)


def test_a_registry_failure_that_is_not_mlflows_is_not_hidden(mlflow_uri, monkeypatch):
    """Only MLflow's own exceptions become a one-line error; a bug keeps its traceback."""

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(tracking, "registered_run_id", broken)
    with pytest.raises(TypeError, match="a bug"):
        model_ref.checkpoint_url("models:/ns-test/1", "--model")
