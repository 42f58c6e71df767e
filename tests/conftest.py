"""Shared fixtures: the project root on sys.path (for ``models.build`` and ``models.real``),
ONNX test helpers, and real-model fixtures (skipped with a reason when they cannot be fetched)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The speed contract (default never-slower) rolls back what this machine times as slower; a test of
# a pass's placement or numerics must not depend on the load of the machine it runs on, so the test
# session's default is "off" (inherited by the CLI subprocesses). The contract's own tests
# (tests/test_speed_contract.py) set the policy explicitly; test_default_policy_is_never_slower
# checks the users' default.
os.environ["ONNXSHRINK_SPEED"] = "off"


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
