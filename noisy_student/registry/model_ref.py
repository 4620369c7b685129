"""How a model is named wherever one is asked for (`predict --model`, `run --teacher`).

champion                 the registered model's version under the alias `champion`
models:/NAME             a registered model's latest version
models:/NAME/VERSION     ... that version
models:/NAME@ALIAS       ... the version under that alias
RUN_ID, runs:/RUN_ID/... the model logged by that MLflow run (32 hex digits)
timm:NAME                a timm model with its pretrained weights
anything else            a checkpoint folder at a path or URL (or its model files)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mlflow.exceptions import MlflowException

from noisy_student.data import storage
from noisy_student.errors import UserError
from noisy_student.registry import tracking
from noisy_student.training.models import META, WEIGHTS

CHAMPION = "champion"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TIMM, REGISTERED, RUNS = "timm:", "models:/", "runs:/"

Kind = Literal["champion", "registered", "run", "timm", "checkpoint"]


@dataclass(frozen=True)
class ModelRef:
    kind: Kind
    name: str = ""  # a registered model's (registered) or timm's (timm)
    version: str | None = None  # registered: one version, else the alias or the latest
    alias: str | None = None
    run_id: str = ""  # run
    url: str = ""  # checkpoint: the folder, local paths made absolute


def parse(ref: str) -> ModelRef:
    if ref == CHAMPION:
        return ModelRef(CHAMPION)
    if ref.startswith(TIMM):
        return ModelRef("timm", name=ref.removeprefix(TIMM))
    if ref.startswith(REGISTERED):
        name = ref.removeprefix(REGISTERED)
        if "@" in name:
            name, alias = name.split("@", 1)
            return ModelRef("registered", name=name, alias=alias)
        if "/" in name:
            name, version = name.split("/", 1)
            return ModelRef("registered", name=name, version=version)
        return ModelRef("registered", name=name)
    run = ref.removeprefix(RUNS).split("/")[0] if ref.startswith(RUNS) else ref
    if RUN_ID.match(run):
        return ModelRef("run", run_id=run)
    url = storage.resolve(ref)
    if url.endswith((WEIGHTS, META)):
        url = url.rsplit("/", 1)[0]
    return ModelRef("checkpoint", url=url)


def run_id(ref: str, parsed: ModelRef, asked_for: str) -> str:
    """The MLflow run behind a `registered` or `run` reference; `asked_for` names what the
    reference was given as (`--model`, `teacher`) in the one-line error."""
    if parsed.kind == "run":
        return parsed.run_id
    try:
        return tracking.registered_run_id(parsed.name, parsed.version, parsed.alias)
    except MlflowException as e:  # no such model, version or alias; the registry refused
        raise UserError(f"{asked_for} {ref}: {e.message}") from None


def checkpoint_url(ref: str, asked_for: str) -> str:
    """A checkpoint folder for a model reference: an MLflow run's logged model (a copy of
    its `model/` artifacts), a registered model's version, or a stage's checkpoint URL."""
    parsed = parse(ref)
    if parsed.kind in ("registered", "run"):
        found = run_id(ref, parsed, asked_for)
        try:
            return tracking.download_model(found)
        except (MlflowException, OSError) as e:  # no such run, or no model/ in it
            raise UserError(f"{asked_for} {ref}: no model in MLflow run {found} ({e})") from None
    if parsed.kind != "checkpoint" or not storage.exists(storage.join(parsed.url, META)):
        raise UserError(f"{asked_for} {ref}: not an MLflow run id, registered model or checkpoint")
    return parsed.url
