"""TramontaneServer: the pygls server's state (settings, documents, the backend) and what it
tells the client about them (`tramontane/status`, `$/progress`, messages).

The server does not look inside its backend: it configures it with the settings, reports the
status the backend gives, tells it when a document is closed, and closes it. `initialize` is
answered at once; the local backend loads its model on the engine thread meanwhile, and
completions come back empty, with the reason in the status, until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from lsprotocol import types
from pygls.exceptions import FeatureRequestError, JsonRpcException
from pygls.lsp.server import LanguageServer

from . import __version__
from .backends.base import Backend, BackendError, BackendStatus
from .backends.local import LocalBackend
from .backends.mistral import MistralBackend
from .backends.openai import OpenAIBackend
from .chat.service import ChatService
from .completions import NO_MODEL, CompletionService, Outcome
from .documents import DocumentStore
from .protocol import TramontaneProtocol, is_parse_error
from .scheduler import Scheduler
from .settings import BackendKind, Settings

log = logging.getLogger(__name__)

STATUS = "tramontane/status"
METRICS = "tramontane/metrics"

LOAD_HELP = ("Set `model` to a Mistral checkpoint folder (params.json or config.json, "
             "safetensors and the tokenizer file); `tramontane download` fetches one.")
REMOTE_HELP = "Check the `backend` settings (kind, url, model, tokenizer, apiKeyEnv, caBundle)."


class TramontaneServer(LanguageServer):
    """`backend`, when given, is fixed: the model settings are then ignored (tests use a
    scripted backend this way; an embedding application can pass its own)."""

    def __init__(self, defaults: Settings | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__("tramontane", __version__, protocol_cls=TramontaneProtocol)
        self.settings = defaults or Settings()
        self.documents = DocumentStore()
        self.backend: Backend | None = backend
        self._fixed_backend = backend is not None
        self._scheduler: Scheduler | None = None
        self.completions = CompletionService(lambda: self.backend, self.report_metrics)
        self.chats = ChatService(lambda: self.backend)
        self.pending_warnings: list[str] = []
        self._configuring: asyncio.Task[None] | None = None
        self._configure_again = False
        self._progress: str | None = None
        self._progress_task: asyncio.Future[None] | None = None
        self._last_status: BackendStatus | None = None
        self._backend_kind: BackendKind = "local"

    # --- talking to the client -------------------------------------------------------------

    @property
    def position_encoding(self) -> str:
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return encoding.value if isinstance(encoding, types.PositionEncodingKind) else encoding

    def status(self, state: str, message: str, reason: str | None = None,
               **counters: float | bool) -> None:
        payload: dict[str, Any] = {"state": state, "message": message}
        if reason is not None:
            payload["reason"] = reason
        payload.update(counters)
        self.protocol.notify(STATUS, payload)

    def backend_status(self, reason: str | None = None) -> None:
        """The backend's state again (after an empty completion: with why it was empty)."""
        backend = self.backend
        status = backend.status if backend is not None else BackendStatus(
            "idle", "No model configured: set `model` to a Mistral checkpoint folder")
        state = "error" if status.state == "idle" else status.state
        self.status(state, status.message, reason=reason, **status.details)

    def report_metrics(self, uri: str, outcome: Outcome) -> None:
        """`tramontane/metrics`: what one request cost, sent when the engine is done with it
        (for a cancelled request, after its reply). Diagnostics for benchmarks and tools."""
        payload: dict[str, Any] = {
            "uri": uri, "promptTokens": outcome.prompt_tokens,
            "reusedTokens": outcome.reused_tokens, "computedTokens": outcome.computed_tokens,
            "generatedTokens": outcome.generated_tokens,
            "seconds": round(outcome.seconds, 4), "cancelled": outcome.stopped_ms is not None}
        if outcome.stopped_ms is not None:
            payload["stoppedMs"] = round(outcome.stopped_ms, 1)
            log.info("cancelled completion for %s stopped %.0f ms after the cancel, %d tokens "
                     "computed", uri.rsplit("/", 1)[-1], outcome.stopped_ms,
                     outcome.computed_tokens)
        self.protocol.notify(METRICS, payload)

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

    # --- the backend -----------------------------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        """The engine thread (started on first use: a remote or scripted backend needs none)."""
        if self._scheduler is None:
            self._scheduler = Scheduler()
        return self._scheduler

    def configure_backend(self) -> None:
        """Bring the backend in line with the settings, in the background (one configuration
        at a time; a change that arrives meanwhile is applied right after). `backend.kind`
        picks the implementation; a new kind closes the old backend first."""
        if self._fixed_backend:
            if self._last_status is None and self.backend is not None:
                self._on_backend_status(self.backend.status)
            return
        if self.backend is None:
            self.backend = self._new_backend(self.settings.backend.kind)
        if self._configuring is not None and not self._configuring.done():
            self._configure_again = True
            return
        self._configuring = asyncio.ensure_future(self._configure())

    def _new_backend(self, kind: BackendKind) -> Backend:
        """Remote backends stream on the event loop: only the local one starts the engine
        thread."""
        self._backend_kind = kind
        if kind == "openai":
            return OpenAIBackend(self._on_backend_status)
        if kind == "mistral":
            return MistralBackend(self._on_backend_status)
        return LocalBackend(self.scheduler, self._on_backend_status)

    async def _configure(self) -> None:
        while True:
            self._configure_again = False
            kind = self.settings.backend.kind
            if self.backend is None or kind != self._backend_kind:
                old, self.backend = self.backend, self._new_backend(kind)
                if old is not None:
                    self.completions.cancel_all()
                    log.info("backend: %s -> %s", old.name, kind)
                    await old.close()
            backend = self.backend
            assert backend is not None
            try:
                await backend.configure(self.settings)
            except BackendError as e:
                log.error("%s", e)
                self.show(types.MessageType.Error, f"Tramontane: {e}")
            if not self._configure_again:
                return

    def _on_backend_status(self, status: BackendStatus) -> None:
        previous, self._last_status = self._last_status, status
        if status.state == "loading":
            self.completions.cancel_all()
            self._progress_task = asyncio.ensure_future(self._progress_begin(status.message))
        elif previous is not None and previous.state == "loading":
            self._progress_end("ready" if status.state == "ready" else "failed")
        if status.state == "error":
            help_text = LOAD_HELP if self._backend_kind == "local" else REMOTE_HELP
            message = f"Tramontane {status.message}. {help_text}"
            log.error("%s", message)
            self.show(types.MessageType.Error, message)
            self.status("error", message, reason=NO_MODEL)
        elif status.state == "idle":
            self.status("error", status.message, reason=NO_MODEL)
        else:
            log.info("backend %s: %s", status.state, status.message)
            self.status(status.state, status.message, **status.details)

    async def _progress_begin(self, title: str) -> None:
        window = self.client_capabilities.window
        if not (window and window.work_done_progress):
            return
        token = f"tramontane-load-{uuid.uuid4()}"
        try:
            await self.work_done_progress.create_async(token)
        except JsonRpcException as e:  # the client refused: no progress bar, nothing more
            log.info("client refused a progress token: %s", e)
            return
        self._progress = token
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title))
        if self._last_status is not None and self._last_status.state != "loading":
            self._progress_end("ready")  # it finished while the client answered

    def _progress_end(self, message: str) -> None:
        token, self._progress = self._progress, None
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
