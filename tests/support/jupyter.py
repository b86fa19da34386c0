"""A JupyterLab server started as ``make lab`` starts it, and notebooks run through its
kernels over the Jupyter server REST and websocket API (as the JupyterLab UI does)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.project import project_env


@dataclass
class LabServer:
    root: Path
    port: int
    token: str
    proc: subprocess.Popen[bytes]
    log: Path
    runtime_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: Any = None, token: bool = True) -> Any:
        """A REST call; the decoded JSON (or text), or an HTTPError for a non-2xx status."""
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"token {self.token}"} if token else {}),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read().decode()
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_lab(root: Path, port: int, token: str, state: Path) -> LabServer:
    """``mlops notebooks lab`` (what ``make lab`` runs) in ``root``; Jupyter's config, runtime
    and workspace folders under ``state`` so the user's own are neither read nor written."""
    env = project_env(root)
    env["JUPYTER_TOKEN"] = token
    for name, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
    ):
        (state / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(state / sub)
    log = state / "lab.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "notebooks", "lab", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LabServer(root, port, token, proc, log, state / "runtime")
    deadline = time.monotonic() + 180
    while True:
        try:
            server.request("GET", "/api/status")
            return server
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(
                    f"JupyterLab did not start:\n{log.read_text()[-4000:]}"
                ) from None
            time.sleep(0.5)


def run_notebook(server: LabServer, path: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Execute every code cell of ``path`` (relative to the server root) in a kernel the
    server starts for it (a notebook session); per cell: its outputs as iopub sent them.

    Fails on the first cell that raises, with the error; the session (and its kernel)
    is deleted at the end either way.
    """
    import websocket

    content = server.request("GET", f"/api/contents/{path}?content=1")["content"]
    session = server.request(
        "POST",
        "/api/sessions",
        {
            "path": path,
            "type": "notebook",
            "name": Path(path).name,
            "kernel": {"name": content["metadata"]["kernelspec"]["name"]},  # as the UI does
        },
    )
    sid, kernel = session["id"], session["kernel"]
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/api/kernels/{kernel['id']}/channels?session_id={sid}",
        header=[f"Authorization: token {server.token}"],
        timeout=timeout,
        suppress_origin=True,
    )
    results = []
    try:
        for cell in content["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            results.append(_execute(ws, sid, source, timeout))
    finally:
        ws.close()
        server.request("DELETE", f"/api/sessions/{sid}")
    return results


def _execute(ws: Any, session: str, code: str, timeout: float) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "test",
                    "session": session,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    outputs: list[dict[str, Any]] = []
    reply: dict[str, Any] | None = None
    idle = False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        if time.monotonic() > deadline:
            raise AssertionError(f"cell did not finish in {timeout:.0f} s:\n{code[:500]}")
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, body = msg["msg_type"], msg["content"]
        if kind == "execute_reply":
            reply = body
        elif kind == "status" and body.get("execution_state") == "idle":
            idle = True
        elif kind in ("stream", "execute_result", "display_data", "error"):
            outputs.append({"type": kind, **body})
    if reply["status"] != "ok":
        raise AssertionError(
            f"cell failed: {reply.get('ename')}: {reply.get('evalue')}\n{code[:800]}"
        )
    return {"code": code, "outputs": outputs, "execution_count": reply.get("execution_count")}


def text_of(result: dict[str, Any]) -> str:
    """The plain text a cell showed: streams and text/plain of results and displays."""
    parts = []
    for out in result["outputs"]:
        if out["type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")))
    return "".join(parts)
