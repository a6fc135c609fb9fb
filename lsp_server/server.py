"""create_server(): the pygls server, its state (settings, documents, model), its features.

Model loading happens in the background: `initialize` is answered at once, the model loads on
a thread with `$/progress` (when the client supports it) and `tramontane/status` updates, and
until it is ready completions come back empty with the reason "no model". A model that cannot
be loaded is reported with window/showMessage; the server keeps running and a settings change
can fix it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from lsprotocol import types
from pygls.exceptions import FeatureRequestError, JsonRpcException
from pygls.lsp.server import LanguageServer

import engine

from . import __version__
from .backend import Backend, LocalBackend
from .completions import CompletionService
from .documents import DocumentStore
from .features import register_all
from .protocol import TramontaneProtocol, is_parse_error
from .settings import Settings

log = logging.getLogger(__name__)

STATUS = "tramontane/status"


class TramontaneServer(LanguageServer):
    """`backend`, when given, is fixed: the model settings are then ignored (tests use a
    scripted backend this way; an embedding application can pass its own)."""

    def __init__(self, defaults: Settings | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__("tramontane", __version__, protocol_cls=TramontaneProtocol)
        self.settings = defaults or Settings()
        self.documents = DocumentStore()
        # One engine thread: completions run one at a time, in arrival order; a superseded one
        # stops within a decode step, so the next starts promptly.
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="tramontane-engine")
        self.backend: Backend | None = backend
        self._fixed_backend = backend is not None
        self.completions = CompletionService(self.engine_thread, lambda: self.backend)
        self.pending_warnings: list[str] = []
        self._loaded: tuple[str | None, str, str | None] | None = None
        self._load_task: asyncio.Task[None] | None = None

    # --- talking to the client -------------------------------------------------------------

    @property
    def position_encoding(self) -> str:
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return encoding.value if isinstance(encoding, types.PositionEncodingKind) else encoding

    def status(self, state: str, message: str, reason: str | None = None) -> None:
        payload: dict[str, Any] = {"state": state, "message": message}
        if reason is not None:
            payload["reason"] = reason
        self.protocol.notify(STATUS, payload)

    def show(self, kind: types.MessageType, message: str) -> None:
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def log_to_client(self, kind: types.MessageType, message: str) -> None:
        self.window_log_message(types.LogMessageParams(type=kind, message=message))

    def report_server_error(self, error: Exception, source: Any) -> None:
        if source is FeatureRequestError:
            return  # the request's error response already tells the client
        if is_parse_error(error):
            log.warning("malformed message: %s", error)
            self.protocol.report_parse_error(error)  # type: ignore[attr-defined]
            return
        # Unexpected errors are logged with their traceback on stderr; the client gets a short
        # line in its log, not a popup per keystroke.
        log.error("internal error (%s): %s", getattr(source, "__name__", source), error)
        self.log_to_client(types.MessageType.Error, f"Tramontane internal error: {error}")

    # --- the model -------------------------------------------------------------------------

    def model_wanted(self) -> tuple[str | None, str, str | None]:
        s = self.settings
        return (s.model, s.device, s.dtype)

    def ensure_model(self) -> None:
        """Load (or unload) the model the settings name, if it is not the one loaded."""
        wanted = self.model_wanted()
        if self._fixed_backend:
            if self._loaded is None and self.backend is not None:
                self._loaded = wanted
                self.status("ready", f"{self.backend.name} ready")
            return
        if wanted == self._loaded:
            return
        self._loaded = wanted
        if self._load_task is not None:
            self._load_task.cancel()
        if wanted[0] is None:
            self.backend = None
            self.status("error", "No model configured: set `model` to a Mistral checkpoint "
                        "folder", reason="no model")
            return
        self._load_task = asyncio.ensure_future(self._load(*wanted))

    async def _load(self, path: str | None, device: str, dtype: str | None) -> None:
        assert path is not None
        self.completions.cancel_all()
        self.backend = None
        self.status("loading", f"Loading {path}")
        progress = await self._progress_begin(f"Loading {path}")
        try:
            model = await asyncio.to_thread(_load_model, path, device, dtype)
        except (engine.EngineError, ValueError, OSError, RuntimeError) as e:
            # RuntimeError: torch's own (out of memory, a device it cannot use).
            message = (f"Tramontane could not load the model: {e}. Set `model` to a Mistral "
                       "checkpoint folder (params.json or config.json, safetensors and the "
                       "tokenizer file); `tramontane download` fetches one.")
            log.error("%s", message)
            self.show(types.MessageType.Error, message)
            self.status("error", message, reason="no model")
            self._progress_end(progress, "failed")
            return
        self.backend = LocalBackend(model)
        log.info("model ready: %r", model)
        self.status("ready", f"{model.path.name} ready ({model.dtype}, {model.device})")
        self._progress_end(progress, "ready")

    async def _progress_begin(self, title: str) -> str | None:
        window = self.client_capabilities.window
        if not (window and window.work_done_progress):
            return None
        token = f"tramontane-load-{uuid.uuid4()}"
        try:
            await self.work_done_progress.create_async(token)
        except JsonRpcException as e:  # the client refused: no progress bar, nothing more
            log.info("client refused a progress token: %s", e)
            return None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title))
        return token

    def _progress_end(self, token: str | None, message: str) -> None:
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))


def _load_model(path: str, device: str, dtype: str | None) -> engine.Model:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available (no CUDA GPU or a CPU-only torch)")
    return engine.load(path, device=device, dtype=dtype)


def create_server(defaults: Settings | None = None,
                  backend: Backend | None = None) -> TramontaneServer:
    server = TramontaneServer(defaults, backend)
    register_all(server)
    return server
