"""Calibration/validation samples: folders of .npy/.npz, Python sequences, callables and
generators, synthetic samples; checks of names, shapes, dtypes and values (naming the input and
the file); header pre-checks; streaming (one sample in memory at a time); the calib/val split."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.data import (
    DirectorySource,
    InputSpec,
    ListSource,
    SyntheticSource,
    as_source,
    check_sample,
    read_headers,
    split_roles,
)
from onnxshrink.errors import InputError, UsageError

X = InputSpec("x", np.dtype(np.float32), (1, 4))
DYN = InputSpec("x", np.dtype(np.float32), ("batch", 4))
IDS = InputSpec("ids", np.dtype(np.int64), (1, None))


def _npys(tmp_path, arrays):
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i:03d}.npy", a)
    return tmp_path


def test_directory_npy_sorted_and_lazy(tmp_path, monkeypatch):
    _npys(tmp_path, [np.full((1, 4), i, np.float32) for i in range(5)])
    (tmp_path / "notes.txt").write_text("ignored")
    src = DirectorySource(tmp_path, [X])
    assert len(src) == 5 and "5 samples from" in src.description
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    assert float(src.get(3)["x"][0, 0]) == 3.0
    assert len(loads) == 1  # one file read for one sample: samples stream
    assert [float(s["x"][0, 0]) for s in src] == [0, 1, 2, 3, 4]


def test_directory_limit(tmp_path):
    _npys(tmp_path, [np.zeros((1, 4), np.float32)] * 6)
    assert len(DirectorySource(tmp_path, [X], limit=2)) == 2


def test_directory_npz_multi_input(tmp_path):
    specs = [X, IDS]
    np.savez(tmp_path / "a.npz", x=np.ones((1, 4), np.float32), ids=np.arange(7, dtype=np.int32)[None])
    s = DirectorySource(tmp_path, specs).get(0)
    assert s["ids"].dtype == np.int64 and s["ids"].shape == (1, 7)  # int32 -> int64: same kind, cast


def test_header_precheck_finds_bad_file_before_loading(tmp_path):
    arrs = [np.zeros((1, 4), np.float32)] * 20
    arrs[17] = np.zeros((1, 5), np.float32)
    _npys(tmp_path, arrs)
    with pytest.raises(InputError, match=r"017\.npy: input 'x' has shape \[1, 5\], the model expects \[1,4\]"):
        DirectorySource(tmp_path, [X])


def test_read_headers(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float16))
    np.savez(tmp_path / "b.npz", p=np.zeros(4, np.int8), q=np.zeros((1, 1), np.float64))
    assert read_headers(tmp_path / "a.npy") == {"": ((2, 3), np.dtype(np.float16))}
    assert read_headers(tmp_path / "b.npz") == {"p": ((4,), np.dtype(np.int8)), "q": ((1, 1), np.dtype(np.float64))}


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((1, 5), np.float32), r"has shape \[1, 5\], the model expects \[1,4\] \(dim 1\)"),
    (np.zeros((4,), np.float32), r"has shape \[4\], the model expects rank 2"),
    (np.zeros((1, 4), np.int64), r"has dtype int64, the model expects float32"),
    (np.array([[1, np.nan, 0, 0]], np.float32), r"contains NaN \(1 of 4 values\)"),
    (np.array([[np.nan, -np.inf, np.nan, 0]], np.float64), r"contains NaN \(2 of 4 values\)"),
    (np.zeros((1, 4), bool), r"has dtype bool, the model expects float32"),
])
def test_check_sample_errors(arr, msg):
    with pytest.raises(InputError, match=r"^f\.npy: input 'x' " + msg):
        check_sample({"x": arr}, [X], "f.npy")


def test_check_sample_casts_within_kind_and_dynamic_dims():
    out = check_sample({"x": np.zeros((3, 4), np.float64)}, [DYN], "s")
    assert out["x"].dtype == np.float32 and out["x"].shape == (3, 4)


def test_check_sample_names():
    with pytest.raises(InputError, match=r"s: missing input\(s\) \['x'\], unknown input\(s\) \['y'\]"):
        check_sample({"y": np.zeros((1, 4), np.float32)}, [X], "s")


def test_list_source_sequence_callable_generator():
    samples = [{"x": np.full((1, 4), i, np.float32)} for i in range(3)]
    assert len(ListSource(samples, [X])) == 3
    calls = []

    def factory():
        calls.append(1)
        return iter(samples)

    src = ListSource(factory, [X])
    assert len(src) == 3
    assert [float(s["x"][0, 0]) for s in src] == [0, 1, 2]
    assert [float(s["x"][0, 0]) for s in src] == [0, 1, 2]  # re-iterable: the factory is called again
    gen = ListSource((s for s in samples), [X])  # a one-shot generator is materialised once
    assert [float(s["x"][0, 0]) for s in gen] == [0, 1, 2] and len(list(gen)) == 3


def test_list_source_bad_items():
    with pytest.raises(InputError, match="sample 1: expected a dict"):
        list(ListSource([{"x": np.zeros((1, 4), np.float32)}, [1, 2]], [X]))
    with pytest.raises(UsageError, match="not a single dict"):
        as_source({"x": np.zeros((1, 4))}, [X])


def test_synthetic_deterministic_and_typed():
    specs = [DYN, IDS, InputSpec("m", np.dtype(bool), (1, 3))]
    a = SyntheticSource(specs, n=3, seed=5)
    b = SyntheticSource(specs, n=3, seed=5)
    for i in range(3):
        sa, sb = a.get(i), b.get(i)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])
    s = a.get(0)
    assert s["x"].shape == (1, 4) and s["ids"].dtype == np.int64 and s["ids"].shape == (1, 32)
    assert s["m"].dtype == bool and a.synthetic and "meaningless" in a.description
    assert not np.array_equal(SyntheticSource(specs, n=1, seed=6).get(0)["x"], s["x"])


def _ids(source) -> list[float]:
    return [float(s["x"][0, 0]) for s in source]


def test_split_roles_three_disjoint_sets():
    src = ListSource([{"x": np.full((1, 4), i, np.float32)} for i in range(12)], [X])
    roles = split_roles(src)
    assert _ids(roles.calibration) == [0, 2, 4, 6, 8, 10]
    assert _ids(roles.selection) == [1, 5, 9] and _ids(roles.test) == [3, 7, 11] and not roles.shared
    assert roles.counts() == {"calibration": 6, "selection": 3, "test": 3, "disjoint": True}
    small = ListSource([{"x": np.zeros((1, 4), np.float32)}] * 4, [X])
    roles = split_roles(small)
    assert roles.shared and len(roles.calibration) == len(roles.selection) == len(roles.test) == 4


def test_split_roles_with_explicit_held_out_set():
    src = ListSource([{"x": np.full((1, 4), i, np.float32)} for i in range(8)], [X])
    held = ListSource([{"x": np.full((1, 4), 100 + i, np.float32)} for i in range(5)], [X])
    roles = split_roles(src, held)  # the held-out samples alternate: selection, test
    assert roles.calibration is src and _ids(roles.selection) == [100, 102, 104] and _ids(roles.test) == [101, 103]
    few = ListSource([{"x": np.full((1, 4), 100 + i, np.float32)} for i in range(3)], [X])
    roles = split_roles(src, few)  # too few held out to split: they test, every 4th calibration sample selects
    assert roles.test is few and _ids(roles.selection) == [3, 7] and _ids(roles.calibration) == [0, 1, 2, 4, 5, 6]


def test_as_source_folder_errors(tmp_path):
    with pytest.raises(InputError, match="calibration folder not found"):
        as_source(tmp_path / "nope", [X])
    (tmp_path / "f.npy").write_bytes(b"")
    with pytest.raises(InputError, match="calibration path is not a folder"):
        as_source(tmp_path / "f.npy", [X])
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="has no .npy or .npz files"):
        as_source(tmp_path / "d", [X])
    np.save(tmp_path / "d" / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"obj\.npy: (cannot read array|input 'x' has dtype object)"):
        as_source(tmp_path / "d", [X])
