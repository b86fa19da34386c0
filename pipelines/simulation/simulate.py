"""The closed loop, end to end: a named drift scenario replayed through the running service.

``mlops simulate`` walks every part of the feedback loop with the project's real
pieces, in order, and stops at the first step that fails:

Details: docs/monitoring.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core import config
from pipelines.core.io import md5_file, write_json
from pipelines.core.settings import SimulateSettings, settings_from
from pipelines.core.vcs import git
from pipelines.monitoring.requests import to_jsonable
from pipelines.simulation.launcher import Served

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ROLLED_BACK = 2  # the canary was rolled back although it was not forced to be bad
EXIT_STOPPED = 3  # nothing to act on: no drift, or too little canary traffic to judge


class SimulationError(RuntimeError):
    """A step of the loop failed; the message says which, why and what to do."""


_git = partial(git, error=SimulationError)


class SimulationStopped(RuntimeError):
    """The loop ended early for a reason that is not an error (no drift, canary undecided)."""


@dataclass
class Step:
    """One step of the loop as the summary reports it."""

    name: str
    status: str  # ok | failed | stopped | skipped
    seconds: float
    summary: str
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationResult:
    """What a run did, step by step, and how it ended."""

    scenario: str
    run_dir: str
    steps: list[Step] = field(default_factory=list)
    outcome: str = "failed"  # promoted | rolled_back | stopped | failed
    exit_code: int = EXIT_FAILED
    message: str = ""
    final_stages: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "scenario": self.scenario,
                "run_dir": self.run_dir,
                "outcome": self.outcome,
                "exit_code": self.exit_code,
                "message": self.message,
                "final_stages": self.final_stages,
                "steps": [vars(s) for s in self.steps],
            }
        )


# --- the service ---------------------------------------------------------------------------


@dataclass
class Service:
    """A service the loop talks to: started here (``served``) or already running (URL only)."""

    url: str
    release_file: Path
    log_dir: Path
    token_env: str
    served: Served | None = None

    @property
    def output(self) -> Path | None:
        return None if self.served is None else self.served.log_path

    def _headers(self, admin: bool = False) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if admin:
            token = os.environ.get(self.token_env, "")
            if not token:
                raise SimulationError(
                    f"environment variable {self.token_env} (the service's admin token) is not "
                    "set; export the token the service was started with"
                )
            headers["authorization"] = f"Bearer {token}"
        return headers

    def post(self, path: str, body: Any, admin: bool = False, timeout: float = 60.0) -> Any:
        import httpx

        try:
            response = httpx.post(
                self.url + path,
                content=json.dumps(body).encode(),
                headers=self._headers(admin),
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            raise SimulationError(
                f"{self.url}{path} unreachable: {type(exc).__name__}: {exc}{self._tail()}"
            ) from exc
        if response.status_code == 202 and admin:
            # recorded, but a worker had not applied it yet (restarting or slow): wait for it
            answer = response.json()
            self.wait_applied(answer["workers"], timeout)
            return answer
        if response.status_code != 200:
            raise SimulationError(
                f"{self.url}{path} answered HTTP {response.status_code}: "
                f"{response.text[:500]}{self._tail()}"
            )
        return response.json()

    def wait_applied(self, workers: dict[str, Any], timeout: float) -> None:
        """Poll ``/metadata`` until ``workers["expected"]`` live workers, and every live
        one, acknowledged ``workers["generation"]`` without error."""
        import httpx

        from pipelines.serving.pod import verdict

        deadline = time.monotonic() + timeout
        failed = workers.get("failed")
        while not failed:
            meta = httpx.post(
                self.url + "/metadata", json={}, headers=self._headers(True), timeout=10
            )
            acks = meta.json()["pod"]["workers"]
            settled, report = verdict(acks, workers["generation"], workers["expected"])
            if report["complete"]:
                return
            failed = settled and report["failed"]
            if not failed and time.monotonic() > deadline:
                raise SimulationError(
                    f"workers {report['pending']} (of {len(acks)} live, "
                    f"{workers['expected']} expected) had not applied generation "
                    f"{workers['generation']} after {timeout:.0f} s{self._tail()}"
                )
            time.sleep(0.3)
        raise SimulationError(f"workers failed to apply the change: {failed}{self._tail()}")

    def _tail(self) -> str:
        if self.served is not None and self.served.log_path.is_file():
            return f"\nservice output ({self.output}), last lines:\n" + "\n".join(
                self.served.tail().splitlines()[-15:]
            )
        return ""

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            proc = None if self.served is None else self.served.proc
            if proc is not None and proc.poll() is not None:
                raise SimulationError(
                    f"bentoml serve exited with code {proc.returncode} before it was "
                    f"ready{self._tail()}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"the service at {self.url} was not ready within {timeout:.0f} s{self._tail()}"
                )
            time.sleep(0.3)

    def reload(self) -> dict[str, Any]:
        """``/admin/reload``: the service re-reads its release file; refuses load problems."""
        answer = self.post("/admin/reload", {}, admin=True, timeout=120)
        if answer.get("problems"):
            raise SimulationError(
                f"the service reloaded {answer.get('release_id')} with problems: "
                f"{answer['problems']}"
            )
        return dict(answer)

    def stop(self) -> None:
        """SIGTERM (clean shutdown: the request log is flushed) and wait; kill if stuck."""
        if self.served is not None:
            self.served.stop()


def start_service(
    root: Path,
    run_dir: Path,
    release_file: Path,
    bentoml_home: Path,
    token_env: str,
    fault_injection: bool,
    timeout: float,
    port: int | None = None,
) -> Service:
    """``bentoml serve bentos.service:CtrService`` on 127.0.0.1 with this run's release and log.

    Served from the project's source and BentoML store (not from one bento) so that
    ``/admin/reload`` can switch to any model version the store holds, which is what
    a registry-driven canary and promotion need.
    """
    if not os.environ.get(token_env):
        os.environ[token_env] = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "OMP_NUM_THREADS": "1",
        "MLOPS_PROJECT_ROOT": str(root),
        "CTR_RELEASE_FILE": str(release_file),
        "CTR_REQUEST_LOG_DIR": str(run_dir / "requests"),
        "CTR_PROFILE_DIR": str(run_dir / "live"),
        "CTR_STATE_DIR": str(run_dir / "serving_state"),
    }
    if fault_injection:
        env["CTR_ENABLE_FAULT_INJECTION"] = "1"
    else:
        env.pop("CTR_ENABLE_FAULT_INJECTION", None)
    output = run_dir / "service.log"
    try:
        served = Served("bentos.service:CtrService", port, env, root, output, timeout)
    except RuntimeError as exc:
        raise SimulationError(f"bentoml serve did not start: {exc}") from None
    return Service(served.url, release_file, run_dir / "requests", token_env, served)


# --- traffic -------------------------------------------------------------------------------


def scenario_traffic(
    events: pd.DataFrame, start_day: int, sizes: tuple[int, ...], seed: int
) -> list[pd.DataFrame]:
    """Disjoint random samples of the impressions on or after ``start_day``, each in time order."""
    first = events["ts"].min().floor("D") + pd.Timedelta(days=start_day)
    pool = events[events["ts"] >= first]
    if len(pool) < sum(sizes):
        raise SimulationError(
            f"the scenario window (from {first.date()}) has {len(pool):,} impressions but "
            f"{sum(sizes):,} requests were asked for; lower --requests/--canary-requests or "
            "start the scenario earlier"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    out, lo = [], 0
    for size in sizes:
        rows = pool.iloc[np.sort(order[lo : lo + size])]
        out.append(rows.sort_values("ts", kind="stable").reset_index(drop=True))
        lo += size
    return out


def send_traffic(service: Service, rows: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """POST the impressions to ``/predict_batch`` (event time as request time); the answers.

    Returns one row per impression: ``event_id``, the service's ``request_id``,
    ``route``, ``model_version``, ``probability``, ``degraded``, ``clicked`` and
    ``click_ts`` (the delayed label).
    """
    answers: list[dict[str, Any]] = []
    stamps = rows["ts"].map(lambda t: t.isoformat())
    for lo in range(0, len(rows), batch_size):
        chunk = rows.iloc[lo : lo + batch_size]
        body = {
            "requests": [
                {
                    "user": u,
                    "item": i,
                    "surface": s,
                    "device": d,
                    "timestamp": t,
                }
                for u, i, s, d, t in zip(
                    chunk["user_id"],
                    chunk["item_id"],
                    chunk["surface"],
                    chunk["device"],
                    stamps.iloc[lo : lo + batch_size],
                    strict=True,
                )
            ]
        }
        got = service.post("/predict_batch", body)
        if len(got) != len(chunk):
            raise SimulationError(
                f"/predict_batch answered {len(got)} rows for {len(chunk)} requests"
            )
        answers.extend(got)
    out = pd.DataFrame(answers)
    out.insert(0, "event_id", rows["event_id"].astype(str).to_numpy())
    out["clicked"] = rows["clicked"].to_numpy()
    out["click_ts"] = rows["click_ts"].to_numpy()
    return out


def clicks_for(answers: pd.DataFrame) -> pd.DataFrame:
    """The delayed clicks of the answered impressions, keyed by the service's request id."""
    clicked = answers[answers["clicked"] == 1]
    return pd.DataFrame(
        {
            "request_id": clicked["request_id"].astype(str).to_numpy(),
            "click_ts": pd.to_datetime(clicked["click_ts"], utc=True).to_numpy(),
        }
    ).assign(click_ts=lambda f: pd.to_datetime(f["click_ts"], utc=True))


def wait_for_log(log_dir: Path, request_ids: set[str], timeout: float) -> pd.DataFrame:
    """The normalized request-log rows of ``request_ids`` once the service has written them all."""
    from pipelines.monitoring.requests import RequestLogError, read_request_log

    deadline = time.monotonic() + timeout
    found = 0
    while True:
        try:
            log = read_request_log(log_dir)
            mine = log[log["request_id"].astype(str).isin(request_ids)]
            found = len(mine)
            if found >= len(request_ids):
                return mine.reset_index(drop=True)
        except RequestLogError:
            pass
        if time.monotonic() > deadline:
            raise SimulationError(
                f"the service's request log in {log_dir} holds {found} of the "
                f"{len(request_ids)} answered requests after {timeout:.0f} s; is the service "
                "writing its log there (CTR_REQUEST_LOG_DIR / serving.request_log_dir)?"
            )
        time.sleep(0.5)


# --- the loop ------------------------------------------------------------------------------


class Simulation:
    """One run of the closed loop; ``run`` returns the result and never leaves a server up."""

    def __init__(
        self,
        root: Path,
        scenario: str,
        settings: SimulateSettings,
        bad_canary: bool = False,
        candidate: str | None = None,
        url: str | None = None,
        release_file: Path | None = None,
        log_dir: Path | None = None,
        webhook: str | None = None,
        echo: Callable[[str], None] = print,
    ):
        from pipelines.core.domain import SCENARIOS

        if scenario not in SCENARIOS:  # "none" is the undrifted control run
            raise config.ConfigError(
                f"unknown drift scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}"
            )
        if url and release_file is None:
            raise config.ConfigError(
                "--url needs --release-file: the release file that service reads "
                "(its CTR_RELEASE_FILE), so the loop can change the release and reload it"
            )
        self.root = root.resolve()
        self.scenario = scenario
        self.settings = settings
        self.bad_canary = bad_canary
        self.candidate_version = candidate
        self.url = url
        self.webhook = webhook
        self.echo = echo
        self.params = config.load_params(self.root / "params.yaml")
        self.project = settings_from(self.params, self.root / "params.yaml")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        self.run_dir = self.root / settings.out_dir / f"{stamp}-{scenario}"
        self.external_release = release_file
        self.external_log_dir = log_dir
        self.result = SimulationResult(scenario, str(self.run_dir.relative_to(self.root)))
        self.service: Service | None = None
        self._step_no = 0
        self._total = 12

    # -- bookkeeping

    def _rel(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def _step(self, name: str, action: Callable[[], tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        self._step_no += 1
        self.echo(f"==> [{self._step_no}/{self._total}] {name}")
        started = time.perf_counter()
        try:
            summary, outputs = action()
        except SimulationStopped as exc:
            step = Step(name, "stopped", round(time.perf_counter() - started, 1), str(exc))
            self.result.steps.append(step)
            self.echo(f"    stopped: {exc}")
            raise
        except Exception as exc:
            message = (
                str(exc) if isinstance(exc, SimulationError) else f"{type(exc).__name__}: {exc}"
            )
            step = Step(name, "failed", round(time.perf_counter() - started, 1), message)
            self.result.steps.append(step)
            self.echo(f"    FAILED: {message}")
            raise SimulationError(f"step '{name}' failed: {message}") from exc
        step = Step(name, "ok", round(time.perf_counter() - started, 1), summary, outputs)
        self.result.steps.append(step)
        self.echo(f"    {summary} ({step.seconds:.1f} s)")
        return outputs

    def _skip(self, name: str, why: str) -> None:
        self._step_no += 1
        self.echo(f"==> [{self._step_no}/{self._total}] {name}\n    skipped: {why}")
        self.result.steps.append(Step(name, "skipped", 0.0, why))

    # -- entry point

    def run(self) -> SimulationResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo(f"closed-loop simulation of '{self.scenario}'; run folder {self.result.run_dir}")
        try:
            self._run()
        except SimulationStopped as exc:
            self.result.outcome, self.result.exit_code = "stopped", EXIT_STOPPED
            self.result.message = str(exc)
        except (SimulationError, config.ConfigError) as exc:
            self.result.outcome, self.result.exit_code = "failed", EXIT_FAILED
            self.result.message = str(exc)
        finally:
            if self.service is not None and self.service.served is not None:
                self.service.stop()
                self.echo(f"service stopped (output: {self._rel(self.service.output or '')})")
            try:
                from pipelines.registry.registry import Registry

                self.result.final_stages = Registry(self.root).holders()
            except Exception as exc:  # the summary must still be written
                self.result.final_stages = {"error": str(exc)}
            write_json(self.run_dir / "summary.json", self.result.to_dict())
        return self.result

    def _run(self) -> None:
        from pipelines.monitoring.alerts import AlertSink
        from pipelines.monitoring.monitor import MonitorConfig
        from pipelines.stages.packaging import use_bentoml_home

        self.bentoml_home = self.root / str(self.project.base.bentoml_home)
        use_bentoml_home(self.bentoml_home)
        self.cfg = MonitorConfig.load(self.root, self.params)
        self.alerts: AlertSink = self.cfg.alert_sink(self.webhook)

        prod = self._step("registry: version in prod", self._registry_prod)
        scenario = self._step("scenario: drifted world and feature snapshot", self._scenario)
        self._step(
            "service: start" if not self.url else "service: reload",
            lambda: self._service(prod, scenario),
        )
        traffic = self._step("traffic: drifted requests through the service", self._traffic)
        drift = self._step("drift: monitor the service's request log", lambda: self._drift(traffic))
        self._step("alert: webhook and log", lambda: self._alert_summary(drift))
        if self.candidate_version:
            why = f"--candidate {self.candidate_version}: canary an already registered version"
            self._skip("retrain: dvc repro on the new window", why)
            self._skip("register: quality gates and GTO tags", why)
            candidate = self._step(
                "candidate: registered version", lambda: self._existing_candidate(prod)
            )
        else:
            self._step("retrain: dvc repro on the new window", lambda: self._retrain(drift))
            candidate = self._step(
                "register: quality gates and GTO tags", lambda: self._register(prod)
            )
        self._step("canary: promote and reload the service", lambda: self._canary(prod, candidate))
        canary_traffic = self._step(
            "canary traffic: requests through the service", self._canary_traffic
        )
        verdict = self._step(
            "canary check: guard compares canary with prod",
            lambda: self._canary_check(candidate, canary_traffic),
        )
        self._step(
            "promote to prod" if verdict["decision"] == "healthy" else "rollback confirmed",
            lambda: self._finish(prod, candidate, verdict),
        )

    # -- steps

    def _registry_prod(self) -> tuple[str, dict[str, Any]]:
        from pipelines.registry.registry import Registry, RegistryError

        registry = Registry(self.root)
        holders = registry.holders()
        if holders.get("prod"):
            version = str(holders["prod"])
            _, commit = registry.resolve(version)
            return f"prod is {version} (commit {commit[:12]})", {
                "version": version,
                "commit": commit,
                "bootstrapped": False,
            }
        self._require_clean("register the current model as the first prod version")
        try:
            reg = registry.register(reason="closed-loop simulation: first version")
            version = reg["version"]
            registry.promote(
                version,
                "prod",
                approver=self.settings.approver,
                reason=(
                    "closed-loop simulation: the first version goes to prod directly, there is "
                    "no earlier version to canary against"
                ),
                emergency=True,
            )
        except RegistryError as exc:
            raise SimulationError(f"could not put the current model in prod: {exc}") from exc
        _, commit = registry.resolve(version)
        return (
            f"registry had no prod version: registered the current model as {version} and put it "
            "in prod (emergency: canary skipped, recorded in the tag)",
            {"version": version, "commit": commit, "bootstrapped": True, "tags": reg["tags"]},
        )

    def _require_clean(self, why: str) -> None:
        dirty = _git(self.root, "status", "--porcelain", "--untracked-files=no")
        if dirty:
            raise SimulationError(
                f"the working tree has uncommitted changes ({', '.join(dirty.split()[1::2][:8])}) "
                f"and the loop must {why} from a commit; commit or stash them first"
            )

    def _scenario(self) -> tuple[str, dict[str, Any]]:
        from pipelines.core.domain import PRESETS
        from pipelines.simulation.generate import generate_events, write_events

        preset = str(self.project.generate.preset)
        start_day = int(self.settings.scenario_start_day)
        days = PRESETS[preset].days if preset in PRESETS else None
        if days is not None and not 0 <= start_day < days:
            raise SimulationError(
                f"scenario start day {start_day} is outside the {days} days of preset {preset}"
            )
        events = generate_events(
            preset,
            int(self.project.base.seed),
            str(self.project.generate.start),
            self.scenario,
            start_day,
        )
        self.events_file = write_events(events, self.run_dir / "events")
        self.events = events
        snapshot = self._save_snapshot(self.events_file)
        first = events["ts"].min().floor("D") + pd.Timedelta(days=start_day)
        return (
            f"{len(events):,} events of preset {preset}, '{self.scenario}' from day {start_day} "
            f"({first.date()}); feature snapshot {snapshot}",
            {"events": self._rel(self.events_file), "snapshot": snapshot, "drift_from": first},
        )

    def _save_snapshot(self, events_file: Path) -> str:
        """Store the events as the release's feature snapshot (what ``package`` stores)."""
        from pipelines.stages.packaging import FEATURES_NAME, save_bento_model

        md5 = md5_file(events_file)
        feature_set = str(self.project.features.feature_set)
        self.snapshot_tag = save_bento_model(
            FEATURES_NAME,
            f"f{md5[:12]}",
            {"events.parquet": events_file},
            {"events_md5": md5, "feature_set": feature_set},
        )
        self.snapshot_md5 = md5
        from pipelines.modeling.release import file_sha256

        self.snapshot_sha256 = file_sha256(events_file)
        return self.snapshot_tag

    def _model_at(self, version: str, commit: str) -> Any:
        """The prod ModelRef of the release ``version`` shipped (read from DVC at its commit)."""
        from pipelines.core.lineage import dvc_filesystem, read_dvc_json
        from pipelines.modeling.release import Release
        from pipelines.stages.packaging import model_ref

        path = str(self.project.package.release_file)
        data, why = read_dvc_json(dvc_filesystem(self.root, commit), path)
        if data is None:
            raise SimulationError(
                f"cannot read the release of {version} at commit {commit[:12]} ({why}); "
                "run `dvc pull` or `mlops model rollback` to fetch it"
            )
        tag = Release.model_validate(data).prod.tag
        return model_ref(tag)

    def _release(self, prod: Any, candidate: Any = None, previous: Any = None) -> Any:
        """A release over this run's feature snapshot; canary routing when there is a candidate."""
        from pipelines.modeling.release import FeatureRef, build_release

        policy = self.project.serving.model_copy(
            update={
                "routing": "canary" if candidate is not None else "none",
                "candidate_share": self.settings.canary_share,
                "candidate_model": candidate.tag if candidate is not None else "none",
            }
        )
        features = FeatureRef(
            tag=self.snapshot_tag,
            feature_set=prod.feature_set,
            names=self.cfg.feature_names,
            files={"events.parquet": self.snapshot_md5},
            sha256={"events.parquet": self.snapshot_sha256},
        )
        return build_release(
            str(self.project.package.service_name),
            policy,
            features,
            prod,
            candidate,
            previous,
            source="mlops simulate",
        )

    def _write_release(self, release: Any, name: str) -> Path:
        """Keep a copy in the run folder and write the file the service reads."""
        write_json(self.run_dir / "releases" / f"{name}.json", release.to_json_dict())
        target = self.external_release or self.run_dir / "release.json"
        write_json(target, release.to_json_dict())
        return target

    def _service(
        self, prod: dict[str, Any], scenario: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        self.prod_ref = self._model_at(prod["version"], prod["commit"]).model_copy(
            update={"registry_version": prod["version"], "stage": "prod"}
        )
        release = self._release(self.prod_ref)
        release_file = self._write_release(release, "1-prod")
        token_env = str(self.project.serving.admin_token_env)
        if self.url:
            log_dir = self.external_log_dir or self.root / str(self.project.serving.request_log_dir)
            self.service = Service(self.url.rstrip("/"), release_file, log_dir, token_env)
            self.service.wait_ready(10)
            answer = self.service.reload()
            return (
                f"reloaded {self.url} with release {answer['release_id']} "
                f"(prod {prod['version']} = {self.prod_ref.tag})",
                {"url": self.url, "release": self._rel(release_file)},
            )
        self.service = start_service(
            self.root,
            self.run_dir,
            release_file,
            self.bentoml_home,
            token_env,
            self.bad_canary,
            self.settings.startup_timeout_seconds,
        )
        return (
            f"bentoml serve on {self.service.url}, release {release.release_id} "
            f"(prod {prod['version']} = {self.prod_ref.tag}, features {self.snapshot_tag})",
            {
                "url": self.service.url,
                "release": self._rel(release_file),
                "request_log": self._rel(self.service.log_dir),
                "service_output": self._rel(self.service.output or ""),
            },
        )

    def _send(self, rows: pd.DataFrame, name: str) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
        assert self.service is not None
        answers = send_traffic(self.service, rows, self.settings.batch_size)
        answers.to_parquet(self.run_dir / f"{name}-answers.parquet", index=False)
        clicks = clicks_for(answers)
        clicks.to_parquet(self.run_dir / f"{name}-clicks.parquet", index=False)
        log = wait_for_log(
            self.service.log_dir,
            set(answers["request_id"].astype(str)),
            self.settings.log_wait_seconds,
        )
        return answers, clicks, log

    def _traffic(self) -> tuple[str, dict[str, Any]]:
        phases = scenario_traffic(
            self.events,
            int(self.settings.scenario_start_day),
            (self.settings.requests, self.settings.canary_requests),
            int(self.project.base.seed),
        )
        self.canary_rows = phases[1]
        answers, clicks, log = self._send(phases[0], "traffic")
        self.traffic_log, self.traffic_clicks = log, clicks
        routes = answers["route"].value_counts().to_dict()
        return (
            f"{len(answers):,} requests answered ({routes}), {len(clicks):,} delayed clicks; "
            f"{len(log):,} rows in the service's request log",
            {"requests": len(answers), "routes": routes, "clicks": len(clicks)},
        )

    def _drift(self, traffic: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from pipelines.monitoring.monitor import check, save_result

        result = check(
            self.cfg, self.traffic_log, self.traffic_clicks, alerts=self.alerts, retrain_run="none"
        )
        path = save_result(self.cfg, result)
        summary = result.drift.summary()
        drifted = [c.column for c in result.drift.drifted]
        outputs = {
            "result": self._rel(path),
            "dataset_drift": bool(summary.get("dataset_drift")),
            "prediction_drift": bool(summary.get("prediction_drift")),
            "drift_share": summary.get("drift_share"),
            "drifted_columns": drifted,
            "quality_breaches": len(result.quality_breaches),
            "signal_breaches": len(result.signal_breaches),
            "trigger": result.trigger,
            "alerts": result.alerts,
        }
        self._drift_outputs = outputs
        if not result.trigger and not self.candidate_version:
            raise SimulationStopped(
                f"no retraining trigger: {len(drifted)} column(s) drifted "
                f"(dataset drift {summary.get('dataset_drift')}), no quality breach; the loop "
                f"has nothing to act on (result: {self._rel(path)})"
            )
        if not result.trigger:  # --candidate: the version to canary is given, no trigger needed
            return (
                f"no retraining trigger ({len(drifted)} column(s) drifted); going on with "
                f"--candidate {self.candidate_version} (result: {self._rel(path)})",
                outputs,
            )
        return (
            f"dataset drift {summary.get('dataset_drift')} (share {summary.get('drift_share'):.0%}"
            f", {len(drifted)} columns: {', '.join(drifted[:6])}"
            f"{' ...' if len(drifted) > 6 else ''}); trigger {result.trigger}; result "
            f"{self._rel(path)}",
            outputs,
        )

    def _alert_summary(self, drift: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        alerts = drift["alerts"]
        by_status: dict[str, int] = {}
        for a in alerts:
            by_status[a["status"]] = by_status.get(a["status"], 0) + 1
        failed = by_status.get("failed", 0)
        where = self.alerts.webhook_url or "the log only (no webhook set)"
        if not alerts and not drift["trigger"]:  # --candidate on undrifted traffic
            return "no alert: the monitor found nothing to report", {"alerts": []}
        if not alerts:
            raise SimulationError("the monitor raised no alert for the breaches it found")
        if failed:
            raise SimulationError(
                f"{failed} of {len(alerts)} alert(s) could not be delivered to {where}; "
                f"see the mlops.alerts log and {self._rel(self.alerts.state_db)}"
            )
        return (
            f"{len(alerts)} alert(s) to {where} ({by_status}); keys: "
            + ", ".join(a["key"] for a in alerts[:8])
            + (" ..." if len(alerts) > 8 else ""),
            {
                "alerts": alerts,
                "webhook": self.alerts.webhook_url or None,
                "state_db": self._rel(self.alerts.state_db),
            },
        )

    def _retrain(self, drift: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from pipelines.monitoring.retrain import run_retraining

        self._require_clean("commit the retrained outputs")
        raw_dir = self.root / str(self.project.base.raw_dir)
        model_dir = self.root / str(self.project.train.out_dir)
        old_md5 = str(self.prod_ref.files["model.joblib"])  # the model in prod
        raw_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.events_file, raw_dir / "events.parquet")
        added = subprocess.run(
            [sys.executable, "-m", "dvc", "add", "-q", str(raw_dir.relative_to(self.root))],
            cwd=self.root,
            capture_output=True,
            text=True,
        )
        if added.returncode != 0:
            raise SimulationError(
                f"`dvc add data` failed: {(added.stderr or added.stdout).strip()[-800:]}; "
                "`dvc checkout data.dvc` restores the previous data"
            )
        trigger = self.root / drift["trigger"]
        run = run_retraining(self.root, "repro", trigger, self.cfg.retrain.timeout_minutes)
        if run["status"] != "succeeded":
            raise SimulationError(
                f"`dvc repro` exited {run['returncode']} (record: {drift['trigger']}); output "
                f"tail:\n{run['output_tail'][-1500:]}\ndata/ holds the scenario's events; "
                "`git checkout data.dvc && dvc checkout` restores the previous state"
            )
        new_md5 = md5_file(model_dir / "model.joblib")
        if new_md5 == old_md5:
            raise SimulationError(
                "`dvc repro` produced the prod model again (the new window did not change the "
                "training split); start the scenario earlier (--scenario-start-day) so it "
                "reaches the training days"
            )
        _git(self.root, "add", "-u")
        _git(self.root, "add", "--", "data.dvc")
        if _git(self.root, "status", "--porcelain", "--untracked-files=no"):
            _git(
                self.root,
                "commit",
                "-q",
                "-m",
                f"Retrain on the '{self.scenario}' data window (closed-loop simulation)",
                "-m",
                f"Trigger {drift['trigger']}: {drift['drifted_columns'][:8]} drifted; "
                f"dvc repro {run['seconds']} s. Model md5 {old_md5} -> {new_md5}.",
            )
        commit = _git(self.root, "rev-parse", "HEAD")
        return (
            f"data/ = the scenario window (dvc add), dvc repro in {run['seconds']} s, model "
            f"md5 {old_md5[:12]} -> {new_md5[:12]}, committed {commit[:12]}",
            {
                "trigger": drift["trigger"],
                "seconds": run["seconds"],
                "old_model_md5": old_md5,
                "new_model_md5": new_md5,
                "commit": commit,
            },
        )

    def _register(self, prod: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from pipelines.modeling.release import load_release
        from pipelines.registry.registry import Registry, RegistryError
        from pipelines.stages.packaging import model_ref

        registry = Registry(self.root)
        try:
            reg = registry.register(
                reason=f"retrained on the '{self.scenario}' window (closed-loop simulation)"
            )
        except RegistryError as exc:
            raise SimulationError(str(exc)) from exc
        version = reg["version"]
        release_file = self.root / str(self.project.package.release_file)
        ref = model_ref(load_release(release_file).prod.tag)
        self.candidate_ref = ref.model_copy(update={"registry_version": version})
        report = reg["report"]
        return (
            f"registered {version} against prod {prod['version']}: {len(report.results)} gates "
            f"passed; tags {', '.join(reg['tags'])}; gate report {reg['report_paths'][1]}",
            {
                "version": version,
                "tags": reg["tags"],
                "gate_report": reg["report_paths"][0],
                "model": ref.tag,
            },
        )

    def _existing_candidate(self, prod: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from pipelines.registry.registry import Registry, RegistryError

        registry = Registry(self.root)
        try:
            version, commit = registry.resolve(str(self.candidate_version))
        except RegistryError as exc:
            raise SimulationError(str(exc)) from exc
        if version == prod["version"]:
            raise SimulationError(f"{version} is the prod version; name another one")
        self.candidate_ref = self._model_at(version, commit).model_copy(
            update={"registry_version": version}
        )
        return f"{version} (commit {commit[:12]}, model {self.candidate_ref.tag})", {
            "version": version,
            "model": self.candidate_ref.tag,
        }

    def _canary(
        self, prod: dict[str, Any], candidate: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        from pipelines.registry.registry import Registry, RegistryError

        assert self.service is not None
        version = candidate["version"]
        try:
            promoted = Registry(self.root).promote(
                version,
                "canary",
                reason=f"closed-loop simulation: {self.settings.canary_share:.0%} of users",
            )
        except RegistryError as exc:
            raise SimulationError(str(exc)) from exc
        self.candidate_ref = self.candidate_ref.model_copy(update={"stage": "canary"})
        release = self._release(self.prod_ref, self.candidate_ref)
        self._write_release(release, "2-canary")
        answer = self.service.reload()
        # The kill switch persists per release id, and a re-canaried version gets the same
        # id as the release that was switched off: set the share explicitly.
        self.service.post("/admin/canary", {"share": self.settings.canary_share}, admin=True)
        outputs: dict[str, Any] = {"tag": promoted["tag"], "release_id": answer["release_id"]}
        text = (
            f"{version} in canary (tag {promoted['tag']}); service reloaded with release "
            f"{answer['release_id']}: candidate {self.candidate_ref.tag} on "
            f"{self.settings.canary_share:.0%} of users"
        )
        if self.bad_canary:
            self.service.post("/admin/fault", {"target": "candidate", "kind": "error"}, admin=True)
            outputs["fault"] = "candidate: every call raises (/admin/fault)"
            text += "; --bad-canary: candidate calls now fail (/admin/fault)"
        return text, outputs

    def _canary_traffic(self) -> tuple[str, dict[str, Any]]:
        answers, clicks, log = self._send(self.canary_rows, "canary")
        self.canary_log, self.canary_clicks = log, clicks
        routes = answers["route"].value_counts().to_dict()
        share = float((answers["route"] == "canary").mean())
        degraded = int(answers["degraded"].sum())
        return (
            f"{len(answers):,} requests: routes {routes} (canary answered {share:.1%}), "
            f"{degraded} degraded, {len(clicks):,} delayed clicks",
            {
                "requests": len(answers),
                "routes": routes,
                "canary_share_served": share,
                "degraded": degraded,
            },
        )

    def _canary_check(
        self, candidate: dict[str, Any], traffic: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        from pipelines.monitoring.canary import guard

        assert self.service is not None
        outcome = guard(
            self.canary_log,
            self.cfg.canary,
            self.root,
            self.canary_clicks,
            version=candidate["version"],
            service_url=self.service.url,
            alerts=self.alerts,
            act=True,
        )
        report = outcome.report
        checks = {c.name: c.status for c in report.checks}
        outputs = {
            "decision": report.decision,
            "checks": [vars(c) for c in report.checks],
            "rows": report.rows,
            "actions": outcome.actions,
            "errors": outcome.errors,
        }
        self.guard_outputs = outputs
        if outcome.errors:
            raise SimulationError(
                f"canary guard decided {report.decision} but: " + "; ".join(outcome.errors)
            )
        if report.decision == "insufficient_data":
            raise SimulationStopped(
                f"the guard could not judge the canary ({checks}); send more canary traffic "
                "(--canary-requests) or raise --canary-share"
            )
        breached = [c.name for c in report.breaches]
        text = f"{report.decision} ({checks}); rows {report.rows}"
        if breached:
            text += f"; breached {breached}; actions " + ", ".join(
                f"{k}: {v if not isinstance(v, dict) else 'done'}"
                for k, v in outcome.actions.items()
            )
        else:
            text += f"; health report {outcome.actions.get('health_report')}"
        return text, outputs

    def _finish(
        self, prod: dict[str, Any], candidate: dict[str, Any], verdict: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        from pipelines.registry.registry import Registry, RegistryError

        assert self.service is not None
        version = candidate["version"]
        confirm = self.canary_rows.head(self.settings.confirm_requests)
        if verdict["decision"] == "healthy":
            try:
                promoted = Registry(self.root).promote(
                    version,
                    "prod",
                    approver=self.settings.approver,
                    reason=(
                        f"canary healthy in closed-loop simulation ({verdict['rows']['canary']} "
                        f"canary rows; health report {verdict['actions'].get('health_report')})"
                    ),
                )
            except RegistryError as exc:
                raise SimulationError(str(exc)) from exc
            new_prod = self.candidate_ref.model_copy(update={"stage": "prod"})
            previous = self.prod_ref.model_copy(update={"stage": "previous"})
            release = self._release(new_prod, previous=previous)
            self._write_release(release, "3-prod")
            self.service.reload()
            answers = send_traffic(self.service, confirm, self.settings.batch_size)
            served = answers["model_version"].value_counts().to_dict()
            if set(served) != {version}:
                raise SimulationError(
                    f"after promotion the service answered with {served}, expected only {version}"
                )
            self.result.outcome = "promoted"
            self.result.exit_code = EXIT_OK
            self.result.message = f"{version} promoted to prod; {prod['version']} is its fallback"
            return (
                f"{version} promoted to prod (tag {promoted['tag']}); service reloaded with "
                f"release {release.release_id}; {len(answers)} confirmation requests all answered "
                f"by {version}",
                {"tag": promoted["tag"], "release_id": release.release_id, "served": served},
            )
        # breach: the guard already switched the canary off and recorded it in the registry
        meta = self.service.post("/metadata", {}, admin=True)
        share = meta["routing"]["candidate_share"]
        answers = send_traffic(self.service, confirm, self.settings.batch_size)
        on_canary = int((answers["route"] == "canary").sum())
        if share != 0 or on_canary:
            raise SimulationError(
                f"after the kill switch the service still routes to the canary (share {share}, "
                f"{on_canary} of {len(answers)} requests)"
            )
        holders = Registry(self.root).holders()
        if holders.get("canary") == version:
            raise SimulationError(f"{version} is still in canary after the automatic rollback")
        self.result.outcome = "rolled_back"
        self.result.exit_code = EXIT_OK if self.bad_canary else EXIT_ROLLED_BACK
        self.result.message = (
            f"canary {version} rolled back automatically; prod stays {holders.get('prod')}"
        )
        actions = verdict["actions"]
        return (
            f"candidate share is 0 ({len(answers)} confirmation requests, none on the canary); "
            f"registry tag {actions.get('registry_tag')}, evidence {actions.get('evidence')}; "
            f"prod stays {holders.get('prod')}",
            {
                "registry_tag": actions.get("registry_tag"),
                "evidence": actions.get("evidence"),
                "candidate_share": share,
            },
        )


def render_summary(result: SimulationResult) -> list[str]:
    """The closing summary: one line per step, the outcome and where everything went."""
    lines = [f"== closed loop '{result.scenario}': {result.outcome}"]
    for s in result.steps:
        lines.append(f"  {s.status:7s} {s.name} ({s.seconds:.1f} s)")
    where: list[str] = [f"run folder {result.run_dir} (summary.json)"]
    for s in result.steps:
        out = s.outputs
        for key in ("result", "trigger", "gate_report", "evidence", "registry_tag", "tag"):
            if out.get(key):
                where.append(f"{s.name.split(':')[0]} {key}: {out[key]}")
        if out.get("state_db"):
            where.append(f"alerts: {out.get('webhook') or 'log only'}, state {out['state_db']}")
        if out.get("tags"):
            where.append(f"{s.name.split(':')[0]} tags: {', '.join(out['tags'])}")
        actions = out.get("actions") or {}
        if actions.get("health_report"):
            where.append(f"canary health report: {actions['health_report']}")
    lines.extend(f"  {w}" for w in where)
    stages = ", ".join(f"{k} {v}" for k, v in result.final_stages.items())
    lines.append(f"  registry now: {stages}")
    if result.message:
        lines.append(f"  {result.message}")
    return lines
