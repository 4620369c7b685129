"""The file an MLflow logged model of this project is made from ("models from code"):
MLflow copies it into the model and runs it when the model is loaded, so the logged model
holds no pickle at all, only this file, its signature and the safetensors checkpoint.
"""

from mlflow.models import set_model

from noisy_student.registry.serving import ImageClassifier

set_model(ImageClassifier())
