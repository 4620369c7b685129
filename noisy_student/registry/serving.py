"""A trained model as an MLflow pyfunc: what `mlflow.pyfunc.load_model` and `mlflow models
serve` run.

The logged model holds the checkpoint files themselves (`model.safetensors`, `model.json`)
as its artifact `checkpoint`, and is made "from code" (`pyfunc_model.py`, which builds
an `ImageClassifier`): nothing is pickled, so loading it runs no pickled code. The weights are read
with `models.load` and images go through `predict.image_tensor`: the same loader and
preprocessing as `noisy-student predict`.

Input: a column `image` of encoded images (PNG, JPEG ...), as bytes in Python; over REST
`mlflow models serve` base64-decodes a binary column itself, and base64 strings given
in Python are decoded here. Output: per image, `top_classes` (class names) and
`top_probabilities`, best first, top 5 or every class when there are fewer.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

import noisy_student
from noisy_student.data import storage
from noisy_student.errors import UserError
from noisy_student.registry import predict, tracking
from noisy_student.training import engine, models

MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
CHECKPOINT = "checkpoint"  # the artifact holding the checkpoint folder
TOP_K = 5
BATCH_SIZE = 256

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema(
        [
            ColSpec(Array(DataType.string), "top_classes"),
            ColSpec(Array(DataType.double), "top_probabilities"),
        ]
    ),
)


def example_image(meta: models.ModelMeta) -> bytes:
    """A mid-grey PNG of the model's size and mode: the logged input example."""
    buf = io.BytesIO()
    Image.new(meta.mode, (meta.width, meta.height), 128 if meta.mode == "L" else (128,) * 3).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as e:
            raise UserError(f"image row {row}: not base64 ({e})") from None
    raise UserError(f"image row {row}: expected bytes or a base64 string, got {type(value)}")


class ImageClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        self.model, self.meta = models.load(context.artifacts[CHECKPOINT])
        engine.for_inference(self.model.to(engine.device()))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise UserError(f"input has no column 'image' (columns: {list(model_input.columns)})")
        images = [
            predict.image_tensor(_as_bytes(v, i), self.meta, f"image row {i}")
            for i, v in enumerate(model_input["image"])
        ]
        if not images:
            return pd.DataFrame({"top_classes": [], "top_probabilities": []})
        probs = torch.cat(
            [
                engine.batch_probs(self.model, torch.cat(images[i : i + BATCH_SIZE]))
                for i in range(0, len(images), BATCH_SIZE)
            ]
        )
        values, indices = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        names = np.asarray(self.meta.class_names, dtype=object)
        return pd.DataFrame(
            {
                "top_classes": [list(names[row]) for row in indices.numpy()],
                "top_probabilities": [[float(p) for p in row] for row in values.numpy()],
            }
        )


# What loading a logged model imports besides the project's core, which the model carries
# (`code_paths`): what this module imports. Given, so MLflow does not infer them
# by loading the model in a subprocess; tests/test_serving.py loads a model in a fresh
# environment holding only these.
_SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "pandas",
    "numpy",
    "pyarrow",
    "fsspec",
    "pyspng",
    "simplejpeg",
)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in _SERVING_REQUIREMENTS]


def log_model(
    run_id: str, checkpoint_url: str, name: str, model_type: str, tags: dict[str, str]
) -> str:
    """The checkpoint as an MLflow logged model output by `run_id` (the Models tab): a pyfunc
    around the safetensors files (above), carrying the project's core as its code, so
    that an environment with only the model's requirements loads it (`mlflow models
    build-docker`). It gets the run's params and the metrics the run has logged at step 0.
    Returns the model id."""
    from mlflow.models import Model

    c = tracking.client()
    run = c.get_run(run_id)
    params = {k: v for k, v in run.data.params.items()}
    model = c.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=params,
        tags={k: tracking.redact(str(v)) for k, v in tags.items()},
        model_type=model_type,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, CHECKPOINT)
        os.makedirs(folder)
        for file in (models.WEIGHTS, models.META):
            with open(os.path.join(folder, file), "wb") as f:
                f.write(storage.read_bytes(storage.join(checkpoint_url, file)))
        meta = models.load_meta(folder)
        Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            python_model=MODEL_CODE,
            artifacts={CHECKPOINT: folder},
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example_image(meta)]}),
            pip_requirements=_requirements(),
            # the package itself, as code/noisy_student: MLflow puts code/ on sys.path
            # before it loads the model, where the package is not installed already
            code_paths=[os.path.dirname(noisy_student.__file__)],
        )
    return model.model_id
