"""Calibration and validation samples.

A sample is a dict {input name: numpy array}. Sources are random-access and load lazily, so
calibration streams samples one at a time and never holds the whole set in memory.

- DirectorySource: a folder of ``.npy`` files (one sample each, single-input models) or ``.npz``
  files (one array per input name), sorted by file name.
- ListSource: a Python sequence of dicts, or a callable returning a fresh iterable of dicts.
- SyntheticSource: random samples from the input specs, only when asked for; flagged as
  meaningless for accuracy.
"""

from __future__ import annotations

__all__ = ["InputSpec", "input_specs", "SampleSource", "DirectorySource", "ListSource", "SyntheticSource",
           "Subset", "as_source", "split_roles", "SampleRoles", "MIN_FOR_ROLES", "check_sample", "read_headers",
           "check_reference_finite"]

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from onnxshrink.errors import InputError, UsageError


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (ints, or str/None for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                      for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def check_sample(sample: dict, specs: Sequence[InputSpec], where: str) -> dict:
    """Check names, ranks, fixed dims, dtype kinds and NaN; cast within a dtype kind
    (float64 -> float32). Raises InputError naming the input and ``where`` (file or index).
    Infinities are accepted (a ``-inf`` additive attention mask is a normal transformer input);
    ``check_reference_finite`` refuses them when they make the original model's outputs non-finite."""
    names = {s.name for s in specs}
    missing = names - set(sample)
    extra = set(sample) - names
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {sorted(missing)}")
        if extra:
            parts.append(f"unknown input(s) {sorted(extra)}")
        raise InputError(f"{where}: {', '.join(parts)}; the model's inputs are {sorted(names)}")
    out = {}
    for s in specs:
        a = np.asarray(sample[s.name])
        _check_meta(a.shape, a.dtype, s, where)
        if a.dtype != s.dtype:
            a = a.astype(s.dtype)
        if a.dtype.kind in "fc" and np.isnan(a).any():
            bad = int(np.count_nonzero(np.isnan(a)))
            raise InputError(f"{where}: input '{s.name}' contains NaN ({bad} of {a.size} values)")
        out[s.name] = a
    return out


def _check_meta(shape: tuple, dtype: np.dtype, s: InputSpec, where: str) -> None:
    """Dtype kind, rank and fixed dims of one array against its input spec (casts within a kind,
    float64 -> float32 or int32 -> int64, are allowed)."""
    dtype = np.dtype(dtype)
    if dtype != s.dtype and not (dtype.kind == s.dtype.kind or (dtype.kind in "iu" and s.dtype.kind in "iu")):
        raise InputError(f"{where}: input '{s.name}' has dtype {dtype}, the model expects {s.dtype}")
    if s.shape and len(shape) != len(s.shape):
        raise InputError(f"{where}: input '{s.name}' has shape {list(shape)}, the model expects rank "
                         f"{len(s.shape)} ({_fmt_shape(s.shape)})")
    for i, (got, want) in enumerate(zip(shape, s.shape)):
        if isinstance(want, int) and want > 0 and got != want:
            raise InputError(f"{where}: input '{s.name}' has shape {list(shape)}, the model expects "
                             f"{_fmt_shape(s.shape)} (dim {i})")


def _npy_header(f) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from an open .npy stream's header, without reading the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype)


def read_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """{array name: (shape, dtype)} of a .npy ("" as the name) or .npz file, from headers only."""
    import zipfile

    if path.suffix == ".npy":
        with open(path, "rb") as f:
            return {"": _npy_header(f)}
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if member.endswith(".npy"):
                with z.open(member) as f:
                    out[member[:-4]] = _npy_header(f)
    return out


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


class SampleSource:
    """Random-access, lazily loaded samples. Subclasses implement ``__len__`` and ``_load(i)``."""

    synthetic = False
    description = "samples"

    def __init__(self, specs: Sequence[InputSpec] | None = None):
        self.specs = list(specs) if specs is not None else None

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _where(self, i: int) -> str:
        return f"sample {i}"

    def where(self, i: int) -> str:
        """How messages name sample ``i`` (its file, or its index)."""
        return self._where(i)

    def label(self, i: int):
        """The label of sample i (an int or int array), or None when the source has no labels."""
        return None

    def labels(self):
        """All labels, or None unless every sample has one."""
        out = [self.label(i) for i in range(len(self))]
        return None if not out or any(v is None for v in out) else out

    def get(self, i: int) -> dict:
        s = self._load(i)
        if self.specs is not None:
            s = check_sample(s, self.specs, self._where(i))
        return s

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def with_specs(self, specs: Sequence[InputSpec]) -> "SampleSource":
        self.specs = list(specs)
        return self


class DirectorySource(SampleSource):
    """A folder of .npy (single-input models) or .npz (one array per input) files."""

    def __init__(self, path: str | os.PathLike, specs: Sequence[InputSpec] | None = None, limit: int | None = None):
        super().__init__(specs)
        p = Path(path)
        if not p.exists():
            raise InputError(f"calibration folder not found: {p}")
        if not p.is_dir():
            raise InputError(f"calibration path is not a folder: {p}")
        files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".npz") and f.is_file() and f.stem != "labels")
        if not files:
            raise InputError(f"calibration folder has no .npy or .npz files: {p}")
        if limit:
            files = files[:limit]
        self.files = files
        self.description = f"{len(files)} samples from {p}"
        self.check_headers()
        self._labels = _read_labels(p, len(files))
        if self._labels is not None:
            self.description += " with labels"

    def label(self, i):
        return None if self._labels is None else self._labels[i]

    def __len__(self):
        return len(self.files)

    def with_specs(self, specs):
        super().with_specs(specs)
        self.check_headers()
        return self

    def check_headers(self) -> None:
        """Check every file's array names, shapes and dtypes from the .npy headers (no data is
        read), so a bad file fails the run before any work rather than in the middle of a pass.
        Values (NaN/Inf) are checked as each sample is loaded."""
        if self.specs is None:
            return
        by_name = {s.name: s for s in self.specs}
        for f in self.files:
            try:
                heads = read_headers(f)
            except Exception as e:
                raise InputError(f"{f}: cannot read array ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                 ) from None
            if f.suffix == ".npy":
                if len(self.specs) != 1:
                    raise InputError(f"{f}: a .npy file holds one array, but the model has {len(self.specs)} inputs "
                                     f"{[s.name for s in self.specs]}; use .npz files with one array per input name")
                heads = {self.specs[0].name: heads[""]}
            missing, extra = set(by_name) - set(heads), set(heads) - set(by_name)
            if missing or extra:
                parts = ([f"missing input(s) {sorted(missing)}"] if missing else []) + \
                        ([f"unknown input(s) {sorted(extra)}"] if extra else [])
                raise InputError(f"{f}: {', '.join(parts)}; the model's inputs are {sorted(by_name)}")
            for name, (shape, dtype) in heads.items():
                _check_meta(shape, dtype, by_name[name], str(f))

    def _where(self, i):
        return str(self.files[i])

    def _load(self, i):
        f = self.files[i]
        try:
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            arr = np.load(f, allow_pickle=False)
        except Exception as e:
            raise InputError(f"{f}: cannot read array "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if self.specs is None or len(self.specs) != 1:
            names = [s.name for s in self.specs] if self.specs else []
            raise InputError(f"{f}: a .npy file holds one array, but the model has {len(names)} inputs {names}; "
                             "use .npz files with one array per input name")
        return {self.specs[0].name: arr}


def check_reference_finite(source: SampleSource, outputs: Sequence[Sequence[np.ndarray]]) -> None:
    """Refuse samples whose infinite inputs make the original model's outputs non-finite.

    ``outputs[i]`` are the original model's outputs on ``source.get(i)``. Infinities in an input are
    accepted where the model expects them (``-inf`` masked logits, softmax makes them 0); when a
    sample with an infinite input gives a non-finite output, no fidelity can be measured on it: an
    InputError naming the input and the sample. Only samples with non-finite outputs are re-read."""
    for i, outs in enumerate(outputs):
        if all(np.isfinite(o).all() for o in outs if isinstance(o, np.ndarray) and o.dtype.kind in "fc"):
            continue
        sample = source.get(i)
        inf = [k for k, a in sample.items() if a.dtype.kind in "fc" and np.isinf(a).any()]
        if inf:
            raise InputError(f"{source.where(i)}: input '{inf[0]}' contains infinities and the original model's "
                             "outputs on this sample are not finite (no fidelity can be measured on it)")


def _read_labels(folder: Path, n: int):
    """labels.npy (an int array, one entry per sample in file-name order) or labels.txt (one
    integer per line) beside the samples; None when neither exists."""
    npy, txt = folder / "labels.npy", folder / "labels.txt"
    try:
        if npy.exists():
            labels = np.load(npy, allow_pickle=False)
        elif txt.exists():
            labels = np.array([int(x) for x in txt.read_text().split()], dtype=np.int64)
        else:
            return None
    except (ValueError, OSError) as e:
        raise InputError(f"{npy if npy.exists() else txt}: cannot read labels ({e})") from None
    if labels.dtype.kind not in "iu":
        raise InputError(f"{folder}: labels must be integers, got {labels.dtype}")
    if len(labels) != n:
        raise InputError(f"{folder}: {len(labels)} labels for {n} samples")
    return list(labels)


class ListSource(SampleSource):
    """Samples from a sequence of dicts, or a callable returning a fresh iterable of dicts.

    A one-shot iterator cannot be streamed twice (calibration and validation both read the data),
    so it is materialised once.
    """

    def __init__(self, samples: Sequence[dict] | Callable[[], Iterable[dict]] | Iterable[dict],
                 specs: Sequence[InputSpec] | None = None, description: str | None = None,
                 labels: Sequence | None = None):
        super().__init__(specs)
        if callable(samples):
            self._factory = samples
            self._items = None
            self._n = sum(1 for _ in samples())
        else:
            self._factory = None
            self._items = samples if isinstance(samples, Sequence) else list(samples)
            self._n = len(self._items)
        self._it = None
        self._pos = 0
        self.description = description or f"{self._n} samples (Python)"
        if labels is not None and len(labels) != self._n:
            raise InputError(f"{len(labels)} labels for {self._n} samples")
        self._labels = list(labels) if labels is not None else None

    def __len__(self):
        return self._n

    def label(self, i):
        return None if self._labels is None else self._labels[i]

    def set_labels(self, labels: Sequence) -> None:
        """Attach labels (one per sample) to samples given without them (``PassManager(labels=...)``)."""
        self._labels = list(labels)

    def _load(self, i):
        if self._items is not None:
            s = self._items[i]
        else:
            if self._it is None or i < self._pos:
                self._it, self._pos = iter(self._factory()), 0
            while self._pos <= i:
                s = next(self._it)
                self._pos += 1
        if not isinstance(s, dict):
            raise InputError(f"sample {i}: expected a dict of input name -> array, got {type(s).__name__}")
        return s


class SyntheticSource(SampleSource):
    """Random samples (seeded) from the input specs. Meaningless for accuracy; flagged in reports."""

    synthetic = True

    def __init__(self, specs: Sequence[InputSpec], n: int = 8, seed: int = 0, shapes: dict | None = None):
        super().__init__(specs)
        self.n = n
        self.seed = seed
        self.shapes = {}
        for s in specs:
            shp = (shapes or {}).get(s.name)
            if shp is None:
                shp = tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else 32) for i, d in enumerate(s.shape))
            self.shapes[s.name] = tuple(shp)
        self.description = f"{n} synthetic samples (random; meaningless for accuracy)"

    def __len__(self):
        return self.n

    def _load(self, i):
        rng = np.random.default_rng((self.seed, i))
        out = {}
        for s in self.specs:
            shp = self.shapes[s.name]
            if s.dtype.kind == "f":
                out[s.name] = rng.standard_normal(shp).astype(s.dtype)
            elif s.dtype.kind == "b":
                out[s.name] = rng.integers(0, 2, shp).astype(bool)
            else:
                out[s.name] = rng.integers(0, 8, shp).astype(s.dtype)
        return out


class Subset(SampleSource):
    """A view of some samples of another source."""

    def __init__(self, base: SampleSource, indices: Sequence[int], description: str = ""):
        super().__init__(None)
        self.base = base
        self.indices = list(indices)
        self.synthetic = base.synthetic
        self.description = description or f"{len(self.indices)} of {base.description}"

    @property
    def specs(self):
        return self.base.specs

    @specs.setter
    def specs(self, v):
        pass

    def __len__(self):
        return len(self.indices)

    def get(self, i):
        return self.base.get(self.indices[i])

    def where(self, i):
        return self.base.where(self.indices[i])

    def label(self, i):
        return self.base.label(self.indices[i])


def as_source(data, specs: Sequence[InputSpec]) -> SampleSource | None:
    """Turn what a user passed (None, a folder path, a source, a sequence/iterable/callable of
    dicts) into a SampleSource checked against the model's inputs."""
    if data is None:
        return None
    if isinstance(data, SampleSource):
        return data.with_specs(specs)
    if isinstance(data, (str, os.PathLike)):
        return DirectorySource(data, specs)
    if isinstance(data, dict):
        raise UsageError("data must be a sequence of samples (dicts), not a single dict")
    return ListSource(data, specs)


MIN_FOR_ROLES = 8  # fewer samples than this: every role sees every sample (and the report says so)


@dataclass
class SampleRoles:
    """The three roles of the user's samples:

    - ``calibration``: statistics (activation ranges, importance, whitening, refit);
    - ``selection``: every decision the tool takes (back-off, bisection, the guard, allocation);
    - ``test``: the final fidelity and the budget verdict, on samples no decision saw.

    ``shared`` names the roles that had to share samples (too few to keep them apart); empty when
    the three sets are disjoint."""

    calibration: SampleSource
    selection: SampleSource
    test: SampleSource
    shared: str = ""

    def counts(self) -> dict:
        return {"calibration": len(self.calibration), "selection": len(self.selection), "test": len(self.test),
                "disjoint": not self.shared}


def split_roles(source: SampleSource, val: SampleSource | None = None) -> SampleRoles:
    """Split the samples into calibration, selection and test (``SampleRoles``), in file order.

    Without ``val``, with at least ``MIN_FOR_ROLES`` samples: of every four consecutive samples the
    1st and 3rd calibrate, the 2nd selects, the 4th tests (32 samples: 16 / 8 / 8). With an explicit
    ``val`` (``--val DIR``, the user's held-out set): every sample of ``source`` calibrates, and the
    held-out samples alternate between selection and test (with at least 4 of them; else the test set
    is ``val`` and every 4th sample of ``source`` selects). With fewer samples the roles share them,
    and ``shared`` says which: such a figure is measured on samples the decisions saw."""
    n = len(source)
    if val is not None:
        m = len(val)
        if m >= 4:
            sel, test = [i for i in range(m) if i % 2 == 0], [i for i in range(m) if i % 2 == 1]
            tag = "of --val, with labels" if val.labels() is not None else "of --val"
            return SampleRoles(source, Subset(val, sel, f"{len(sel)} selection samples ({tag})"),
                               Subset(val, test, f"{len(test)} held-out test samples ({tag})"))
        if n >= MIN_FOR_ROLES:
            sel = [i for i in range(n) if i % 4 == 3]
            cal = [i for i in range(n) if i % 4 != 3]
            return SampleRoles(Subset(source, cal, f"{len(cal)} calibration samples"),
                               Subset(source, sel, f"{len(sel)} selection samples"), val)
        return SampleRoles(source, source, val, shared="calibration and selection")
    if n >= MIN_FOR_ROLES:
        cal = [i for i in range(n) if i % 4 in (0, 2)]
        sel = [i for i in range(n) if i % 4 == 1]
        test = [i for i in range(n) if i % 4 == 3]
        return SampleRoles(Subset(source, cal, f"{len(cal)} calibration samples"),
                           Subset(source, sel, f"{len(sel)} selection samples"),
                           Subset(source, test, f"{len(test)} held-out test samples"))
    return SampleRoles(source, source, source, shared="calibration, selection and test")
