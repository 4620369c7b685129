"""Where models logged before the core had subpackages point: their `pyfunc_model.py`
(copied into each logged model) runs `from noisy_student.serving import ImageClassifier`
when the model loads in an environment where this package is installed. The code lives
in `noisy_student.registry.serving`."""

from noisy_student.registry.serving import ImageClassifier

__all__ = ["ImageClassifier"]
