"""The worked example's vocabulary: surfaces, devices, registry stages, data presets and scenarios.

Every layer may use these names; the sample-data generator (``pipelines.simulation.generate``)
draws from the presets and scenarios declared here. See docs/features.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES: tuple[str, ...] = ("staging", "canary", "prod")
SURFACES: tuple[str, ...] = ("feed", "search", "recs")
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR


@dataclass(frozen=True)
class Preset:
    """Size of a generated data set."""

    n_users: int
    n_items: int
    days: int
    events: int  # expected number of impressions
    n_categories: int = 12


PRESETS: dict[str, Preset] = {
    # About 1.5M impressions over 14 days: `make run` stays well under 10 minutes on 2 cores.
    "full": Preset(n_users=30_000, n_items=4_000, days=14, events=1_500_000),
    # Small enough for every notebook and the end-to-end tests to run in seconds.
    "small": Preset(n_users=1_500, n_items=400, days=8, events=60_000),
}


@dataclass(frozen=True)
class Knobs:
    """The generating process; drift scenarios override some of these from a day on."""

    surface_pref: tuple[float, float, float] = (3.0, 2.0, 1.5)  # Dirichlet prior per user
    surface_logit: tuple[float, float, float] = (-3.0, -2.2, -2.7)
    device_logit: tuple[float, float, float] = (0.0, 0.1, -0.05)
    affinity: float = 0.9  # logit lift when item category matches the user's
    in_category_share: float = 0.5  # share of impressions drawn from the user's category
    position_slope: float = 0.35  # logit drop per log(position)
    new_item_share: float = 0.0  # share of impressions on items never seen before the drift


@dataclass(frozen=True)
class Scenario:
    """A named drift: knobs that replace the baseline process from ``start_day`` on."""

    description: str
    overrides: dict[str, object] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "none": Scenario("no drift: one stationary process"),
    "surface_shift": Scenario(
        "traffic moves to recommendations (input drift on surface and position)",
        {"surface_pref": (1.0, 1.0, 6.0)},
    ),
    "ctr_drop": Scenario(
        "clicks get rarer on every surface (output / concept drift)",
        {"surface_logit": (-3.8, -3.0, -3.5)},
    ),
    "new_items": Scenario(
        "a third of impressions go to brand-new items (cold start)",
        {"new_item_share": 0.33},
    ),
}
