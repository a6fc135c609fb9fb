"""Servers for the remote-backend tests: the misbehaving one (faulty_server.py) and a real vLLM
(vllm.py). Both run as subprocesses on 127.0.0.1 with a bounded lifetime."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .vllm import VllmServer, ensure_installed, start

# ~18 M parameters: head_dim 64 (the CPU attention kernels' sizes), float32 weights.
VLLM_TINY_SHAPE: dict[str, Any] = {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 512}

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FaultyServer:
    process: subprocess.Popen[bytes]
    url: str  # scheme://127.0.0.1:port, no trailing slash
    cafile: Path | None = None

    def log(self) -> dict[str, Any]:
        """The server's record: `requests` and `disconnects` (see faulty_server.py)."""
        context = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
        with urllib.request.urlopen(self.url + "/_log", timeout=5, context=context) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    def requests_to(self, target: str) -> list[dict[str, Any]]:
        return [r for r in self.log()["requests"] if r["target"] == target]


def start_faulty(tls: tuple[Path, Path] | None = None) -> FaultyServer:
    command = [sys.executable, "-m", "tests.remote.faulty_server", "--lifetime", "900"]
    if tls is not None:
        command += ["--tls", str(tls[0]), str(tls[1])]
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"faulty server did not start: {line!r}")
    scheme = "https" if tls else "http"
    return FaultyServer(process, f"{scheme}://127.0.0.1:{int(line.split()[1])}",
                        tls[0] if tls else None)


def stop(server: FaultyServer) -> None:
    assert server.process.stdin is not None and server.process.stdout is not None
    server.process.stdin.close()  # its signal to exit
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)
    server.process.stdout.close()


@pytest.fixture(scope="session")
def faulty() -> Iterator[FaultyServer]:
    server = start_faulty()
    yield server
    stop(server)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl's CLI), and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def faulty_tls(certificate: tuple[Path, Path]) -> Iterator[FaultyServer]:
    server = start_faulty(certificate)
    yield server
    stop(server)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """vLLM serving a tiny random float32 checkpoint (native Mistral layout, v3 tokenizer) as
    "tiny". Structured outputs without free whitespace: a forced tool call on a random model is
    then fully determined by the schema (with free whitespace it loops on blanks). Requests are
logged, aborts included."""
    from engine.checkpoints.tiny import make_tiny

    python = ensure_installed()
    folder = tmp_path_factory.mktemp("vllm")
    model = make_tiny(folder / "tiny", **VLLM_TINY_SHAPE)
    server = start(python, model, folder / "vllm.log", extra=[
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--enable-log-requests"])  # each request and abort in the log, for failures
    yield server
    server.stop()
