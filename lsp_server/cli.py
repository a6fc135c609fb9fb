"""`lsp_server --stdio | --tcp --host 127.0.0.1 --port N`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import BinaryIO, NoReturn

from . import __version__
from .app import create_server
from .server import TramontaneServer
from .settings import DTYPES, TOP_CHECKS, Settings
from .transport import DEFAULT_MAX_MESSAGE_MIB, MIB, serve_stdio, serve_tcp


def _mebibytes(value: str) -> int:
    try:
        mib = int(value)
    except ValueError:
        mib = 0
    if mib < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB >= 1, got {value!r}")
    return mib


def _setting(key: str) -> Callable[[str], str]:
    """An argparse type that checks a flag as the setting of the same name is checked, so the
    command line accepts exactly what `initializationOptions` does."""
    check = TOP_CHECKS[key]

    def parse(text: str) -> str:
        try:
            return str(check(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {e}") from None

    return parse


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
    parser.add_argument("--device", type=_setting("device"), default="cpu",
                        help="where the model runs: cpu, cuda, cuda:N or mps (default cpu; "
                        "initializationOptions.device overrides it)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    parser.add_argument("--log-level", default="WARNING", help="stderr log level")
    parser.add_argument("--max-message-mib", type=_mebibytes, default=DEFAULT_MAX_MESSAGE_MIB,
                        metavar="N", help="largest JSON-RPC message accepted, in MiB (default "
                        f"{DEFAULT_MAX_MESSAGE_MIB}); a larger one is answered with an error "
                        "and skipped")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    # stdout is the JSON-RPC stream: logs go to stderr only.
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pygls logs every message it sends at INFO: keep that for --log-level DEBUG only.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("pygls").setLevel(logging.WARNING)
    server = create_server(Settings(model=args.model, device=args.device, dtype=args.dtype))
    serve(server, (args.host, args.port) if args.tcp else None,
          max_message_bytes=args.max_message_mib * MIB)


def _protocol_stdout() -> BinaryIO:
    """A private handle on the real stdout for JSON-RPC; fd 1 and `sys.stdout` then point to
    stderr, so a stray print, from us or from a native library, cannot corrupt the stream."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "wb")


def serve(server: TramontaneServer, tcp: tuple[str, int] | None = None, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_MIB * MIB) -> NoReturn:
    """Serve until `exit`, the end of the stream or SIGTERM, then end the process at once (not
    waiting for the engine thread), with the exit code the LSP specification asks for: 0 after
    a `shutdown` request, 1 otherwise (an `exit` alone, or the client vanishing)."""
    if tcp is not None:
        serve_tcp(server, *tcp, max_message_bytes)
    serve_stdio(server, sys.stdin.buffer, _protocol_stdout(), max_message_bytes)
