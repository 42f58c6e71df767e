"""Every pass and the allocated pipeline on the bundled models give the recorded output bytes.

A refactoring leaves these hashes as they are; a deliberate behaviour change records new ones
with ``python tests/regression_outputs.py --write`` and says why in its commit.
"""

import json

import pytest
import regression_outputs as reg


@pytest.fixture(scope="module")
def outputs():
    return reg.run_all()


def test_every_case_is_recorded(outputs):
    want = json.loads(reg.HASHES.read_text())
    assert sorted(outputs) == sorted(want)


def test_outputs_are_byte_identical(outputs):
    want = json.loads(reg.HASHES.read_text())
    changed = {k: (want[k], v) for k, v in outputs.items() if want.get(k) != v}
    assert not changed, f"output bytes changed: {changed}"
