"""Which model answers a request: sticky user buckets for canary and A/B, sampling for shadow.

A user's bucket is a uniform number in [0, 1) from a keyed hash of (salt, user):
the same user always lands in the same bucket, so a canary or A/B share is sticky
per user and moves monotonically (raising the share from 5% to 10% keeps the
first 5% in the candidate arm). Changing the salt reshuffles users.

Background scoring (shadow, and the counterfactual arm of canary/A-B) is sampled
per request from a hash of the request id, so a replayed request is sampled the
same way and the decision costs no random state shared between threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.core.settings import RoutingMode

_SCALE = float(1 << 64)


def unit_hash(salt: str, keys: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per key from blake2b(salt, key): stable across processes."""
    salt_bytes = salt.encode()[:16]
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt_bytes).digest()
        out[i] = int.from_bytes(digest, "big") / _SCALE
    return out


@dataclass(frozen=True)
class RoutingPlan:
    """Per-row decision: the arm that should answer and whether the other arm is also scored."""

    candidate: np.ndarray  # bool: the candidate should answer this row
    background: np.ndarray  # bool: score the non-answering model in the background


@dataclass
class Router:
    """Routes rows of a batch by mode, candidate share and background sample rate."""

    mode: RoutingMode
    candidate_share: float
    sample_rate: float
    salt: str

    def plan(
        self, users: Sequence[str], request_ids: Sequence[str], has_candidate: bool
    ) -> RoutingPlan:
        """Decide every row; without a loaded candidate everything goes to prod."""
        n = len(users)
        if not has_candidate or self.mode == "none":
            no = np.zeros(n, dtype=bool)
            return RoutingPlan(no, no.copy())
        if self.mode in ("canary", "ab"):
            candidate = unit_hash(self.salt, users) < self.candidate_share
        else:  # shadow: the candidate never answers
            candidate = np.zeros(n, dtype=bool)
        if self.sample_rate >= 1.0:
            background = np.ones(n, dtype=bool)
        elif self.sample_rate <= 0.0:
            background = np.zeros(n, dtype=bool)
        else:
            background = unit_hash(f"{self.salt}/sample", request_ids) < self.sample_rate
        return RoutingPlan(candidate, background)

    def answering_route(self) -> str:
        """The response's route label for a row answered by the candidate."""
        return "ab-variant" if self.mode == "ab" else "canary"
