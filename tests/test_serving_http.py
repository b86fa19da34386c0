"""A real `bentoml serve` of the built release bento, driven over HTTP on loopback.

The release is built the way an operator would build it: two more model versions
are stored in the project's BentoML store, params.yaml names them as candidate
(canary, 30% of users) and previous, and `dvc repro` reruns only `package`. The
exported archive is imported into an empty BentoML home and served from there.
One server runs for the whole module; the last test stops it cleanly and checks
the request log holds exactly the rows that were answered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from pipelines.modeling.release import reseal_release_dict
from pipelines.serving.request_log import read_shards, settle_profiles
from pipelines.stages.packaging import import_bento
from tests.support.loadtest import Served
from tests.support.project import project_env, run, set_param
from tests.support.serving import last_event_time

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token-1234"
SHARE = 0.3

STORE_VARIANTS = """
import json, sys
from pathlib import Path
from pipelines.stages.packaging import save_model_dir, use_bentoml_home
use_bentoml_home(Path(".bentoml"))
from tests.support.serving import train_variant
root = Path.cwd()
out = {}
for name, it, lr in (("candidate", 25, 0.2), ("previous", 15, 0.1)):
    folder = train_variant(root, Path(sys.argv[1]) / name, it, lr)
    out[name] = save_model_dir(folder, {"note": name}, {"trained_by": "test"}).tag
print(json.dumps(out))
"""


@dataclass
class Server:
    """The running service and what the tests asked of it."""

    served: Served
    home: Path
    release_file: Path
    log_dir: Path
    profile_dir: Path
    server_log: Path
    tags: dict[str, str]
    at: str
    answered_rows: int = 0
    statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.served.proc

    def post(
        self, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None
    ) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        content = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        response = httpx.post(self.url + path, content=content, headers=headers, timeout=60)
        self.statuses.append(response.status_code)
        if response.status_code == 200 and path in ("/predict", "/predict_batch"):
            data = response.json()
            self.answered_rows += len(data) if isinstance(data, list) else 1
        return response

    def predict(self, user: str, **extra: Any) -> dict[str, Any]:
        body = {
            "user": user,
            "item": "i00007",
            "surface": "feed",
            "device": "mobile",
            "timestamp": self.at,
            **extra,
        }
        response = self.post("/predict", body)
        assert response.status_code == 200, response.text
        return response.json()

    def batch(self, users: list[str], **extra: Any) -> list[dict[str, Any]]:
        rows = [
            {
                "user": u,
                "item": f"i{i % 400:05d}",
                "surface": ("feed", "search", "recs")[i % 3],
                "device": "mobile",
                "timestamp": self.at,
                **extra,
            }
            for i, u in enumerate(users)
        ]
        response = self.post("/predict_batch", {"requests": rows})
        assert response.status_code == 200, response.text
        return response.json()

    def metadata(self) -> dict[str, Any]:
        response = self.post("/metadata", token=TOKEN)
        assert response.status_code == 200, response.text
        return response.json()

    def admin(self, path: str, body: Any = None) -> dict[str, Any]:
        response = self.post(path, body, token=TOKEN)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> int | None:
        """SIGTERM (clean shutdown) and wait; returns the exit code."""
        return self.served.stop()


@pytest.fixture(scope="module")
def release_project(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the small project re-packaged with a canary candidate and a previous model."""
    root = tmp_path_factory.mktemp("release") / "project"
    shutil.copytree(small_project, root, symlinks=True)
    stored = run([sys.executable, "-c", STORE_VARIANTS, str(root.parent / "variants")], root)
    tags = json.loads(stored.stdout.strip().splitlines()[-1])
    for key, value in {
        "routing": "canary",
        "candidate_share": SHARE,
        "shadow_sample_rate": 0.5,
        "candidate_model": tags["candidate"],
        "previous_model": tags["previous"],
        "max_batch_size": 2000,
        "latency_budget_ms": 3000,
    }.items():
        set_param(root, f"serving.{key}", value)
    result = run([sys.executable, "-m", "dvc", "repro"], root)
    assert (
        "Running stage 'package'" in result.stdout and "Running stage 'train'" not in result.stdout
    )
    (root / "tags.json").write_text(json.dumps(tags))
    return root


@pytest.fixture(scope="module")
def server(release_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`bentoml serve` of the exported bento, imported into an empty BentoML home."""
    work = tmp_path_factory.mktemp("serve")
    home = work / "bentoml_home"
    archive = release_project / "build/bento/ctr_service.bento"
    import_bento(archive, home)
    bento_tag = json.loads((release_project / "build/bento/bento.json").read_text())["bento_tag"]
    release_file = work / "release.json"
    release = json.loads((release_project / "build/release/release.json").read_text())
    # one worker: fault injection and the kill switch act on the worker that takes the call
    release["policy"]["workers"] = 1
    release_file.write_text(json.dumps(reseal_release_dict(release)))
    env = project_env(work)
    env.update(
        BENTOML_HOME=str(home),
        CTR_ADMIN_TOKEN=TOKEN,
        CTR_ENABLE_FAULT_INJECTION="1",
        CTR_RELEASE_FILE=str(release_file),
        CTR_REQUEST_LOG_DIR=str(work / "requests"),
        CTR_PROFILE_DIR=str(work / "live"),
        CTR_STATE_DIR=str(work / "state"),
    )
    log_path = work / "server.log"
    served = Served(bento_tag, None, env, work, log_path, ready_timeout=120)
    at = (last_event_time(release_project / "data") - pd.Timedelta(hours=1)).isoformat()
    srv = Server(
        served,
        home,
        release_file,
        work / "requests",
        work / "live",
        log_path,
        json.loads((release_project / "tags.json").read_text()),
        at,
    )
    try:
        yield srv
    finally:
        srv.stop()


def users(n: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def test_bento_ships_every_tier_and_a_dockerfile(release_project: Path, server: Server) -> None:
    bento = json.loads((release_project / "build/bento/bento.json").read_text())
    assert set(bento["tiers"]) == {"prod", "candidate", "previous"}
    assert "FROM" in (release_project / "build/bento/Dockerfile").read_text()
    with tarfile.open(release_project / "build/bento/ctr_service.bento") as archive:
        names = archive.getnames()
    for tag in bento["tiers"].values():
        name, version = tag.split(":")
        assert any(f"models/{name}/{version}/model.joblib" in n for n in names), tag
    assert any(n.endswith("env/docker/Dockerfile") for n in names)
    assert any(n.endswith("src/build/release/release.json") for n in names)


def test_health_openapi_and_metadata(server: Server) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200, path
    spec = httpx.get(server.url + "/docs.json").json()
    assert {"/predict", "/predict_batch", "/metadata", "/admin/canary", "/admin/reload"} <= set(
        spec["paths"]
    )
    assert "PredictRequest" in json.dumps(spec["components"])
    meta = server.metadata()
    tiers = meta["tiers"]
    assert {r: t["loaded"] for r, t in tiers.items()} == {
        "prod": True,
        "candidate": True,
        "previous": True,
    }
    assert tiers["candidate"]["tag"] == server.tags["candidate"]
    assert tiers["previous"]["tag"] == server.tags["previous"]
    assert meta["routing"] == {
        "mode": "canary",
        "candidate_share": SHARE,
        "background_sample_rate": 0.5,
    }
    assert meta["release"]["lineage"]["raw_data_md5"].endswith(".dir")
    assert meta["release"]["candidate"]["lineage"] == {"trained_by": "test"}
    assert meta["problems"] == []


def test_canary_share_within_tolerance_and_sticky(server: Server) -> None:
    ids = users(1500)
    first = server.batch(ids)
    canary = [r["route"] == "canary" for r in first]
    assert abs(sum(canary) / len(ids) - SHARE) < 0.05
    assert {r["route"] for r in first} == {"prod", "canary"}
    assert not any(r["degraded"] for r in first)
    models = {r["route"]: r["model_version"] for r in first}
    assert models["canary"] != models["prod"]
    again = server.batch(ids)
    assert [r["route"] for r in again] == [r["route"] for r in first]
    for i in (0, 1, 2, 3, 4, 5, 6, 7):  # the single endpoint routes the same users the same way
        assert server.predict(ids[i])["route"] == first[i]["route"]


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("/predict", {"user": 5, "item": "i1", "surface": "feed", "device": "mobile"}, "user"),
    ("/predict", {"user": "u1", "surface": "feed", "device": "mobile"}, "item"),
    ("/predict", {"user": "u1", "item": "i1", "surface": "email", "device": "mobile"}, "surface"),
    ("/predict", {"user": "u1", "item": "i1", "surface": "feed", "device": "fridge"}, "device"),
    (
        "/predict",
        {
            "user": "u1",
            "item": "i1",
            "surface": "feed",
            "device": "mobile",
            "timestamp": "yesterday",
        },
        "timestamp",
    ),
    ("/predict", {"user": "u 1;drop", "item": "i1", "surface": "feed", "device": "mobile"}, "user"),
    ("/predict", {"user": "u1", "item": "i1", "surface": "feed", "device": "mobile", "x": 1}, "x"),
    ("/predict_batch", {"requests": []}, "requests"),
    (
        "/predict_batch",
        {"requests": [{"user": "u1", "item": "i1", "surface": "feed", "device": "mobile"}] * 2001},
        "requests",
    ),
    (
        "/predict_batch",
        {
            "requests": [
                {"user": "u1", "item": "i1", "surface": "feed", "device": "mobile"},
                {"user": "u2"},
            ]
        },
        "item",
    ),
    ("/predict_batch", {"rows": []}, "requests"),
    (
        "/predict_batch",
        {
            "requests": [
                {"user": "u1", "item": "i1", "surface": "feed", "device": "mobile"},
                {
                    "user": "u2",
                    "item": "i1",
                    "surface": "feed",
                    "device": "mobile",
                    "timestamp": "2026-02-30T00:00:00Z",
                },
            ]
        },
        "timestamp",
    ),
    (
        "/predict_batch",
        {"requests": [{"user": "u\n1", "item": "i1", "surface": "feed", "device": "mobile"}]},
        "user",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "field_name"),
    BAD_REQUESTS,
    ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD_REQUESTS)],
)
def test_malformed_requests_get_400_naming_the_field(
    server: Server, path: str, body: Any, field_name: str
) -> None:
    response = server.post(path, body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert any(field_name in [str(p) for p in d["loc"]] for d in detail), detail
    assert all(d["msg"] for d in detail)
    assert server.predict("u00001")["route"] in ("prod", "canary")  # still serving


def test_a_batch_answers_the_same_whatever_the_time_layout(server: Server) -> None:
    """The ISO layouts are read as columns, each row on its own, so one call may mix them;
    a call with epoch seconds among them is validated row by row: the same times, the same
    answers."""
    at = pd.Timestamp(server.at).tz_convert("UTC")
    layouts: list[Any] = [
        at.isoformat(),
        at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z",
        at.tz_convert("Asia/Kolkata").isoformat(),
        at.strftime("%Y-%m-%d %H:%M:%S.%f"),
        at.strftime("%Y-%m-%dt%H:%M:%S.%f")[:-3] + "z",
        at.timestamp(),
    ]
    answers = [server.batch(users(30), timestamp=layout) for layout in layouts]

    def rows(kinds: int) -> list[dict[str, Any]]:
        return [
            {
                "user": u,
                "item": f"i{i % 400:05d}",
                "surface": ("feed", "search", "recs")[i % 3],
                "device": "mobile",
                "timestamp": layouts[i % kinds],
            }
            for i, u in enumerate(users(30))
        ]

    for kinds in (5, 6):  # the ISO layouts mixed; then epoch seconds among them
        mixed = server.post("/predict_batch", {"requests": rows(kinds)})
        assert mixed.status_code == 200, mixed.text
        answers.append(mixed.json())
    probabilities = {tuple(a["probability"] for a in answer) for answer in answers}
    assert len(probabilities) == 1, layouts


def test_non_json_body_is_a_400_and_the_server_keeps_serving(server: Server) -> None:
    response = server.post("/predict", raw=b"{not json")
    assert response.status_code == 400 and "json" in response.text.lower()
    assert server.predict("u00002")["probability"] > 0


def test_admin_endpoints_refuse_without_the_token(server: Server) -> None:
    for path, body in (
        ("/admin/canary", {"share": 0}),
        ("/admin/reload", {}),
        ("/admin/fault", {"target": "prod", "kind": "error"}),
    ):
        missing = server.post(path, body)
        assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
        wrong = server.post(path, body, token="guess")
        assert wrong.status_code == 403 and "invalid" in wrong.json()["error"]
    assert server.metadata()["routing"]["candidate_share"] == SHARE  # nothing changed
    assert server.metadata()["tiers"]["prod"]["fault"] is None


def test_injected_model_faults_fall_back_without_5xx(server: Server) -> None:
    ids = users(300, "f")
    server.admin("/admin/fault", {"target": "prod", "kind": "error"})
    rows = server.batch(ids)
    prod_users = [r for r in rows if r["route"] != "canary"]
    assert {r["route"] for r in prod_users} == {"fallback"}
    assert all(
        "prod model error" in r["degraded_reason"] or "prod skipped" in r["degraded_reason"]
        for r in prod_users
    )
    assert prod_users[0]["model_version"] == server.metadata()["tiers"]["previous"]["version"]
    server.admin("/admin/fault", {"target": "previous", "kind": "error"})
    server.admin("/admin/fault", {"target": "candidate", "kind": "error"})
    rows = server.batch(ids)
    assert {r["route"] for r in rows} == {"baseline"} and all(r["degraded"] for r in rows)
    for target in ("prod", "previous", "candidate"):
        server.admin("/admin/fault", {"target": target, "kind": "none"})
    assert {r["route"] for r in server.batch(ids)} == {"prod", "canary"}
    counters = server.metadata()["counters"]["degraded_reasons"]
    assert counters.get("prod_error", 0) + counters.get("prod_breaker_open", 0) >= 1
    assert 500 not in server.statuses and 503 not in server.statuses


def test_latency_budget_breach_is_answered_by_the_previous_model(server: Server) -> None:
    ids = users(20)
    routes = [r["route"] for r in server.batch(ids)]
    user = ids[routes.index("prod")]
    server.admin("/admin/fault", {"target": "prod", "kind": "slow", "delay_ms": 6000})
    answer = server.predict(user)
    server.admin("/admin/fault", {"target": "prod", "kind": "none"})
    assert answer["route"] == "fallback"
    assert "exceeded the 3000 ms latency budget" in answer["degraded_reason"]


def test_feature_store_outage_and_stale_features_get_the_baseline(server: Server) -> None:
    server.admin("/admin/fault", {"target": "features", "kind": "error"})
    down = server.predict("u00004")
    server.admin("/admin/fault", {"target": "features", "kind": "none"})
    assert down["route"] == "baseline" and down["feature_age_seconds"] is None
    assert down["degraded_reason"].startswith("feature store unavailable")
    body = {"user": "u00004", "item": "i00007", "surface": "feed", "device": "mobile"}
    stale = server.post("/predict", body).json()  # no timestamp: now, long after the snapshot
    assert stale["route"] == "baseline" and not stale["features_fresh"]
    assert "freshness SLA" in stale["degraded_reason"]


def test_kill_switch_sends_everyone_to_prod(server: Server) -> None:
    state = server.admin("/admin/canary", {"share": 0.0})
    assert state["candidate_share"] == 0.0
    assert {r["route"] for r in server.batch(users(600))} == {"prod"}
    assert server.metadata()["routing"]["candidate_share"] == 0.0
    bad = server.post("/admin/canary", {"share": 1.5}, token=TOKEN)
    assert bad.status_code == 400 and "share" in bad.text
    server.admin("/admin/canary", {"share": SHARE})
    assert "canary" in {r["route"] for r in server.batch(users(600))}


def test_reload_switches_to_shadow_without_changing_answers(server: Server) -> None:
    ids = users(400, "s")
    original = server.release_file.read_text()
    release = json.loads(original)
    release["policy"].update(routing="none")
    server.release_file.write_text(json.dumps(reseal_release_dict(release)))
    assert server.admin("/admin/reload")["problems"] == []
    plain = server.batch(ids)
    assert {r["route"] for r in plain} == {"prod"}
    release["policy"].update(routing="shadow", shadow_sample_rate=1.0)
    server.release_file.write_text(json.dumps(reseal_release_dict(release)))
    server.admin("/admin/reload")
    assert server.metadata()["routing"]["mode"] == "shadow"
    shadow = server.batch(ids)
    assert [(r["route"], r["probability"]) for r in shadow] == [
        (r["route"], r["probability"]) for r in plain
    ]
    broken = server.release_file.read_text().replace('"shadow"', '"blue-green"')
    server.release_file.write_text(broken)
    refused = server.post("/admin/reload", token=TOKEN)
    assert refused.status_code == 422 and "still serving" in refused.json()["error"]
    assert server.metadata()["routing"]["mode"] == "shadow"
    server.release_file.write_text(original)
    server.admin("/admin/reload")
    assert server.metadata()["routing"]["mode"] == "canary"


def test_corrupt_model_file_is_refused_on_reload(server: Server) -> None:
    prod_tag = server.metadata()["tiers"]["prod"]["tag"]
    name, version = prod_tag.split(":")
    model_file = server.home / "models" / name / version / "model.joblib"
    original = model_file.read_bytes()
    try:
        model_file.write_bytes(original[:-64] + b"\0" * 64)
        reloaded = server.admin("/admin/reload")
        assert any(p.startswith("prod") and "md5" in p for p in reloaded["problems"])
        assert reloaded["tiers"]["prod"]["loaded"] is False
        answer = server.predict("u00005")
        assert answer["route"] == "fallback"
        assert "prod refused at load: ArtifactMismatch" in answer["degraded_reason"]
        assert server.metadata()["tiers"]["prod"]["refused"].startswith("ArtifactMismatch")
    finally:
        model_file.write_bytes(original)
    assert server.admin("/admin/reload")["problems"] == []
    assert server.predict("u00005")["route"] == "prod"


def test_clean_shutdown_keeps_every_answered_row(server: Server) -> None:
    server.batch(users(50, "z"))
    meta = server.metadata()
    assert meta["request_log"]["dropped_rows"] == 0
    assert server.stop() is not None
    log_text = server.server_log.read_text()
    assert "Completed cleanup hook: shutdown" in log_text
    # BentoML's access log is off unless CTR_ACCESS_LOG=1: the request log is the record
    assert "scheme=http,method=POST" not in log_text, log_text[-2000:]
    log = read_shards(server.log_dir)
    assert len(log) == server.answered_rows > 0
    assert meta["request_log"]["written_rows"] <= len(log)  # written before the last flush
    assert log["request_id"].is_unique
    assert {"prod", "canary", "fallback", "baseline"} <= set(log["route"])
    shadowed = log[log["scores"].map(lambda s: "candidate" in s) & (log["route"] == "prod")]
    assert len(shadowed) > 0  # shadow / counterfactual outputs were logged
    assert settle_profiles(server.profile_dir, 120)  # helpers that outlive the server
