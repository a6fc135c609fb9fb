"""What both completion methods share: find the document and cursor, run, report status."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

import engine

from ..backends.base import BackendError
from ..completions import CANCELLED, ERROR, Outcome
from ..documents import DocumentError

if TYPE_CHECKING:
    from ..server import TramontaneServer

log = logging.getLogger(__name__)

# A budget's timer this late is worth a warning in the log: the answer came that much late.
LATE_WARNING_MS = 1000.0


async def complete_at(ls: TramontaneServer, uri: str, position: types.Position) -> Outcome:
    try:
        document = ls.documents.get(uri)
        cursor = document.offset_at(position, ls.position_encoding)
    except DocumentError as e:
        raise JsonRpcInvalidParams(str(e)) from None
    ready = ls.backend is not None and ls.backend.status.state == "ready"
    if ready:
        ls.status("busy", f"Completing in {uri.rsplit('/', 1)[-1]}")
    failure: str | None = None
    try:
        outcome = await ls.completions.complete(document, cursor, ls.settings.completion)
    except asyncio.CancelledError:
        ls.status("ready", "Completion cancelled", reason=CANCELLED)
        raise
    except (BackendError, engine.EngineError) as e:
        # e.g. a tokenizer without FIM, a remote server's HTTP error: say so once per request
        # in the client's log, and in the status
        log.error("completion failed: %s", e)
        ls.log_to_client(types.MessageType.Error, f"Tramontane: {e}")
        outcome = Outcome("", ERROR)
        failure = str(e)
    if failure is not None and ready:
        ls.status("error", failure, reason=ERROR)
    elif not ready:
        # Loading, or no model: the reply is empty, and the status says why.
        ls.backend_status(reason=outcome.reason)
    elif outcome.typed_through:
        ls.status("ready", "Typed through the completion shown", typedThrough=True)
    else:
        message = (f"{outcome.generated_tokens} tokens in {outcome.seconds * 1000:.0f} ms "
                   f"({outcome.prompt_tokens} prompt tokens, {outcome.reused_tokens} "
                   f"reused, {outcome.prefilled_tokens} prefilled)")
        log.info("completion: %s", message)
        details: dict[str, Any] = {}
        if outcome.budget_late_ms is not None:
            details["budgetLateMs"] = round(outcome.budget_late_ms, 1)
            if outcome.budget_late_ms >= LATE_WARNING_MS:
                log.warning("the time budget's timer ran %.0f ms late: the event loop was held "
                            "up (a starved machine?)", outcome.budget_late_ms)
        ls.status("ready", message, reason=outcome.reason,
                  promptTokens=outcome.prompt_tokens, reusedTokens=outcome.reused_tokens,
                  prefilledTokens=outcome.prefilled_tokens,
                  generatedTokens=outcome.generated_tokens,
                  draftedTokens=outcome.drafted_tokens, acceptedTokens=outcome.accepted_tokens,
                  **details)
    return outcome
