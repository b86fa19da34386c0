"""Compiled tree inference: the scikit-learn model as native code (treelite + tl2cgen).

``compile_model`` turns a ``model.joblib`` (HistGradientBoosting) into ``model.so`` plus
``compiled.json`` (what it was built from and for which platform); the ``package`` stage
does it, checks it against the scikit-learn model on the whole test set and ships both
files beside the model. ``CompiledModel.load`` is what the service calls: it refuses a
library built for another platform, or one that does not load, with a reason, and the
scikit-learn model answers instead. Details: docs/serving.md ("Compiled trees").
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipelines.features.search import RELEASE_GIL_QUERIES, core_is_spare, helper

LIBRARY = "model.so"
META = "compiled.json"
# Quantized thresholds: the comparisons run on integer bins (faster, same splits); a fixed
# number of translation units so the generated sources, and the library, do not depend on
# the machine's core count (gcc output is then byte-identical from build to build).
CODEGEN = {"quantize": 1, "parallel_comp": 8}
TOOLCHAIN = "gcc"
TOLERANCE = 1e-9  # largest |compiled - scikit-learn| accepted on the test set
# Fewer rows than the searches' cut (search.RELEASE_GIL_QUERIES) are scored without letting
# go of the GIL: the trees take microseconds there, and each of tl2cgen's five ctypes calls
# per prediction would let go of it and wait to take it back from a busy thread
# (docs/serving.md, "Tail latency").
_DOUBLES = ctypes.POINTER(ctypes.c_double)
_NAN = np.array([np.nan])  # the missing-value marker, as tl2cgen.DMatrix passes it
# A call of at least SPLIT_ROWS rows, when the worker has a core to spare, scores its two
# halves on two threads (two handles of the library; the second on the process's helper
# thread, search.helper).
SPLIT_ROWS = 512


class CompileError(RuntimeError):
    """The model could not be compiled (no compiler, unsupported model); sklearn serves it."""


def platform_tag() -> str:
    """Where a library can run: OS, machine and C library (``linux-x86_64-glibc2.36``)."""
    libc, version = platform.libc_ver()
    return f"{sys.platform}-{platform.machine()}-{libc or 'libc'}{version}"


def _compiler_version() -> str:
    path = shutil.which(TOOLCHAIN)
    if path is None:
        raise CompileError(
            f"{TOOLCHAIN} is not installed, so the model cannot be compiled; install it "
            "(apt-get install gcc) or serve the scikit-learn model (it answers by itself)"
        )
    out = subprocess.run([path, "-dumpfullversion"], capture_output=True, text=True, check=False)
    return f"{TOOLCHAIN} {out.stdout.strip() or 'unknown'}"


def build_fingerprint() -> dict[str, Any]:
    """Everything besides the model that decides the library's bytes."""
    import tl2cgen
    import treelite

    return {
        "platform": platform_tag(),
        "compiler": _compiler_version(),
        "treelite": treelite.__version__,
        "tl2cgen": tl2cgen.__version__,
        "codegen": CODEGEN,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_model(model_file: Path, out_dir: Path) -> dict[str, Any]:
    """Compile ``model_file`` into ``out_dir/model.so`` and describe it in ``compiled.json``.

    The description holds the model's sha256 and the build fingerprint, so a stored
    library is reused only for the same model built the same way (``reusable``).
    """
    import joblib

    fingerprint = build_fingerprint()
    try:
        import tl2cgen
        import treelite

        model = joblib.load(model_file)
        tree_model = treelite.sklearn.import_model(model)
    except Exception as exc:
        raise CompileError(f"treelite cannot import {type(exc).__name__}: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tl2cgen-") as scratch, _native_output() as log:
        built = Path(scratch) / LIBRARY
        try:
            tl2cgen.export_lib(
                tree_model, toolchain=TOOLCHAIN, libpath=built, params=dict(CODEGEN), nthread=2
            )
        except Exception as exc:
            raise CompileError(f"tl2cgen could not build the library: {exc}\n{_tail(log)}") from exc
        shutil.copyfile(built, out_dir / LIBRARY)
    meta = {
        **fingerprint,
        "model_sha256": _sha256(model_file),
        "features": int(model.n_features_in_),
        "library": LIBRARY,
    }
    (out_dir / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


@contextlib.contextmanager
def _native_output() -> Iterator[IO[bytes]]:
    """Send what native code writes to stdout/stderr (treelite's timestamped log lines,
    compiler messages) to a file while compiling: it would otherwise land in the executed
    stage notebook and make it differ from build to build."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with (
        tempfile.TemporaryFile() as sink,
        contextlib.redirect_stdout(io.StringIO()),  # treelite logs through a Python callback
        contextlib.redirect_stderr(io.StringIO()),
    ):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def reusable(folder: Path, model_file: Path) -> bool:
    """True when ``folder`` holds a library of this very model built the way we build now."""
    try:
        meta = json.loads((folder / META).read_text())
        if not (folder / LIBRARY).is_file() or meta.get("model_sha256") != _sha256(model_file):
            return False
        return all(meta.get(k) == v for k, v in build_fingerprint().items())
    except (OSError, ValueError, CompileError):
        return False


class CompiledModel:
    """A loaded ``model.so``: click probability for a float64 feature matrix.

    tl2cgen's predictor may be called by one thread at a time: a lock serializes calls
    (a worker scores one request at a time anyway).
    """

    def __init__(self, predictor: Any, meta: dict[str, Any], second: Any = None) -> None:
        self._predictor = predictor
        self._lock = threading.Lock()
        self._second = second  # another handle of the library, for the second half of a split
        self._second_lock = threading.Lock()
        self.meta = meta
        import tl2cgen
        from tl2cgen.libloader import _LIB, _check_call

        self._dmatrix = tl2cgen.DMatrix
        self._check = _check_call
        # The same loaded library through ctypes.PyDLL: its functions keep the GIL.
        self._held = ctypes.PyDLL(str(_LIB.path), handle=_LIB._handle)
        self._can_hold = predictor.leaf_output_type == "float64"

    @classmethod
    def load(cls, folder: Path) -> CompiledModel:
        """Load the library in ``folder``; raises with the reason when it cannot run here."""
        meta = json.loads((folder / META).read_text())
        here = platform_tag()
        if meta.get("platform") != here:
            raise CompileError(f"library built for {meta.get('platform')}, this is {here}")
        import tl2cgen

        predictor = tl2cgen.Predictor(folder / LIBRARY, nthread=1)
        if predictor.num_feature != meta.get("features"):
            raise CompileError(
                f"library takes {predictor.num_feature} features, the model {meta.get('features')}"
            )
        return cls(predictor, meta, tl2cgen.Predictor(folder / LIBRARY, nthread=1))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Probability of the positive class per row (float64); under ``search.spare_core`` a
        call of ``SPLIT_ROWS`` rows or more runs its halves on two threads at once."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        n = len(X)
        if n < RELEASE_GIL_QUERIES and self._can_hold:
            return self.predict_holding_gil(X)
        if n >= SPLIT_ROWS and self._second is not None and core_is_spare():
            half = n // 2
            later = helper().submit(self._released, self._second, self._second_lock, X[half:])
            first = self._released(self._predictor, self._lock, X[:half])
            return np.concatenate([first, later.result()])
        return self._released(self._predictor, self._lock, X)

    def _released(self, predictor: Any, lock: threading.Lock, X: np.ndarray) -> np.ndarray:
        """tl2cgen's own call (it lets go of the GIL while the trees run)."""
        data = self._dmatrix(X, dtype="float64")
        with lock:
            out = predictor.predict(data)
        return np.asarray(out, dtype=np.float64).reshape(len(X))

    def predict_holding_gil(self, X: np.ndarray) -> np.ndarray:
        """``predict`` by the calls ``tl2cgen.Predictor.predict`` makes (tl2cgen's C API),
        without letting go of the GIL; ``X`` is C-contiguous float64."""
        api, check, n = self._held, self._check, len(X)
        dmat, shape, ndim = ctypes.c_void_p(), ctypes.POINTER(ctypes.c_uint64)(), ctypes.c_uint64()
        check(
            api.TL2cgenDMatrixCreateFromMat(
                X.ctypes.data_as(_DOUBLES),
                ctypes.c_char_p(b"float64"),
                ctypes.c_size_t(n),
                ctypes.c_size_t(X.shape[1]),
                _NAN.ctypes.data_as(_DOUBLES),
                ctypes.byref(dmat),
            )
        )
        try:
            with self._lock:
                handle = self._predictor.handle
                check(
                    api.TL2cgenPredictorGetOutputShape(
                        handle, dmat, ctypes.byref(shape), ctypes.byref(ndim)
                    )
                )
                out = np.zeros(math.prod(shape[: ndim.value]), dtype=np.float64)
                zero = ctypes.c_int(0)  # not verbose; probabilities, not margins
                check(
                    api.TL2cgenPredictorPredictBatch(
                        handle, dmat, zero, zero, out.ctypes.data_as(_DOUBLES)
                    )
                )
        finally:
            check(api.TL2cgenDMatrixFree(dmat))
        return out.reshape(n)


def max_abs_difference(model: Any, compiled: CompiledModel, X: np.ndarray) -> float:
    """Largest |compiled - scikit-learn| probability over the rows of ``X`` (in chunks)."""
    worst = 0.0
    for start in range(0, len(X), 50_000):
        part = X[start : start + 50_000]
        expected = model.predict_proba(part)[:, 1]
        worst = max(worst, float(np.max(np.abs(compiled.predict(part) - expected), initial=0.0)))
    return worst
