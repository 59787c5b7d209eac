"""A fake ``triton_python_backend_utils`` for driving the repository's model.py adapters in
unit tests: the tensor and response types, and loading a model.py against them."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error

    def has_error(self):
        return self.error is not None


class TritonError:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


def load_model(path: Path, module_name: str, **utils):
    """Import the model.py at ``path`` with the fake utils module (these types, FINAL and
    ``utils``) installed as ``triton_python_backend_utils``; :func:`unload` removes it."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = Tensor, InferenceResponse, TritonError
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    for name, value in utils.items():
        setattr(fake, name, value)
    sys.modules["triton_python_backend_utils"] = fake
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unload() -> None:
    del sys.modules["triton_python_backend_utils"]
