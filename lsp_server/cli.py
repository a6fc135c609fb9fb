"""`lsp_server --stdio | --tcp --host 127.0.0.1 --port N`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import BinaryIO

from . import __version__
from .app import create_server
from .server import TramontaneServer
from .settings import DTYPES, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lsp_server", description=__doc__)
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--stdio", action="store_true", help="speak LSP on stdin/stdout "
                           "(the default)")
    transport.add_argument("--tcp", action="store_true", help="listen on a TCP port")
    parser.add_argument("--host", default="127.0.0.1", help="TCP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2087, help="TCP port (default 2087)")
    parser.add_argument("--model", help="checkpoint folder (initializationOptions.model "
                        "overrides it)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    parser.add_argument("--log-level", default="WARNING", help="stderr log level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # stdout is the JSON-RPC stream: logs go to stderr only.
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pygls logs every message it sends at INFO: keep that for --log-level DEBUG only.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("pygls").setLevel(logging.WARNING)
    server = create_server(Settings(model=args.model, device=args.device, dtype=args.dtype))
    return serve(server, (args.host, args.port) if args.tcp else None)


def _protocol_stdout() -> BinaryIO:
    """A private handle on the real stdout for JSON-RPC; fd 1 and `sys.stdout` then point to
    stderr, so a stray print, from us or from a native library, cannot corrupt the stream."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "wb")


def serve(server: TramontaneServer, tcp: tuple[str, int] | None = None) -> int:
    """Run until `exit` or the end of the stream; the process exit code the LSP spec asks for:
    0 after a `shutdown` request, 1 otherwise (an `exit` alone, or the client vanishing)."""
    if tcp is not None:
        server.start_tcp(*tcp)
    else:
        server.start_io(sys.stdin.buffer, _protocol_stdout())
    return 0 if server.protocol.shutdown_requested else 1  # type: ignore[attr-defined]
