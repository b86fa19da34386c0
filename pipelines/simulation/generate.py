"""Deterministic sample impression events for the click-through worked example.

Details: docs/features.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.core.domain import (
    DEVICES,
    MS_PER_DAY,
    MS_PER_HOUR,
    PRESETS,
    SCENARIOS,
    SURFACES,
    Knobs,
    Preset,
)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Draw one category per row from row-wise probabilities (rows sum to 1)."""
    cum = np.cumsum(probs, axis=1)
    u = np.asarray(rng.random(probs.shape[0]))[:, None]
    return np.minimum((u > cum).sum(axis=1), probs.shape[1] - 1)


def _quantized_bernoulli(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    grid = 1_000_000
    threshold = np.rint(np.clip(p, 0.0, 1.0) * grid).astype(np.int64)
    return rng.integers(0, grid, size=p.shape[0]) < threshold


def _ids(prefix: str, n: int, width: int) -> np.ndarray:
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def generate_events(
    preset: str | Preset = "small",
    seed: int = 42,
    start: str = "2026-10-01",
    scenario: str = "none",
    scenario_start_day: int = 0,
) -> pd.DataFrame:
    """Generate impression events, sorted by time, that satisfy the RawEvents contract.

    ``scenario`` names an entry of ``SCENARIOS``; its knobs apply to impressions on
    or after ``scenario_start_day`` (0 = the whole window).
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    size = PRESETS[preset] if isinstance(preset, str) else preset
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown drift scenario {scenario!r}; choose one of {sorted(SCENARIOS)}")
    base = Knobs()
    drifted = dataclasses.replace(base, **SCENARIOS[scenario].overrides)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    n_cat = size.n_categories

    # Users: heavy-tailed activity, a favourite category, a click propensity,
    # a primary device and per-user surface preferences (baseline and drifted).
    activity = rng.lognormal(0.0, 1.0, size.n_users)
    user_cat = rng.integers(0, n_cat, size.n_users)
    propensity = rng.normal(0.0, 0.5, size.n_users)
    primary_device = rng.choice(3, size=size.n_users, p=[0.6, 0.3, 0.1])
    pref_base = rng.dirichlet(base.surface_pref, size.n_users)
    pref_drift = rng.dirichlet(drifted.surface_pref, size.n_users)

    # Items: category, quality and a Zipf-like popularity.
    n_new = max(1, size.n_items // 10)
    item_cat = rng.integers(0, n_cat, size.n_items + n_new)
    quality = rng.normal(0.0, 0.6, size.n_items + n_new)
    popularity = 1.0 / np.arange(1, size.n_items + 1) ** 0.9
    popularity = popularity[rng.permutation(size.n_items)]

    # Impressions: who and when (daily cycle, weekend lift).
    n = int(rng.poisson(size.events))
    user = rng.choice(size.n_users, size=n, p=activity / activity.sum())
    hour_w = np.array(
        [2, 1, 1, 1, 1, 2, 4, 6, 7, 7, 7, 8, 9, 9, 8, 7, 7, 8, 9, 11, 12, 11, 8, 4], dtype=float
    )
    start_ms = int(pd.Timestamp(start, tz="UTC").value // 1_000_000)
    weekday0 = pd.Timestamp(start).day_of_week
    day_w = np.array([1.15 if (weekday0 + d) % 7 >= 5 else 1.0 for d in range(size.days)])
    day = rng.choice(size.days, size=n, p=day_w / day_w.sum())
    hour = rng.choice(24, size=n, p=hour_w / hour_w.sum())
    ts = start_ms + day * MS_PER_DAY + hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, n)
    is_drift = (day >= scenario_start_day) & (scenario != "none")

    pref = np.where(is_drift[:, None], pref_drift[user], pref_base[user])
    surface = _categorical(rng, pref)
    device = np.where(rng.random(n) < 0.85, primary_device[user], rng.integers(0, 3, n))

    # Items: half from the user's favourite category, the rest by global popularity;
    # under `new_items` drift a share goes to items that did not exist before.
    item = rng.choice(size.n_items, size=n, p=popularity / popularity.sum())
    in_cat = rng.random(n) < base.in_category_share
    for c in range(n_cat):
        members = np.flatnonzero(item_cat[: size.n_items] == c)
        rows = np.flatnonzero(in_cat & (user_cat[user] == c))
        if len(members) and len(rows):
            w = popularity[members]
            item[rows] = members[rng.choice(len(members), size=len(rows), p=w / w.sum())]
    new_share = np.where(is_drift, drifted.new_item_share, base.new_item_share)
    to_new = rng.random(n) < new_share
    item[to_new] = size.n_items + rng.integers(0, n_new, int(to_new.sum()))

    # Position: deeper lists on the feed than on search.
    geom_p = np.array([0.15, 0.35, 0.25])[surface]
    max_pos = np.array([30, 10, 12])[surface]
    position = np.minimum(rng.geometric(geom_p), max_pos)

    # Click model.
    surf_logit = np.where(
        is_drift,
        np.asarray(drifted.surface_logit)[surface],
        np.asarray(base.surface_logit)[surface],
    )
    logit = (
        surf_logit
        + quality[item]
        + base.affinity * (item_cat[item] == user_cat[user])
        + propensity[user]
        - base.position_slope * np.log(position)
        + np.asarray(base.device_logit)[device]
        + 0.15 * np.cos(2 * np.pi * (hour - 20) / 24)
    )
    clicked = _quantized_bernoulli(rng, 1.0 / (1.0 + np.exp(-logit)))
    delay = np.minimum(np.rint(rng.lognormal(np.log(15_000), 1.0, n)), 30 * 60_000).astype(np.int64)
    click_ms = np.where(clicked, ts + np.maximum(delay, 1), 0)

    order = np.lexsort((user, ts))
    user_ids = _ids("u", size.n_users, 6)
    item_ids = _ids("i", size.n_items + n_new, 5)
    frame = pd.DataFrame(
        {
            "event_id": pd.array([f"e{i:09d}" for i in range(n)], dtype="str"),
            "ts": pd.to_datetime(ts[order], unit="ms", utc=True).as_unit("ms"),
            "user_id": pd.array(user_ids[user[order]], dtype="str"),
            "item_id": pd.array(item_ids[item[order]], dtype="str"),
            "surface": pd.array(np.asarray(SURFACES, dtype=object)[surface[order]], dtype="str"),
            "device": pd.array(np.asarray(DEVICES, dtype=object)[device[order]], dtype="str"),
            "position": position[order].astype(np.int16),
            "clicked": clicked[order].astype(np.int8),
            "click_ts": pd.to_datetime(
                np.where(clicked[order], click_ms[order], np.iinfo(np.int64).min),
                unit="ms",
                utc=True,
            ).as_unit("ms"),
        }
    )
    return frame


def write_events(events: pd.DataFrame, folder: Path) -> Path:
    """Write events to ``folder/events.parquet`` atomically and return the path."""
    from pipelines.core.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "events.parquet"
    with atomic_path(target) as tmp:
        events.to_parquet(tmp, index=False, compression="zstd")
    return target
