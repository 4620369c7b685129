"""Training state on storage, so that a killed training run picks up where it stopped.

A state is two files: `state-<step>.safetensors` with every tensor (weights, optimizer
buffers, averaged weights, random generator states) and `state.json`, written last, with
the rest (step, epoch, scheduler, index streams, history) and the name and SHA-256 of
the tensor file. Loading parses JSON and safetensors only: it runs no code, unlike a
pickled `torch.save` file. A killed save leaves either the previous `state.json` (still
pointing at its own tensor file) or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from noisy_student.data import faults, storage
from noisy_student.errors import UserError

STATE = "state.json"


def _at(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def pack(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-ready copy of `tree` with each tensor moved into `tensors` under its path."""
    if isinstance(tree, torch.Tensor):
        # clone: safetensors refuses tensors sharing memory, and a view may
        tensors[path] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: pack(v, tensors, _at(path, k)) for k, v in tree.items()}
        # optimizer state is keyed by parameter index: keep the keys' types
        return {"__items__": [[k, pack(v, tensors, _at(path, k))] for k, v in tree.items()]}
    if isinstance(tree, list | tuple):
        return [pack(v, tensors, _at(path, i)) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"{path}: cannot store a {type(tree).__name__} in a training state")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: unpack(v, tensors) for k, v in tree["__items__"]}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


class TrainingState:
    """Where one training run keeps its state: `url` is a folder of its own.

    `fingerprint` says what the run is (schedule, seed, data sizes): a state saved by a
    run with another fingerprint is ignored, so a changed config starts afresh.
    The state is saved at the end of an epoch when `min_seconds` have passed since the
    last save (so that a hundred short epochs do not write a hundred states), every
    `every_steps` steps when set, and after the last step. `label` names the kill points.
    """

    def __init__(
        self,
        url: str,
        fingerprint: dict[str, Any],
        every_steps: int | None = None,
        label: str = "",
        min_seconds: float = 0.0,
    ):
        self.url = url
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.every_steps = every_steps
        self.label = label
        self.min_seconds = min_seconds
        self._last_save = time.monotonic()

    def maybe_save(
        self, snapshot: Callable[[], dict[str, Any]], step: int, epoch_end: bool, last: bool
    ) -> bool:
        """Save when one of the rules above says so; returns whether it did."""
        due = (
            last
            or (bool(self.every_steps) and step % self.every_steps == 0)
            or (epoch_end and time.monotonic() - self._last_save >= self.min_seconds)
        )
        if due:
            self.save(snapshot(), step)
            self._last_save = time.monotonic()
        return due

    def load(self) -> dict[str, Any] | None:
        state_url = storage.join(self.url, STATE)
        if not storage.exists(state_url):
            return None
        head = storage.read_json(state_url)
        if head.get("fingerprint") != self.fingerprint:
            return None
        tensors_url = storage.join(self.url, head["file"])
        data = storage.read_verified(tensors_url, head["sha256"], state_url)
        try:
            tensors = load_safetensors(data)
        except SafetensorError as e:
            raise UserError(f"{tensors_url}: not a valid safetensors file ({e})") from None
        return unpack(head["state"], tensors)

    def save(self, state: dict[str, Any], step: int) -> None:
        tensors: dict[str, torch.Tensor] = {}
        tree = pack(state, tensors)
        data = save_safetensors(tensors)
        name = f"state-{step:09d}.safetensors"
        state_url = storage.join(self.url, STATE)
        previous = storage.read_json(state_url)["file"] if storage.exists(state_url) else None
        storage.write_bytes(storage.join(self.url, name), data)
        storage.write_json(
            state_url,
            {
                "step": step,
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "fingerprint": self.fingerprint,
                "state": tree,
            },
        )
        if previous and previous != name:
            storage.remove(storage.join(self.url, previous))

    def kill_point(self, what: str) -> None:
        faults.kill_point(f"{self.label}:{what}")
