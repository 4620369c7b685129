"""Training state: saved without pickles, and a resumed run ends exactly where an
uninterrupted one does (same seed, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from noisy_student.data import storage, training_data
from noisy_student.errors import UserError
from noisy_student.training import augment, engine, models
from noisy_student.training.training_state import STATE, TrainingState, pack, unpack
from tests.conftest import noise, schedule

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Interrupted(Exception):
    pass


class StopsAt(TrainingState):
    """A training state whose run is interrupted (as by a crash) after a given step."""

    def __init__(self, *args, stop_at: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def kill_point(self, what: str) -> None:
        if what == self.stop_at:
            raise Interrupted(what)


def _data(n: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = (torch.rand(n, 1, 16, 16, generator=g) * 60 + labels.view(-1, 1, 1, 1) * 80).to(
        torch.uint8
    )
    return images, labels


def _fit(averaging: str, state: TrainingState | None) -> engine.FitResult:
    x, y = _data(24, 0)
    px, py = _data(40, 1)
    ex, ey = _data(30, 2)
    soft_targets = torch.softmax(torch.randn(40, 3, generator=torch.Generator().manual_seed(4)), 1)
    torch.manual_seed(0)
    model = models.create("test_resnet", 3, 1, drop_rate=0.3, drop_path_rate=0.1)
    return engine.fit(
        model,
        training_data.TensorRows(x, engine.one_hot(y, 3)),
        schedule(
            epochs=3,
            batch_size=4,
            lr=0.05,
            warmup_epochs=0.5,
            weight_averaging=averaging,
            ema_decay=0.9,
            swa_start=0.5,
            unlabelled_ratio=2.0,
            precision="fp32",
        ),
        # every source of randomness: crops, flips, RandAugment, dropout, drop path
        noise(rand_augment=augment.RandAugment.for_image(16, 16)),
        seed=3,
        pseudo=training_data.TensorRows(px, soft_targets),
        evaluation=training_data.TensorBatches(ex, ey),
        state=state,
    )


def _figures(result: engine.FitResult) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "images_per_second"} for h in result.history]


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_training_resumed_after_a_crash_ends_with_the_same_weights_and_figures(averaging, tmp_path):
    whole = _fit(averaging, None)
    # 40 pseudo-labelled images, 8 per step: 5 steps per epoch, 15 in all; saves after
    # every epoch and every 3 steps, so a crash after step 8 resumes from step 6
    url = str(tmp_path / "state")
    fingerprint = {"test": averaging}
    with pytest.raises(Interrupted):
        _fit(averaging, StopsAt(url, fingerprint, every_steps=3, stop_at="step=8"))
    resumed = _fit(averaging, TrainingState(url, fingerprint, every_steps=3))

    assert resumed.resumed_from_step == 6 and resumed.steps == whole.steps == 15
    assert _figures(resumed) == _figures(whole)
    assert resumed.final_accuracy == whole.final_accuracy
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_again_trains_nothing_and_returns_the_same_model(tmp_path):
    url = str(tmp_path / "state")
    first = _fit("ema", TrainingState(url, {"run": 1}))
    again = _fit("ema", TrainingState(url, {"run": 1}))
    assert again.resumed_from_step == again.steps == 15
    assert again.final_accuracy == first.final_accuracy
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_saved_by_another_config_is_ignored(tmp_path):
    url = str(tmp_path / "state")
    with pytest.raises(Interrupted):
        _fit("ema", StopsAt(url, {"lr": 0.05}, stop_at="epoch=1", min_seconds=0))
    assert _fit("ema", TrainingState(url, {"lr": 0.1})).resumed_from_step == 0


def test_state_is_json_and_safetensors_only_and_keeps_one_tensor_file(tmp_path):
    url = str(tmp_path / "state")
    with pytest.raises(Interrupted):
        _fit("ema", StopsAt(url, {"run": 1}, stop_at="epoch=2", min_seconds=0))
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["state-000000010.safetensors", STATE]
    head = json.loads((tmp_path / "state" / STATE).read_text())
    assert head["step"] == 10 and head["file"] == files[0]
    # the tensor file is safetensors (an 8-byte header length, then a JSON header naming
    # every tensor), not a pickle: reading it cannot run code
    raw = (tmp_path / "state" / files[0]).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    for part in ("model.", "optimizer.", "averaged.", "rng.torch", "rng.noise"):
        assert any(k.startswith(part) for k in header), part


def test_a_tampered_state_file_is_refused_naming_it(tmp_path):
    url = str(tmp_path / "state")
    state = TrainingState(url, {"run": 1})
    state.save({"w": torch.ones(3)}, 1)
    path = tmp_path / "state" / "state-000000001.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match=f"{path}: checksum does not match"):
        state.load()


def test_pack_keeps_nested_structure_and_integer_keys():
    tree = {
        "step": 7,
        "opt": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "groups": [{"lr": 0.1}]},
        "rng": [torch.tensor([1, 2], dtype=torch.uint8)],
        "none": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    packed = json.loads(json.dumps(pack(tree, tensors)))
    back = unpack(packed, tensors)
    assert back["step"] == 7 and back["none"] is None
    assert list(back["opt"]["state"]) == [0]
    assert torch.equal(back["opt"]["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["rng"][0].dtype == torch.uint8
    with pytest.raises(TypeError, match="cannot store a set"):
        pack({"x": {1, 2}}, {})


def test_nothing_saved_yet_means_training_from_the_start(tmp_path):
    assert TrainingState(storage.join(str(tmp_path), "a", "b"), {}).load() is None


def test_epoch_end_saves_wait_for_min_seconds_but_the_last_step_is_always_saved(tmp_path):
    url = str(tmp_path / "state")
    with pytest.raises(Interrupted):
        _fit("ema", StopsAt(url, {"run": 1}, stop_at="epoch=2", min_seconds=1e9))
    assert TrainingState(url, {"run": 1}).load() is None  # two short epochs: nothing saved
    _fit("ema", TrainingState(url, {"run": 1}, min_seconds=1e9))
    assert TrainingState(url, {"run": 1}).load()["step"] == 15
