"""Shared fixtures: the project root on sys.path (for ``models.build`` and ``models.real``),
ONNX test helpers, and real-model fixtures (skipped with a reason when they cannot be fetched)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def real_model_path():
    """Callable: name -> Path of a real model (ppocr_det, ppocr_rec, ppocr_cls, yolov8n)."""
    from models.real import real_model

    def get(name):
        try:
            return real_model(name)
        except Exception as e:  # no registry access: skip, do not fail
            pytest.skip(f"real model {name} unavailable: {e}")

    return get
