"""The main job opens the course in JupyterLab: start a headless server, ask its HTTP API for the lessons."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


@pytest.fixture
def lab_server(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={ROOT}", f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:  # CI machines run as root
        cmd.append("--allow-root")
    env_home = {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env_home},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _get(f"{base}/api/status?token={token}")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"JupyterLab did not start:\n{proc.stdout.read()}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_lab_lists_the_course_notebooks(lab_server):
    base, token = lab_server
    expected = sorted(p.name for p in (ROOT / "lessons").glob("*.ipynb"))
    assert expected, "the course has no notebooks in lessons/"
    status, body = _get(f"{base}/api/contents/lessons?token={token}")
    assert status == 200
    listed = sorted(item["name"] for item in json.loads(body)["content"] if item["type"] == "notebook")
    assert listed == expected
    status, page = _get(f"{base}/lab?token={token}")  # the JupyterLab front end itself is served
    assert status == 200 and b"JupyterLab" in page
