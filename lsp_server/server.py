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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from lsprotocol import types
from pygls.exceptions import FeatureRequestError, JsonRpcException
from pygls.lsp.server import LanguageServer

import engine

from . import __version__
from .backend import Backend, LocalBackend, context_tokens
from .completions import CompletionService, Outcome
from .documents import DocumentStore
from .features import register_all
from .protocol import TramontaneProtocol, is_parse_error
from .settings import Settings

log = logging.getLogger(__name__)

STATUS = "tramontane/status"
METRICS = "tramontane/metrics"


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
        self.completions = CompletionService(self.engine_thread, lambda: self.backend,
                                             self.report_metrics)
        self.pending_warnings: list[str] = []
        self._loaded: tuple[str | None, str, str | None, bool] | None = None
        self._cache_shape: tuple[int, object] | None = None
        self._adapters: Mapping[str, str] = {}  # what the backend has loaded
        self._adapter_task: asyncio.Future[None] | None = None
        self._cache_task: asyncio.Future[None] | None = None
        self._load_task: asyncio.Task[None] | None = None

    # --- talking to the client -------------------------------------------------------------

    @property
    def position_encoding(self) -> str:
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return encoding.value if isinstance(encoding, types.PositionEncodingKind) else encoding

    def status(self, state: str, message: str, reason: str | None = None,
               **counters: int | bool) -> None:
        payload: dict[str, Any] = {"state": state, "message": message}
        if reason is not None:
            payload["reason"] = reason
        payload.update(counters)
        self.protocol.notify(STATUS, payload)

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

    # --- the model -------------------------------------------------------------------------

    def model_wanted(self) -> tuple[str | None, str, str | None, bool]:
        s = self.settings
        return (s.model, s.device, s.dtype, s.compile)

    def ensure_adapters(self) -> None:
        """Load or unload LoRA adapters to match the settings (on the engine thread, between
        completions: adapters change the model's layers)."""
        wanted = self.settings.adapters
        backend = self.backend
        if not isinstance(backend, LocalBackend) or wanted == self._adapters:
            return
        self._adapters = wanted
        self._adapter_task = asyncio.ensure_future(self._sync_adapters(backend, wanted))

    async def _sync_adapters(self, backend: LocalBackend, wanted: Mapping[str, str]) -> None:
        problems = await asyncio.get_running_loop().run_in_executor(
            self.engine_thread, backend.sync_adapters, dict(wanted))
        for problem in problems:
            log.error("%s", problem)
            self.show(types.MessageType.Error, f"Tramontane: {problem}")
        if wanted:
            log.info("LoRA adapters loaded: %s", ", ".join(backend.model.loras) or "none")

    def ensure_cache(self) -> None:
        """Resize the prefix cache if its settings or the prompt budgets changed."""
        shape = (context_tokens(self.settings.completion), self.settings.cache)
        if isinstance(self.backend, LocalBackend) and shape != self._cache_shape:
            self._cache_shape = shape
            # On the engine thread, after the completion running there (it may recompile).
            self._cache_task = asyncio.get_running_loop().run_in_executor(
                self.engine_thread, self.backend.configure_cache, self.settings.completion,
                self.settings.cache)

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

    async def _load(self, path: str | None, device: str, dtype: str | None,
                    compile: bool) -> None:
        assert path is not None
        self.completions.cancel_all()
        self.backend = None
        self.status("loading", f"Loading {path}")
        progress = await self._progress_begin(f"Loading {path}")
        try:
            # On the engine thread, where the model will run: torch's OpenMP thread team
            # belongs to the thread that starts it, and a model loaded and compiled on another
            # thread decoded 20-30% slower here.
            backend = await asyncio.get_running_loop().run_in_executor(
                self.engine_thread, _load_backend, path, device, dtype, compile, self.settings)
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
        self._adapters = dict(self.settings.adapters)
        await self._sync_adapters(backend, self._adapters)
        self.backend = backend
        self.ensure_adapters()  # in case the settings changed while this one loaded
        self._cache_shape = (context_tokens(self.settings.completion), self.settings.cache)
        model = backend.model
        log.info("model ready: %r%s", model,
                 ", decode step compiled" if model.decoder is not None else "")
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


def _load_backend(path: str, device: str, dtype: str | None, compile: bool,
                  settings: Settings) -> LocalBackend:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available (no CUDA GPU or a CPU-only torch)")
    model = engine.load(path, device=device, dtype=dtype)
    return LocalBackend.create(model, settings.completion, settings.cache, compile)


def create_server(defaults: Settings | None = None,
                  backend: Backend | None = None) -> TramontaneServer:
    server = TramontaneServer(defaults, backend)
    register_all(server)
    return server
