"""Start our servers (offline Hub, embedded backend, the Space) as child processes on loopback; wait for them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies (Linux), so no server outlives a killed
    demo or test run. Elsewhere the process group and stop() still clean up on a normal exit."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def spawn_group(cmd: list[str], **popen) -> subprocess.Popen:
    """A child in its own process group (so stop() reaches its own children too) that dies with its parent."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **popen)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Child:
    url: str
    proc: subprocess.Popen
    ready_url: str = ""

    def stop(self) -> None:
        stop_group(self.proc)

    def wait_ready(self, timeout: float = 180.0) -> Child:
        """Return once the child answers (stopping it if it never does)."""
        try:
            wait_http(self.ready_url, timeout=timeout, proc=self.proc)
        except BaseException:
            stop_group(self.proc, grace=2.0)
            raise
        return self


def _spawn(
    cmd: list[str],
    url: str,
    ready_path: str,
    *,
    env: dict | None = None,
    timeout: float = 180.0,
    log: Path | None = None,
    wait: bool = True,
) -> Child:
    """Start a child server and return once `url + ready_path` answers 200 (killing it if it never does); with
    wait=False at once (call wait_ready later). Spawn from the main thread: the child gets SIGTERM when the
    thread that started it ends (PR_SET_PDEATHSIG follows the thread, not the process).

    With `log`, its stdout and stderr go to that file; otherwise stdout is dropped and stderr is ours."""
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps the descriptor, we close our copy
    try:
        proc = spawn_group(cmd, stdout=out or subprocess.DEVNULL, stderr=out, env=env)
    finally:
        if out:
            out.close()
    child = Child(url, proc, f"{url}{ready_path}")
    return child.wait_ready(timeout) if wait else child


def start_hub(
    root: str | Path,
    users: dict[str, str],
    *,
    orgs: dict[str, list[str]] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    extra: list[str] | None = None,
    log: Path | None = None,
) -> Child:
    """The offline Hub; users: name -> token, handed over in the environment (not on disk, not in `ps`)."""
    from .hubserver import USERS_ENV

    port = port or free_port(host)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{USERS_ENV: json.dumps({"users": users, "orgs": orgs or {}})})
    cmd = [
        sys.executable,
        "-m",
        "soppu_hub",
        "hub",
        "--root",
        str(root),
        "--host",
        host,
        "--port",
        str(port),
        *(extra or []),
    ]
    return _spawn(cmd, f"http://{host}:{port}", "/health", env=env, timeout=60.0, log=log)


def start_backend(
    model: str,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: dict | None = None,
    extra: list[str] | None = None,
    timeout: float = 180.0,
    log: Path | None = None,
    wait: bool = True,
) -> Child:
    """`soppu-hub serve --model MODEL` as a child; returns once /health answers (wait=False: at once)."""
    port = port or free_port(host)
    cmd = [
        sys.executable,
        "-m",
        "soppu_hub",
        "serve",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        *(extra or []),
    ]
    return _spawn(cmd, f"http://{host}:{port}", "/health", env=env, timeout=timeout, log=log, wait=wait)


def start_space(env: dict, *, port: int | None = None, host: str = "127.0.0.1", timeout: float = 180.0) -> Child:
    """The Space (`python -m soppu_hub.space.app`, what space/app.py runs) as a child with GRADIO_SERVER_NAME /
    _PORT set; returns once the page answers."""
    port = port or free_port(host)
    env = dict(env, GRADIO_SERVER_NAME=host, GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    return _spawn([sys.executable, "-m", "soppu_hub.space.app"], f"http://{host}:{port}", "/", env=env, timeout=timeout)
