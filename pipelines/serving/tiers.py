"""Model tiers of a release: a loaded model, its runtime (compiled or scikit-learn), its breaker.

A tier whose model ships a compiled library (``model.so``, hash-checked like every file
of the release) answers with it; when the library is missing, refused (hash, platform)
or fails, the tier's scikit-learn model answers and ``runtime`` says so. Details:
docs/serving.md ("Compiled trees").
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np

from pipelines.modeling.compiled import LIBRARY, META, CompiledModel
from pipelines.modeling.release import ModelRef
from pipelines.serving.security import redact_paths
from pipelines.serving.sources import check_file

logger = logging.getLogger("ctr.serving")
# CTR_MODEL_RUNTIME=sklearn keeps compiled libraries unloaded (comparisons, diagnosis).
RUNTIME_ENV = "CTR_MODEL_RUNTIME"


class InjectedFault(RuntimeError):
    """Raised by a tier on which an operator injected an error fault (chaos testing)."""


@dataclass
class Fault:
    """An operator-injected fault on a tier: ``error`` raises, ``slow`` sleeps first."""

    kind: Literal["error", "slow"]
    delay_ms: float = 0.0

    def apply(self, what: str) -> None:
        if self.kind == "slow":
            time.sleep(self.delay_ms / 1000.0)
        else:
            raise InjectedFault(f"injected fault on {what}")


@dataclass
class ModelTier:
    """One loaded (or refused) model of the release, with its circuit breaker."""

    role: str  # prod, candidate or previous
    ref: ModelRef
    model: Any | None
    refused: str | None = None
    fault: Fault | None = None
    open_until: float = 0.0
    failures: int = 0  # consecutive failures since the last success
    last_failure: str | None = None
    compiled: CompiledModel | None = None
    compiled_note: str | None = None  # why the compiled library does not answer

    @property
    def runtime(self) -> str:
        """What answers for this tier now: ``compiled`` or ``sklearn``."""
        return "compiled" if self.compiled is not None else "sklearn"

    @property
    def runs_on_caller(self) -> bool:
        """Whether a call runs on the calling thread: the compiled library with no injected
        fault, native code on a fixed number of trees (bounded and fast, 0.1-0.2 ms a row).
        Otherwise it runs on a helper thread, so that a hung scikit-learn call (or a slow
        fault) can be abandoned at the latency budget."""
        return self.compiled is not None and self.fault is None

    def unavailable(self, now: float) -> str | None:
        """Why the tier cannot be tried now, or None."""
        if self.model is None:
            return f"{self.role} refused at load: {self.refused}"
        if now < self.open_until:
            return (
                f"{self.role} skipped for {self.open_until - now:.1f} s after: {self.last_failure}"
            )
        return None

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, str]:
        """Probabilities and the runtime that produced them.

        A compiled library that raises is dropped for good (logged, in /metadata) and
        the scikit-learn model answers the same call.
        """
        if self.fault is not None:
            self.fault.apply(f"{self.role} model {self.ref.label}")
        compiled = self.compiled
        if compiled is not None:
            try:
                return compiled.predict(X), "compiled"
            except Exception as exc:
                self.compiled = None
                self.compiled_note = redact_paths(
                    f"compiled library failed, scikit-learn answers: {type(exc).__name__}: {exc}"
                )
                logger.error("%s tier %s: %s", self.role, self.ref.tag, self.compiled_note)
        assert self.model is not None
        return np.asarray(self.model.predict_proba(X)[:, 1], dtype=np.float64), "sklearn"

    def trip(self, reason: str, cooldown: float, threshold: int) -> None:
        """Count a failure; ``threshold`` failures in a row open the breaker for ``cooldown``."""
        self.last_failure = reason
        self.failures += 1
        if self.failures >= threshold:
            self.open_until = time.monotonic() + cooldown
            self.failures = 0

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "tag": self.ref.tag,
            "version": self.ref.label,
            "registry_version": self.ref.registry_version,
            "loaded": self.model is not None,
            "refused": self.refused,
            "runtime": self.runtime if self.model is not None else None,
            "compiled_note": self.compiled_note,
            "breaker_open_seconds": round(max(self.open_until - now, 0.0), 3),
            "last_failure": self.last_failure,
            "fault": None if self.fault is None else vars(self.fault),
        }


def load_compiled(
    role: str, ref: ModelRef, folder: Path
) -> tuple[CompiledModel | None, str | None]:
    """The tier's compiled library, or None and why not (the scikit-learn model answers)."""
    if LIBRARY not in ref.files or META not in ref.files:
        return None, "no compiled library in this model version"
    if os.environ.get(RUNTIME_ENV, "auto") == "sklearn":
        return None, f"{RUNTIME_ENV}=sklearn: compiled library not loaded"
    try:
        # A private copy is checked and loaded: the hashes cover the very bytes mapped, and
        # a later change to the store's file (in place) cannot reach this process's code.
        with tempfile.TemporaryDirectory(prefix="ctr-compiled-") as private:
            copy = Path(private)
            for name in (LIBRARY, META):
                shutil.copyfile(folder / name, copy / name)
                check_file(copy / name, ref.files[name], ref.sha256.get(name), f"{role} {name}")
            return CompiledModel.load(copy), None
    except Exception as exc:
        note = redact_paths(
            f"compiled library refused, scikit-learn answers: {type(exc).__name__}: {exc}"
        )
        logger.error("%s tier %s: %s", role, ref.tag, note)
        return None, note


def load_tier(role: str, ref: ModelRef, folder: Path) -> ModelTier:
    """Load a model after checking its file hash; any problem refuses the tier, loudly."""
    try:
        check_file(
            folder / "model.joblib",
            ref.files["model.joblib"],
            ref.sha256.get("model.joblib"),
            f"{role} model {ref.tag}",
        )
        model = joblib.load(folder / "model.joblib")
        if not hasattr(model, "predict_proba"):
            raise TypeError(f"{type(model).__name__} has no predict_proba")
    except Exception as exc:  # refused, reported in /metadata and logs; never loaded silently
        logger.error("refusing %s tier %s: %s", role, ref.tag, exc)
        return ModelTier(role, ref, None, refused=redact_paths(f"{type(exc).__name__}: {exc}"))
    compiled, note = load_compiled(role, ref, folder)
    return ModelTier(role, ref, model, compiled=compiled, compiled_note=note)
