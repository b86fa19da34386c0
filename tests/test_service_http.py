"""The built bento served by `bentoml serve` on loopback, exercised over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, project_env, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Import the exported archive into a fresh BentoML store and serve it."""
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**project_env(small_project), "BENTOML_HOME": str(home)}
    bento = json.loads((small_project / "build/bento/bento.json").read_text())
    run(
        [sys.executable, "-m", "bentoml", "import", str(small_project / bento["archive"])],
        small_project,
        env=env,
    )
    port = free_port()
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            bento["bento_tag"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail(f"bentoml serve exited: {(home / 'serve.log').read_text()[-3000:]}")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def _predict(url: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, timeout=10)


def test_real_prediction(server: str, small_project: Path) -> None:
    release = json.loads((small_project / "build/release/release.json").read_text())
    response = _predict(
        server,
        {
            "user": "u000001",
            "item": "i00002",
            "surface": "feed",
            "device": "mobile",
            "timestamp": "2026-10-07T12:00:00Z",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0 < body["probability"] < 1
    assert body["model_version"] == release["model_version"] and body["route"] == "prod"
    assert body["degraded"] is False and body["features_fresh"] is True


def test_batch_and_metadata(server: str) -> None:
    requests = [
        {
            "user": f"u{i:06d}",
            "item": "i00003",
            "surface": s,
            "device": "desktop",
            "timestamp": "2026-10-08T09:00:00Z",
        }
        for i, s in enumerate(["feed", "search", "recs"])
    ]
    response = httpx.post(f"{server}/predict_batch", json={"requests": requests}, timeout=10)
    assert response.status_code == 200 and len(response.json()) == 3
    meta = httpx.post(f"{server}/metadata", timeout=10).json()
    assert meta["lineage"]["git"]["commit"] and meta["model_loaded"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user": "u1", "item": "i1", "surface": "email", "device": "mobile"}, "surface"),
        ({"user": 5, "item": "i1", "surface": "feed", "device": "mobile"}, "user"),
        ({"user": "u1", "surface": "feed", "device": "mobile"}, "item"),
        (
            {
                "user": "u1",
                "item": "i1",
                "surface": "feed",
                "device": "mobile",
                "timestamp": "soon",
            },
            "timestamp",
        ),
        ({"user": "", "item": "i1", "surface": "feed", "device": "mobile"}, "user"),
    ],
)
def test_malformed_requests_get_4xx_naming_the_field(
    server: str, body: dict[str, object], field: str
) -> None:
    response = _predict(server, body)
    assert 400 <= response.status_code < 500, response.text
    detail = response.json()
    assert any(field in err["loc"] for err in detail["detail"]), detail


def test_broken_json_is_4xx_and_server_keeps_serving(server: str) -> None:
    response = httpx.post(
        f"{server}/predict",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert 400 <= response.status_code < 500
    ok = _predict(server, {"user": "u1", "item": "i1", "surface": "recs", "device": "tablet"})
    assert ok.status_code == 200 and ok.json()["route"] == "prod"
