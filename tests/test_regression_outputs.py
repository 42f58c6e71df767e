"""Every pass and the allocated pipeline on the bundled models give the recorded output bytes.

A refactoring leaves these hashes as they are; a deliberate behaviour change records new ones
with ``python tests/regression_outputs.py --write`` and says why in its commit. The hashes are
recorded per machine kind (onnxruntime's version and the CPU features that pick its kernels,
``regression_outputs.machine()``): on a kind with none recorded both tests skip and name it.
"""

import pytest
import regression_outputs as reg


@pytest.fixture(scope="module")
def want():
    recorded = reg.recorded_hashes()
    if recorded is None:
        pytest.skip(f"no output hashes recorded for {reg.machine()} (python tests/regression_outputs.py --write)")
    return recorded


@pytest.fixture(scope="module")
def outputs(want):
    return reg.run_all()


def test_every_case_is_recorded(outputs, want):
    assert sorted(outputs) == sorted(want)


def test_outputs_are_byte_identical(outputs, want):
    changed = {k: (want[k], v) for k, v in outputs.items() if want.get(k) != v}
    assert not changed, f"output bytes changed: {changed}"
