"""Point-in-time features: brute-force reference, leakage, ties, window edges, unknowns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core.domain import Preset
from pipelines.features.definitions import (
    CTR_V1,
    WINDOWS_MS,
    EventIndex,
    to_ms,
)
from pipelines.features.offline import point_in_time_features
from pipelines.simulation.generate import generate_events

TINY = Preset(n_users=40, n_items=15, days=3, events=2_500)


def brute_force(
    events: pd.DataFrame, user: str, item: str, surface: str, t: int
) -> dict[str, float]:
    """Reference values straight from the documented semantics, one query at a time."""
    ts = to_ms(events["ts"])
    click_ts = np.where(
        events["clicked"].to_numpy() == 1, to_ms(events["click_ts"]), np.iinfo(np.int64).max
    )
    keys = {
        "user": events["user_id"].to_numpy() == user,
        "item": events["item_id"].to_numpy() == item,
        "user_surface": (events["user_id"].to_numpy() == user)
        & (events["surface"].to_numpy() == surface),
        "item_surface": (events["item_id"].to_numpy() == item)
        & (events["surface"].to_numpy() == surface),
    }
    out: dict[str, float] = {}
    for f in CTR_V1.features:
        if f.agg == "context":
            continue
        mask = keys[f.entity]
        w = WINDOWS_MS[f.window]
        lo = -np.inf if w is None else t - w

        def count(times: np.ndarray, mask: np.ndarray = mask, lo: float = lo) -> int:
            return int(((times > lo) & (times < t) & mask).sum())

        if f.agg == "count":
            out[f.name] = count(ts if f.source == "impressions" else click_ts)
        elif f.agg == "ctr":
            out[f.name] = (count(click_ts) + CTR_V1.prior_strength * CTR_V1.prior_ctr) / (
                count(ts) + CTR_V1.prior_strength
            )
        else:
            times = ts if f.source == "impressions" else click_ts
            seen = times[mask & (times < t) & (times > lo)]
            out[f.name] = (t - seen.max()) / 1000 if len(seen) else w / 1000
    return out


def test_offline_rows_equal_brute_force_reference() -> None:
    events = generate_events(TINY, seed=11)
    table = point_in_time_features(events)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(events), 60, replace=False):
        row = events.iloc[i]
        expected = brute_force(
            events, row.user_id, row.item_id, row.surface, int(to_ms([row.ts])[0])
        )
        for name, value in expected.items():
            assert table.iloc[i][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (i, name)


def test_future_events_never_change_earlier_rows() -> None:
    events = generate_events(TINY, seed=12)
    cut = events["ts"].iloc[len(events) // 2]
    past = events[events["ts"] < cut]
    # Clicks that happen after the cut are also future events: hide them from the past log.
    past = past.assign(
        clicked=np.where(past["click_ts"] < cut, past["clicked"], 0).astype("int8"),
        click_ts=past["click_ts"].where(past["click_ts"] < cut),
    )
    only_past = point_in_time_features(past)
    with_future = point_in_time_features(events).iloc[: len(past)]
    pd.testing.assert_frame_equal(
        only_past[CTR_V1.names].reset_index(drop=True),
        with_future[CTR_V1.names].reset_index(drop=True),
    )


def _one_user_log(times_ms: list[int], clicks: list[int | None]) -> pd.DataFrame:
    n = len(times_ms)
    return pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "ts": pd.to_datetime(times_ms, unit="ms", utc=True),
            "user_id": ["u1"] * n,
            "item_id": ["i1"] * n,
            "surface": ["feed"] * n,
            "device": ["mobile"] * n,
            "clicked": [0 if c is None else 1 for c in clicks],
            "click_ts": pd.to_datetime(
                [c if c is not None else None for c in clicks], unit="ms", utc=True
            ),
        }
    )


def test_window_edges_and_ties_are_exclusive() -> None:
    t0 = int(pd.Timestamp("2026-10-02", tz="UTC").value // 1_000_000)
    hour = WINDOWS_MS["1h"]
    assert hour is not None
    log = _one_user_log([t0, t0 - hour, t0 - hour + 1], [None, None, t0 - 10])
    index = EventIndex(log)
    row = index.lookup(["u1"], ["i1"], ["feed"], ["mobile"], np.array([t0])).iloc[0]
    # The event at exactly t is invisible; the one at exactly t - 1h is outside (t - w, t).
    assert row["user_impr_1h"] == 1
    assert row["user_impr_24h"] == 2
    assert row["user_clicks_24h"] == 1
    assert row["user_secs_since_click"] == pytest.approx(0.01)
    later = index.lookup(["u1"], ["i1"], ["feed"], ["mobile"], np.array([t0 + 1])).iloc[0]
    # At t0 + 1 the event at t0 is visible and t0 - 1h + 1 sits exactly on the open lower edge.
    assert later["user_impr_1h"] == 1
    assert later["user_impr_24h"] == 3


def test_unknown_entities_get_declared_defaults() -> None:
    events = generate_events(TINY, seed=13)
    index = EventIndex(events)
    row = index.lookup(
        ["nobody"], ["nothing"], ["search"], ["tablet"], np.array([index.as_of_ms])
    ).iloc[0]
    for f in CTR_V1.features:
        if f.agg != "context":
            assert row[f.name] == f.default, f.name
    assert row["surface_code"] == 1 and row["device_code"] == 2


def test_evaluate_wants_one_code_per_query() -> None:
    """``evaluate`` refuses entity codes of another length than the query times, naming the
    entity, instead of reading past them in its compiled kernels."""
    from pipelines.features.definitions import evaluate

    index = EventIndex(generate_events(TINY, seed=15))
    codes = index.entity_codes(
        {"user_id": ["u0", "u1"], "item_id": ["i0", "i1"], "surface": ["feed"] * 2}
    )
    t = np.full(2, index.as_of_ms)
    assert evaluate(CTR_V1, index.histories, codes, ["feed"] * 2, ["mobile"] * 2, t).shape == (
        2,
        len(CTR_V1.features),
    )
    codes["item"] = codes["item"][:1]
    with pytest.raises(ValueError, match="1 item codes for 2 queries"):
        evaluate(CTR_V1, index.histories, codes, ["feed"] * 2, ["mobile"] * 2, t)


def test_order_of_input_rows_does_not_matter() -> None:
    events = generate_events(TINY, seed=14)
    shuffled = events.sample(frac=1.0, random_state=1)
    a = EventIndex(events).lookup(
        events.user_id, events.item_id, events.surface, events.device, to_ms(events.ts)
    )
    b = EventIndex(shuffled).lookup(
        events.user_id, events.item_id, events.surface, events.device, to_ms(events.ts)
    )
    pd.testing.assert_frame_equal(a, b)


def test_online_single_lookup_equals_offline_row() -> None:
    """The service path (one request) and the batch path give identical vectors."""
    events = generate_events(TINY, seed=15)
    table = point_in_time_features(events)
    index = EventIndex(events)
    for i in (10, 500, 1500, len(events) - 1):
        row = events.iloc[i]
        one = index.lookup(
            [row.user_id], [row.item_id], [row.surface], [row.device], to_ms([row.ts])
        )
        assert one.iloc[0].tolist() == table.iloc[i][CTR_V1.names].tolist()


def test_locate_equals_searchsorted_on_the_whole_array() -> None:
    """The compiled per-entity search gives ``np.searchsorted`` of the whole sorted array
    clipped to the entity's slice: empty entities, unknown codes (-1), ties with the query
    time and window edges, times before and after every event, long and short histories.
    Both kernels (the one that keeps the GIL for small calls and the one that releases it)."""
    from pipelines.features.definitions import STRIDE
    from pipelines.features.search import KERNELS, RELEASE_GIL_QUERIES, locate
    from tests.support.search import whole_array_locate

    assert locate(*[np.zeros(k, np.int64) for k in (1, 2, 1, 1, 1)], 1)[0].tolist() == [0]
    assert 1 < RELEASE_GIL_QUERIES < 500  # the random query counts below cover both sides
    held, released = KERNELS
    assert not held.targetoptions.get("nogil") and released.targetoptions["nogil"]

    rng = np.random.default_rng(7)
    for trial in range(40):
        n_codes = int(rng.integers(1, 30))
        sizes = rng.integers(0, 3000 if trial % 4 == 0 else 40, n_codes)
        sizes[rng.random(n_codes) < 0.2] = 0  # entities without events of this source
        code = np.repeat(np.arange(n_codes), sizes)
        times = rng.integers(0, 50_000, len(code))  # dense: many ties
        arr = np.sort(code * STRIDE + times)
        starts = np.searchsorted(arr, np.arange(n_codes + 1) * STRIDE, side="left")
        queries = int(rng.integers(1, 500))
        codes = rng.integers(-1, n_codes, queries)
        t_rel = np.where(
            rng.random(queries) < 0.3,
            arr[rng.integers(0, max(len(arr), 1), queries)] % STRIDE if len(arr) else 0,
            rng.integers(0, 60_000, queries),
        ).astype(np.int64)
        windows = np.array(sorted(rng.choice([1, 10, 999, 5_000, 40_000], 3, replace=False)))

        want_lo, want_hi, want_first = whole_array_locate(
            arr, starts, codes, t_rel, windows, STRIDE
        )
        known = codes >= 0
        for kernel in KERNELS:
            lo, hi, first = kernel(arr, starts, codes, t_rel, windows, STRIDE)
            assert (lo[known] == want_lo[known]).all()
            assert (hi[known] == want_hi[known]).all()
            assert (hi[~known] == lo[~known]).all()
            for k, w in enumerate(windows):
                assert (first[known, k] == want_first[known, k]).all(), (trial, w, kernel)
                assert (first[~known, k] == lo[~known]).all()


def test_searches_of_a_large_call_with_a_spare_core_run_on_two_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``spare_core``, a call of ``SPLIT_QUERIES`` queries or more runs part of its
    searches on a helper thread; the results are the same searches' results, in the same
    order. Smaller calls, and calls without a spare core, stay on the calling thread."""
    import threading

    from pipelines.features import search

    rng = np.random.default_rng(3)
    searches = {}
    for key, size in (("a", 5000), ("b", 300), ("c", 2000), ("d", 40)):
        code = np.repeat(np.arange(20), rng.integers(0, size // 10, 20))
        arr = np.sort(code * 1_000_000 + rng.integers(0, 900_000, len(code)))
        starts = np.searchsorted(arr, np.arange(21) * 1_000_000, side="left")
        n = search.SPLIT_QUERIES
        searches[key] = (
            arr,
            starts,
            rng.integers(-1, 20, n),
            rng.integers(0, 900_000, n),
            np.array([1000, 50_000]),
            1_000_000,
        )
    where: dict[str, str] = {}
    plain_locate = search.locate

    def traced(*args: object) -> search.Located:
        key = next(k for k, s in searches.items() if s[0] is args[0])
        where[key] = threading.current_thread().name
        return plain_locate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "locate", traced)
    alone = search.locate_all(searches)
    assert set(where.values()) == {threading.current_thread().name}
    with search.spare_core():
        split = search.locate_all(searches)
        assert len(set(where.values())) == 2, where
        small = {k: (*s[:2], s[2][:-1], s[3][:-1], *s[4:]) for k, s in searches.items()}
        where.clear()
        search.locate_all(small)  # one query under SPLIT_QUERIES
        assert set(where.values()) == {threading.current_thread().name}
    assert list(split) == list(searches)
    for key in searches:
        for got, want in zip(split[key], alone[key], strict=True):
            assert np.array_equal(got, want)
        assert np.array_equal(alone[key][1], plain_locate(*searches[key])[1])


def test_a_forked_child_splits_its_searches_on_its_own_helper() -> None:
    """A process forked after the helper thread started gets a new helper: the parent's
    thread does not exist in the child, and a call handed to it would wait forever."""
    import os
    import signal
    import time

    from pipelines.features import search

    rng = np.random.default_rng(5)
    n = search.SPLIT_QUERIES
    arr = np.sort(rng.integers(0, 10**6, 5000))
    starts = np.array([0, len(arr)])
    one = (arr, starts, np.zeros(n, np.int64), rng.integers(0, 10**6, n), np.array([10]), 10**7)
    searches = {"a": one, "b": one}
    with search.spare_core():
        want = search.locate_all(searches)  # the helper thread exists from here on
        child = os.fork()
        if child == 0:  # the child: exit 0 once its own split call answered alike
            code = 4  # an exception: never back into pytest
            try:
                got = search.locate_all(searches)
                pairs = [(g, w) for k in want for g, w in zip(got[k], want[k], strict=True)]
                code = 0 if all(np.array_equal(g, w) for g, w in pairs) else 3
            finally:
                os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child's split call never answered")


def test_kernels_compile_in_memory_where_numba_has_nowhere_to_cache() -> None:
    """A read-only install (no writable ``__pycache__`` nor user cache) still imports and
    answers: numba refuses ``cache=True`` there at import, and the kernels (the searches and
    the request times' reader) compile in memory.
    Simulated with numba's locator override naming a locator that never applies to a file."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from pipelines.features import search\n"
        "from numba.core.caching import NullCache\n"
        "for kernel in (search._search, *search.KERNELS, search.derive, search.assemble):\n"
        "    assert isinstance(kernel._cache, NullCache), kernel._cache\n"
        "a = np.array([5, 9], np.int64)\n"
        "lo, hi, first = search.locate(a, np.array([0, 2]), np.array([0]), np.array([9]),"
        " np.array([1]), 100)\n"
        "assert (lo.tolist(), hi.tolist(), first.tolist()) == ([0], [1], [[1]])\n"
        "search.warm_up()  # every kernel, the feature values' included\n"
        "from pipelines.serving import times\n"
        "for kernel in (times._read, times._digits):\n"
        "    assert isinstance(kernel._cache, NullCache), kernel._cache\n"
        "assert times.read_times(['1969-12-31 23:59:59.9995-00:30']).tolist() == [1799999]\n"
        "from pipelines.features import keys\n"
        "for kernel in (keys._hash, keys._same, keys._entry, keys._fill, keys._probe,\n"
        "               keys._lookup):\n"
        "    assert isinstance(kernel._cache, NullCache), kernel._cache\n"
        "assert keys.KeyCodes(['a', 'b']).codes(['b', 'c']).tolist() == [1, -1]\n"
        "from pipelines.serving import answers\n"
        "assert isinstance(answers._assemble._cache, NullCache), answers._assemble._cache\n"
        "assert answers.join_rows([b'{', b'}'], [b'[1,2]'], 2) == b'[{1},{2}]'\n"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_key_tables_give_the_codes_of_a_dict_lookup() -> None:
    """The compiled table (``keys.KeyCodes``) answers each key's position in the vocabulary,
    -1 for unknown keys, as the dict it replaces would, for keys of any length and script;
    keys it cannot split (a newline, not a string) are left to that dict."""
    from pipelines.features.keys import KeyCodes

    rng = np.random.default_rng(5)
    vocab = [f"u{i:06d}" for i in range(5000)] + ["", "é-ü", "日本", "x" * 128, "u000001 "]
    vocab += ["".join(rng.choice(list("ab:_.-9"), int(rng.integers(1, 40)))) for _ in range(3000)]
    vocab = list(dict.fromkeys(vocab))
    table, codes = KeyCodes(vocab), {v: i for i, v in enumerate(vocab)}
    keys = list(rng.choice(vocab, 4000)) + ["u9999999", "u00000", "日", "x" * 129, "é-u", " "]
    keys = [str(k) for k in rng.permutation(keys)]
    assert table.codes(keys).tolist() == [codes.get(k, -1) for k in keys]
    assert table.codes([""]).tolist() == [codes[""]]
    assert table.codes(["a\nb", "u000001"]) is None
    assert table.codes([1, "u000001"]) is None  # type: ignore[list-item]
    assert KeyCodes(["a", "b", "a"]).codes(["a", "b"]).tolist() == [2, 1]  # as dict(...) does
    assert KeyCodes([]).codes(["a"]).tolist() == [-1]


def test_service_key_lists_and_offline_arrays_get_the_same_entity_codes() -> None:
    """``entity_codes`` of request-time lists (compiled tables, a dict for what they leave)
    equals that of the offline path (pandas over arrays), unknown keys included."""
    events = generate_events(TINY, seed=16)
    index = EventIndex(events)
    users = [*events.user_id.iloc[:300].tolist(), "u-new", "u\nnew"]
    items = [*events.item_id.iloc[:300].tolist(), "i-new", "i0"]
    surfaces = [*events.surface.iloc[:300].tolist(), "feed", "recs"]
    listed = index.entity_codes({"user_id": users, "item_id": items, "surface": surfaces})
    arrays = index.entity_codes(
        {
            "user_id": np.array(users, object),
            "item_id": np.array(items, object),
            "surface": np.array(surfaces, object),
        }
    )
    assert listed.keys() == arrays.keys()
    for entity in listed:
        assert listed[entity].tolist() == arrays[entity].tolist(), entity
    assert listed["user"][-2] == listed["user"][-1] == -1


def test_context_codes_of_request_lists_equal_the_offline_codes() -> None:
    """``surface_code`` and ``device_code`` of request-time lists (the compiled table for
    many rows, a dict for one) equal those of the offline path; unknown values code 0."""
    from pipelines.core.domain import DEVICES, SURFACES
    from pipelines.features.definitions import CONTEXT

    surfaces = [*SURFACES, "unknown", "", SURFACES[0]] * 2
    devices = [*DEVICES, "tv", "x\ny", DEVICES[0]] * 2  # a newline: left to the dict
    t = np.zeros(len(surfaces), np.int64)
    for name in ("surface_code", "device_code"):
        code = CONTEXT[name][1]
        offline = code(np.array(surfaces, object), np.array(devices, object), t)
        assert code(surfaces, devices, t).tolist() == offline.tolist(), name
        one = [code([s], [d], t[:1]).tolist()[0] for s, d in zip(surfaces, devices, strict=True)]
        assert one == offline.tolist(), name
    assert CONTEXT["surface_code"][1](["unknown", SURFACES[1]], ["x", "y"], t[:2]).tolist() == [
        0,
        1,
    ]
