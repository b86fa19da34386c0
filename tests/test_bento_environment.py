"""The bento runs from its own declared environment, as its container would run it.

A fresh virtual environment gets only what the bento declares (its
``env/python/requirements.txt``, which the generated Dockerfile installs), a fresh
BentoML home imports the exported archive, and ``bentoml serve`` from that
environment answers valid and invalid requests, logs them and writes a live
whylogs profile. Nothing comes from the project's virtual environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from pipelines.core import profiles as wl
from pipelines.serving.request_log import read_shards, settle_profiles
from tests.support.loadtest import free_port
from tests.support.project import run
from tests.support.serving import last_event_time

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # may build small_project


def _bento_file(archive: Path, name: str) -> str:
    with tarfile.open(archive, "r:xz") as tar:
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == name)
        data = tar.extractfile(member)
        assert data is not None
        return data.read().decode()


def _pins(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line and not line.startswith("#"))


def test_dockerfile_installs_exactly_the_declared_requirements(small_project: Path) -> None:
    archive = small_project / "build/bento/ctr_service.bento"
    declared = (small_project / "bentos/requirements.txt").read_text()
    shipped = _bento_file(archive, "env/python/requirements.txt")
    # the same pins (BentoML appends its own pin, which bentos/requirements.txt already has)
    assert set(_pins(shipped)) == set(_pins(declared))
    dockerfile = _bento_file(archive, "env/docker/Dockerfile")
    assert dockerfile == (small_project / "build/bento/Dockerfile").read_text()
    commands = dockerfile.replace("\\\n", " ").splitlines()  # join continued lines
    installs = [c for c in commands if "pip install" in c]
    assert any("pip install -r $BENTO_PATH/env/python/requirements.txt" in c for c in installs)
    # the only other Python install is the installer itself (uv, hash-pinned by BentoML)
    others = [c for c in installs if "env/python/requirements.txt" not in c]
    assert others and all("--require-hashes -r /tmp/uv-requirements.txt" in c for c in others)


def test_bento_serves_from_an_environment_built_only_from_its_requirements(
    small_project: Path, tmp_path: Path
) -> None:
    archive = small_project / "build/bento/ctr_service.bento"
    bento_tag = json.loads((small_project / "build/bento/bento.json").read_text())["bento_tag"]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(_bento_file(archive, "env/python/requirements.txt"))

    venv = tmp_path / "bento-env"
    uv = str(Path(sys.executable).parent / "uv")
    run([uv, "venv", "-q", "--python", sys.executable, str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    run([uv, "pip", "install", "-q", "--python", python, "-r", str(requirements)], tmp_path)
    probe = run([python, "-c", "import pipelines"], tmp_path, check=False)
    assert probe.returncode != 0  # the project package comes only from the bento

    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "WHYLOGS_NO_ANALYTICS": "True",
        "OMP_NUM_THREADS": "1",
        "CTR_REQUEST_LOG_DIR": str(work / "requests"),
        "CTR_PROFILE_DIR": str(work / "live"),
        "CTR_STATE_DIR": str(work / "state"),
    }
    imported = run([python, "-m", "bentoml", "import", str(archive)], work, env=env)
    assert bento_tag in imported.stdout

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "bentoml", "serve", bento_tag, "--port", str(port)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    at = (last_event_time(small_project / "data") - pd.Timedelta(hours=1)).isoformat()
    valid = {"user": "u000042", "item": "i00007", "surface": "feed", "device": "mobile"}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (work / "server.log").read_text()[-4000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (work / "server.log").read_text()[-4000:]
            time.sleep(0.5)
        answers = [
            httpx.post(url + "/predict", json={**valid, "timestamp": at}, timeout=30)
            for _ in range(5)
        ]
        batch = httpx.post(
            url + "/predict_batch",
            json={"requests": [{**valid, "item": f"i{n:05d}", "timestamp": at} for n in range(20)]},
            timeout=30,
        )
        bad_surface = httpx.post(url + "/predict", json={**valid, "surface": "email"}, timeout=30)
        bad_json = httpx.post(
            url + "/predict",
            content=b"{not json",
            headers={"content-type": "application/json"},
            timeout=30,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
    server_log = (work / "server.log").read_text()
    assert proc.returncode == 0, server_log[-4000:]
    # (BentoML logs the 400s with their validation tracebacks: those are expected)
    assert "ModuleNotFoundError" not in server_log and "ImportError" not in server_log
    assert "profile_errors" not in server_log or '"profile_errors": 0' in server_log

    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # prod answers, or (a cold, loaded machine missing the latency budget) the baseline
        assert 0 < body["probability"] < 1 and body["route"] in ("prod", "baseline"), body
        # the compiled trees load from the declared requirements alone (tl2cgen's runtime)
        assert body["runtime"] == ("compiled" if body["route"] == "prod" else "rule"), body
    assert batch.status_code == 200 and len(batch.json()) == 20
    assert bad_surface.status_code == 400 and "surface" in bad_surface.text
    assert bad_json.status_code == 400

    rows = read_shards(work / "requests")
    assert len(rows) == 25  # every answered row, no invalid one
    assert set(rows["surface"]) == {"feed"}
    profiles = settle_profiles(work / "live", 120)  # helpers that outlive the server
    assert profiles, sorted(p.name for p in (work / "live").glob("*"))
    view = wl.merge_profiles([wl.read_profile(p) for p in profiles])
    columns = wl.column_sketches(view)
    assert "prediction" in columns and columns["prediction"].count == 25
