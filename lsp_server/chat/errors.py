"""The chat package's errors. Their messages go back to the model (or the editor) as they are:
one line, naming what was given, never a traceback or anything outside the workspace."""

from __future__ import annotations


class ChatError(Exception):
    """Root of the chat package's errors."""


class ToolError(ChatError):
    """A tool call that cannot run as asked (a refused path, bad arguments, a file too large);
    the loop sends the message back to the model as the tool's result."""


class ToolCallError(ChatError):
    """The model's tool calls cannot be parsed (broken JSON, too long, a malformed name)."""


class DeadlineExceeded(ChatError):
    """A tool's own time budget ran out (walks and searches stop with partial results);
    `where` names the line a regular expression was stuck on, if that was it."""

    def __init__(self, where: str | None = None) -> None:
        super().__init__(f"ran out of time on {where}" if where else "ran out of time")
        self.where = where
