"""The cost of each step of the request path, in process (no HTTP): where a request's time goes.

Loads the project's built release (``build/release/release.json``, models from its BentoML
store) as the service does, then times, per call of one row and of 1000 rows / candidates:
request validation (pydantic, from JSON bytes), the feature lookup (its searches on one
thread and on two; the one-user path of ``/rank``; and with the searches as they were,
over the whole array), routing, the
model (compiled library and scikit-learn), the request-log line (what the writer thread
serializes) and the whole ``Predictor`` call; a full garbage
collection while a profile window of 90,000 calls is held (as ``LogBatch`` objects, and
column-wise as the request log holds it now); and a reload
(``Runtime.load``) with the feature snapshot's index built again and reused. Median of
repeated calls. Most steps repeat one call's input, so its strings are hashed and its
data are in the caches after the first call: lower bounds. The steps marked "a different
batch each call" read a new body before each timed call (untimed), as a served call does.
Writes ``benchmarks/results/request_path.json`` and ``.md``.

Usage::

    python benchmarks/request_path.py --project .      # after `make run`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import orjson  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import machine  # noqa: E402
from tests.support.loadtest import workload  # noqa: E402
from tests.support.search import whole_array_locate  # noqa: E402


def timed(
    fn: Callable[..., Any], repeat: int, prepare: Callable[[int], Any] | None = None
) -> float:
    """Median milliseconds of ``repeat`` calls of ``fn`` (after two warm-up calls). With
    ``prepare``, call k is ``fn(prepare(k))`` and only ``fn`` is timed: each call gets
    input made just before it."""
    out = []
    for k in range(-2, repeat):
        given = () if prepare is None else (prepare(k),)
        started = time.perf_counter()
        fn(*given)
        if k >= 0:
            out.append(time.perf_counter() - started)
    return round(float(np.median(out)) * 1000.0, 4)


def loop_lag(work: Callable[[], Any]) -> dict[str, float]:
    """How late a 1 ms asyncio ticker wakes (ms) while ``work`` runs in another thread: how
    long the thread keeps the event loop from running."""
    import asyncio
    import threading

    async def tick() -> list[float]:
        thread = threading.Thread(target=work)
        thread.start()
        lags = []
        while thread.is_alive():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - started - 0.001) * 1000.0)
        return lags

    lags = np.array(asyncio.run(tick()))
    return {"max": round(float(lags.max()), 1), "p99": round(float(np.percentile(lags, 99)), 2)}


def timed_with(module: Any, name: str, stand_in: Any, fn: Callable[[], Any], repeat: int) -> float:
    """``timed(fn)`` with ``module.name`` replaced by ``stand_in`` meanwhile."""
    from unittest import mock

    with mock.patch.object(module, name, stand_in):
        return timed(fn, repeat)


def python_range_check_model() -> Any:
    """``PredictRequest`` as it was: the request-time range checked by a Python function that
    pydantic calls per row (now pydantic-core's own ``ge``/``lt`` bounds)."""
    from typing import Annotated

    from pydantic import AfterValidator, create_model

    from pipelines.serving.schema import _TIME_HI, _TIME_LO, PredictRequest

    lo, hi = _TIME_LO.replace(tzinfo=None), _TIME_HI.replace(tzinfo=None)

    def in_range(stamp: dt.datetime) -> dt.datetime:
        inside = lo <= stamp < hi if stamp.tzinfo is None else _TIME_LO <= stamp < _TIME_HI
        if not inside:
            raise ValueError("timestamp is outside the supported range")
        return stamp

    checked = Annotated[dt.datetime, AfterValidator(in_range)]
    return create_model(
        "PredictRequestBefore", __base__=PredictRequest, timestamp=(checked | None, None)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=REPO)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    project = args.project.resolve()
    os.environ["BENTOML_HOME"] = str(project / ".bentoml")
    import bentoml
    from pydantic import TypeAdapter

    from pipelines.features import search
    from pipelines.modeling.release import load_release
    from pipelines.serving.predictor import (
        Predictor,
        PredictRequest,
        RankRequest,
        Runtime,
        columns_request_model,
    )
    from pipelines.serving.schema import RequestRows, read_batch
    from pipelines.serving.sources import SnapshotFeatureSource
    from pipelines.serving.tiers import load_tier

    release = load_release(project / "build/release/release.json")

    def model_path(tag: str) -> Path:
        return Path(bentoml.models.get(tag).path)

    rt = Runtime.load(release, model_path)

    def rebuilt() -> Any:  # a reload that builds the feature snapshot's index again
        SnapshotFeatureSource._last = None
        return Runtime.load(release, model_path)

    reload_ms = {
        "snapshot index rebuilt": timed(rebuilt, 5),
        "same snapshot (index reused)": timed(lambda: Runtime.load(release, model_path), 5),
    }
    predictor = Predictor(rt)  # no request log: its cost is timed separately below
    prod = rt.tiers["prod"]
    os.environ["CTR_MODEL_RUNTIME"] = "sklearn"
    sk = load_tier("prod", release.prod, model_path(release.prod.tag))
    bodies = workload(project / "data", 1000)
    one = json.dumps(bodies[0]).encode()
    many = json.dumps(bodies).encode()
    batch_body = orjson.dumps({"requests": bodies})  # /predict_batch's body
    # Five other batches of 1000 rows (another seed), as bodies: read again before each
    # call that uses them.
    fresh = workload(project / "data", 5000, seed=1)
    fresh_bodies = [orjson.dumps({"requests": fresh[k : k + 1000]}) for k in range(0, 5000, 1000)]
    fresh_ones = [orjson.dumps(body) for body in fresh[:200]]

    def fresh_body(k: int) -> bytes:
        return fresh_bodies[k % len(fresh_bodies)]

    def fresh_rows(k: int) -> Any:  # a new batch's rows, read as the service reads them
        return read_batch(fresh_body(k), 5000)

    def fresh_one(k: int) -> Any:  # a new one-row call's request
        return PredictRequest.model_validate_json(fresh_ones[k % len(fresh_ones)])

    reqs = [PredictRequest.model_validate(b) for b in bodies]
    columns_of_rows = RequestRows.of(reqs)
    items = list(dict.fromkeys(b["item"] for b in bodies))
    rank = RankRequest.model_validate(
        {**{k: bodies[0][k] for k in ("user", "surface", "device", "timestamp")}, "items": items}
    )
    adapter = TypeAdapter(list[PredictRequest])
    per_row_check = TypeAdapter(list[python_range_check_model()])
    users = [r.user for r in reqs]
    its = [r.item for r in reqs]
    surfaces = [r.surface for r in reqs]
    devices = [r.device for r in reqs]
    t = np.array([int(r.timestamp.timestamp() * 1000) for r in reqs], dtype=np.int64)  # type: ignore[union-attr]
    X = rt.lookup(users, its, surfaces, devices, t).X
    columns_model = columns_request_model(5000)

    def rotating_searches(spare: bool) -> float:
        """Median ms of the searches of 50 different 1000-row batches, as a served worker
        meets them (repeating one batch finds its data in cache)."""
        from pipelines.features.definitions import EPOCH_MS, STRIDE

        index = rt.features.index  # type: ignore[union-attr]
        jobs = []
        for seed in range(1, 51):
            rows = workload(project / "data", 1000, seed=seed)
            codes = index.entity_codes(
                {
                    "user_id": [r["user"] for r in rows],
                    "item_id": [r["item"] for r in rows],
                    "surface": [r["surface"] for r in rows],
                    "device": [r["device"] for r in rows],
                }
            )
            t_ms = np.array(
                [int(dt.datetime.fromisoformat(r["timestamp"]).timestamp() * 1000) for r in rows]
            )
            t_rel = np.clip(t_ms - EPOCH_MS, 0, STRIDE - 1)
            jobs.append(
                {
                    key: (
                        index.histories.arrays[key],
                        index.histories.starts[key],
                        codes[key[0]],
                        t_rel,
                        windows,
                        STRIDE,
                    )
                    for key, windows in index.feature_set.windows.items()
                }
            )
        took = []
        with search.spare_core(spare):
            search.locate_all(jobs[0])
            for _ in range(3):
                for job in jobs:
                    started = time.perf_counter()
                    search.locate_all(job)
                    took.append(time.perf_counter() - started)
        return round(float(np.median(took)) * 1000.0, 4)

    def spare(fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` where a core is idle (a call alone in its worker)."""
        with search.spare_core():
            return fn(*args)

    as_columns = json.dumps(
        {
            "user": users,
            "item": its,
            "surface": surfaces,
            "device": devices,
            "timestamp_ms": t.tolist(),
        }
    ).encode()
    columns = columns_model.model_validate_json(as_columns)
    n_items = len(items)
    ids = [f"r{i}" for i in range(1000)]
    steps: dict[str, dict[str, float]] = {
        "validation (pydantic from JSON)": {
            "1 row": timed(lambda: PredictRequest.model_validate_json(one), args.repeat),
            "1000 rows": timed(lambda: adapter.validate_json(many), 20),
            "1000 rows, the range checked by a Python validator per row (before)": timed(
                lambda: per_row_check.validate_json(many), 20
            ),
            "1000 rows, one object per row, as columns (/predict_batch before)": timed(
                lambda: RequestRows.of(adapter.validate_json(many)), 20
            ),
            "1000 rows read as columns (/predict_batch)": timed(
                lambda: read_batch(batch_body, len(bodies)), 20
            ),
            "1000 rows read as columns, a different batch each call": timed(
                lambda body: read_batch(body, 5000), 20, fresh_body
            ),
            "1000 rows as columns (/predict_columns)": timed(
                lambda: columns_model.model_validate_json(as_columns), 20
            ),
        },
        "features (point-in-time lookup)": {
            "1 row": timed(
                lambda: rt.lookup(users[:1], its[:1], surfaces[:1], devices[:1], t[:1]), args.repeat
            ),
            "1 row, a different row each call": timed(
                lambda r: rt.lookup(r.users, r.items, r.surfaces, r.devices, r.t_ms),
                args.repeat,
                lambda k: RequestRows.of([fresh_one(k)]),
            ),
            "1000 rows": timed(lambda: rt.lookup(users, its, surfaces, devices, t), 20),
            "1000 rows, searches on two threads (a call alone in its worker)": timed(
                lambda: spare(rt.lookup, users, its, surfaces, devices, t), 20
            ),
            "1000 rows, a different batch each call, alone in its worker": timed(
                lambda rows: spare(
                    rt.lookup, rows.users, rows.items, rows.surfaces, rows.devices, rows.t_ms
                ),
                20,
                fresh_rows,
            ),
            "1000 rows, np.searchsorted over the whole array (before)": timed_with(
                search,
                "locate",
                whole_array_locate,
                lambda: rt.lookup(users, its, surfaces, devices, t),
                20,
            ),
            f"rank, {n_items} items (user once)": timed(
                lambda: rt.lookup(
                    [rank.user] * n_items,
                    items,
                    [rank.surface] * n_items,
                    [rank.device] * n_items,
                    np.full(n_items, t[0]),
                ),
                20,
            ),
        },
        "searches of the lookup (search.locate_all), 1000 rows": {
            "50 different batches, on one thread": rotating_searches(False),
            "50 different batches, on two threads (a call alone in its worker)": (
                rotating_searches(True)
            ),
        },
        "routing": {
            "1 row": timed(lambda: rt.router.plan(users[:1], ids[:1], False), args.repeat),
            "1000 rows": timed(lambda: rt.router.plan(users, ids, False), 20),
        },
        f"model, {prod.runtime}": {
            "1 row": timed(lambda: prod.predict(X[:1]), args.repeat),
            "1000 rows": timed(lambda: prod.predict(X), 20),
            "1000 rows, halves on two threads (a call alone in its worker)": timed(
                lambda: spare(prod.predict, X), 20
            ),
        },
        "model, sklearn": {
            "1 row": timed(lambda: sk.predict(X[:1]), args.repeat),
            "1000 rows": timed(lambda: sk.predict(X), 20),
        },
    }
    from pipelines.serving.request_log import LogBatch
    from pipelines.serving.window_rows import WindowRows

    def log_line(k: int) -> bytes:
        return batch(k).to_line()

    def batch(k: int, offset: int = 0) -> LogBatch:
        sl = slice(offset, offset + k)
        return LogBatch(
            "predict",
            "r",
            time.time(),
            1.0,
            ids[sl],
            users[sl],
            its[sl],
            surfaces[sl],
            devices[sl],
            t[sl],
            X[sl, 0],
            ["prod"] * k,
            ["m"] * k,
            [None] * k,
            np.zeros(k),
            list(release.feature_source.names),
            X[sl],
        )

    # A full garbage collection while the request log holds one profile window: 5 minutes
    # of one-row calls at 300 calls/s, as LogBatch objects (before) or column-wise
    # (WindowRows, now). Every thread waits for a full collection.
    import gc

    calls = 90_000
    gc.collect()
    gc.freeze()  # as the service does once its release is loaded
    gc_ms = {"no window held": timed(gc.collect, 5)}
    held: list[LogBatch] = [batch(1, i % 1000) for i in range(calls)]
    gc_ms["window as LogBatch objects (before)"] = timed(gc.collect, 5)
    rows = WindowRows()
    for b in held:
        rows.add(b)
    del held, b
    gc_ms["window column-wise (WindowRows)"] = timed(gc.collect, 5)
    # A window's rows on their way to the profiling helper (request_log): before, the whole
    # window was converted and written when it closed; now the writer thread writes a row
    # group of SPILL_ROWS rows while the window is open and, at the close, the rest and the
    # footer. Both while the worker serves.
    import tempfile

    import pyarrow.parquet as pq

    from pipelines.serving.window_rows import SPILL_ROWS

    def spilled(k: int) -> tuple[WindowRows, Path]:
        window = WindowRows()
        for _ in range(k // 1000):
            window.add(batch(1000))
        window.add(batch(k % 1000))
        return window, out

    def first_spill() -> None:  # opens the file and writes one row group
        window, path = spilled(SPILL_ROWS)
        started = time.perf_counter()
        window.spill(path)
        spill_ms.append((time.perf_counter() - started) * 1000.0)
        window.abandon()

    def close_after_spills() -> None:  # the rest (under SPILL_ROWS) and the footer
        window, path = spilled(SPILL_ROWS)
        window.spill(path)
        window.add(batch(1000))
        started = time.perf_counter()
        window.finish(path)
        close_ms.append((time.perf_counter() - started) * 1000.0)

    handoff: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "window.parquet"
        big = WindowRows()
        for _ in range(2000):
            big.add(batch(1000))
        for name, window in ((f"{calls:,} one-row calls", rows), ("2M rows", big)):
            handoff[f"{name}: whole window at its close (before)"] = timed(
                lambda w=window: pq.write_table(w.table(), out), 3
            )
        lag = loop_lag(lambda w=big: pq.write_table(w.table(), out))
        handoff["2M rows: event-loop lag during the whole-window write, longest"] = lag["max"]
        del big
        spill_ms: list[float] = []
        close_ms: list[float] = []
        for _ in range(7):
            first_spill()
            close_after_spills()
        handoff[f"one row group of {SPILL_ROWS:,} rows, during the window (spill)"] = round(
            float(np.median(spill_ms)), 4
        )
        handoff["window close after row groups: the rest and the footer"] = round(
            float(np.median(close_ms)), 4
        )
        lag = loop_lag(lambda: [first_spill() for _ in range(20)])
        handoff[f"event-loop lag during 20 row groups of {SPILL_ROWS:,}, longest"] = lag["max"]
        handoff[f"event-loop lag during 20 row groups of {SPILL_ROWS:,}, p99"] = lag["p99"]
    del rows

    steps["request-log line (writer thread)"] = {
        "1 row": timed(lambda: log_line(1), args.repeat),
        "1000 rows": timed(lambda: log_line(1000), 20),
    }
    steps["reload (Runtime.load of the release)"] = reload_ms
    steps["profile-window handoff (writer thread)"] = handoff
    steps[f"full GC pass, {calls:,} one-row calls in the profile window"] = gc_ms
    scored = predictor._rows(columns_of_rows, "predict_batch", None)
    steps["answer of /predict_batch (JSON objects)"] = {
        "1000 rows, a dict per row (before)": timed(
            lambda: orjson.dumps(Predictor._answers(scored)), 20
        ),
        "1000 rows, shared labels encoded once": timed(lambda: Predictor._answers_json(scored), 20),
    }
    steps["whole Predictor call"] = {
        "1 row": timed(lambda: predictor.predict(reqs[:1]), args.repeat),
        "1000 rows": timed(lambda: predictor.predict_json(columns_of_rows), 20),
        "1000 rows as columns": timed(lambda: predictor.predict_columns_json(columns), 20),
        "1000 rows as columns, alone in the worker (trees and searches on two threads)": timed(
            lambda: predictor.predict_columns_json(columns, inflight=1), 20
        ),
        "1000 rows, a different batch each call, alone in the worker": timed(
            lambda rows: predictor.predict_json(rows, inflight=1), 20, fresh_rows
        ),
        "1 row, a different row each call": timed(
            lambda r: predictor.predict([r]), args.repeat, fresh_one
        ),
        f"rank, {n_items} items": timed(lambda: predictor.rank_json(rank), 20),
    }
    predictor.close()
    report = {
        "benchmark": "request_path",
        "machine": machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "release": release.release_id,
        "prod_runtime": prod.runtime,
        "steps_ms": steps,
        "command": "python benchmarks/request_path.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_path.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        "# Request path: cost per step (in process, median ms)",
        "",
        f"{report['machine']['date']}, {report['machine']['cores']} cores "
        f"({report['machine']['cpu']}), load average {report['load_average'][0]} "
        "(shared machine).",
        "",
        "| step | call | ms |",
        "|---|---|---|",
    ]
    rows += [f"| {s} | {c} | {v} |" for s, calls in steps.items() for c, v in calls.items()]
    rows += ["", f"Reproduce: `{report['command']}`", ""]
    (args.out / "request_path.md").write_text("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
