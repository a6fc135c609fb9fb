"""The real server over stdio under pytest-lsp (VS Code's and Neovim's capabilities), on a tiny
random checkpoint on disk: what it answers equals what the completion pipeline computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import LanguageClient

import engine
from lsp_server.documents import Document
from lsp_server.settings import CompletionSettings
from tests.e2e.conftest import start
from tests.pipeline import complete_in_process

URI = "file:///work/demo.py"
# A multi-line completion point (an empty line in a function body) after astral and CJK
# characters, so UTF-16 and UTF-8 positions differ from Python string offsets.
TEXT = 'NAME = "𝔘ŋ🎉 世界"\n\n\ndef greet(who):\n    \n\nprint(greet(NAME))\n'
LINE, CHAR = 4, 4
SETTINGS = {"maxTokens": 24, "timeBudgetMs": 60000}


def expected(model_dir: Path, text: str, cursor: int) -> str:
    """What the pipeline gives for this text and cursor, computed in this process."""
    model = engine.load(model_dir)
    doc = Document(URI, "python", 1, text)
    settings = CompletionSettings(max_tokens=24, time_budget_ms=60000)
    return complete_in_process(model, doc, cursor, settings).text


def open_doc(client: LanguageClient, text: str = TEXT, language: str = "python") -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=URI, language_id=language, version=1,
                                             text=text)))


async def inline(client: LanguageClient, line: int, character: int
                 ) -> types.InlineCompletionList | None:
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic)))


@pytest.mark.asyncio
async def test_capabilities_and_background_loading(client: LanguageClient,
                                                   tiny_model: Path) -> None:
    statuses = await start(client, {"model": str(tiny_model)})
    ready = await statuses.wait_for("ready")
    assert ready["message"].startswith(f"{tiny_model.name} ready")
    assert [s["state"] for s in statuses.seen[:2]] == ["loading", "ready"]
    (reports,) = client.progress_reports.values()
    assert [r.kind for r in reports] == ["begin", "end"]


@pytest.mark.asyncio
async def test_advertised_capabilities(client: LanguageClient, tiny_model: Path) -> None:
    result = await client.initialize_session(types.InitializeParams(
        capabilities=pytest_lsp.client_capabilities("visual-studio-code"),
        initialization_options={"model": str(tiny_model)}))
    caps = result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    sync = caps.text_document_sync
    assert isinstance(sync, types.TextDocumentSyncOptions)
    assert sync.change == types.TextDocumentSyncKind.Incremental


@pytest.mark.asyncio
async def test_inline_completion_is_the_pipeline_result(client: LanguageClient,
                                                        tiny_model: Path) -> None:
    statuses = await start(client, {"model": str(tiny_model), "completion": SETTINGS})
    await statuses.wait_for("ready")
    open_doc(client)
    result = await inline(client, LINE, CHAR)
    cursor = TEXT.index("\n    \n") + 5
    want = expected(tiny_model, TEXT, cursor)
    assert want  # this seed gives a non-empty completion here
    assert result is not None
    assert [(i.insert_text, i.range) for i in result.items] == [
        (want, types.Range(start=types.Position(line=LINE, character=CHAR),
                           end=types.Position(line=LINE, character=CHAR)))]
    done = statuses.seen[-1]
    assert done["state"] == "ready" and "reason" not in done


@pytest.mark.asyncio
async def test_completion_item_inserts_the_same_text(client: LanguageClient,
                                                     tiny_model: Path) -> None:
    statuses = await start(client, {"model": str(tiny_model), "completion": SETTINGS})
    await statuses.wait_for("ready")
    open_doc(client)
    result = await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI),
        position=types.Position(line=LINE, character=CHAR)))
    want = expected(tiny_model, TEXT, TEXT.index("\n    \n") + 5)
    assert isinstance(result, types.CompletionList) and result.is_incomplete
    (item,) = result.items
    assert item.text_edit == types.TextEdit(
        range=types.Range(start=types.Position(line=LINE, character=CHAR),
                          end=types.Position(line=LINE, character=CHAR)), new_text=want)


@pytest.mark.asyncio
async def test_incremental_edits_then_completion_under_utf8(client: LanguageClient,
                                                            tiny_model: Path) -> None:
    """Neovim negotiates UTF-8: edits after emoji land exactly; the completion is computed on
    the text the editor has."""
    statuses = await start(client, {"model": str(tiny_model), "completion": SETTINGS},
                           capabilities="neovim")
    await statuses.wait_for("ready")
    open_doc(client)
    # Type "x = " at the end of line 0, after the emoji and CJK (UTF-8 columns).
    end_of_line0 = len(TEXT.split("\n")[0].encode("utf-8"))
    for version, char in enumerate(["  # ", "🎉", "!"], start=2):
        pos = types.Position(line=0, character=end_of_line0)
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=pos, end=pos), text=char)]))
        end_of_line0 += len(char.encode("utf-8"))
    edited = TEXT.replace("世界\"\n", "世界\"  # 🎉!\n", 1)
    result = await inline(client, LINE, CHAR)
    want = expected(tiny_model, edited, edited.index("\n    \n") + 5)
    assert result is not None and [i.insert_text for i in result.items] == [want]


@pytest.mark.asyncio
async def test_without_a_model_completions_are_empty_and_say_why(client: LanguageClient) -> None:
    statuses = await start(client, None)
    error = await statuses.wait_for("error")
    assert error["reason"] == "no model"
    open_doc(client)
    result = await inline(client, LINE, CHAR)
    assert result is not None and list(result.items) == []


@pytest.mark.asyncio
async def test_a_broken_model_is_reported_and_a_new_setting_fixes_it(
        client: LanguageClient, tiny_model: Path, tmp_path: Path) -> None:
    statuses = await start(client, {"model": str(tmp_path / "missing")})
    await statuses.wait_for("error")
    (shown,) = client.messages
    assert shown.type == types.MessageType.Error
    assert str(tmp_path / "missing") in shown.message and "model folder not found" in shown.message
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"tramontane": {"model": str(tiny_model), "completion": SETTINGS}}))
    await statuses.wait_for("ready")
    open_doc(client)
    result = await inline(client, LINE, CHAR)
    assert result is not None
    assert [i.insert_text for i in result.items] == [
        expected(tiny_model, TEXT, TEXT.index("\n    \n") + 5)]


@pytest.mark.asyncio
async def test_invalid_settings_warn_and_fall_back(client: LanguageClient,
                                                   tiny_model: Path) -> None:
    statuses = await start(client, {"model": str(tiny_model), "someFutureKey": 1,
                                    "completion": {"maxTokens": -5, "temperature": "hot"}})
    await statuses.wait_for("ready")
    warnings = sorted(m.message for m in client.messages)
    assert warnings == [
        "Tramontane: setting completion.maxTokens = -5 is invalid (expected an integer from 1 "
        "to 4096); keeping 128",
        "Tramontane: setting completion.temperature = 'hot' is invalid (expected a number from "
        "0 to 5); keeping 0.0",
    ]


@pytest.mark.asyncio
async def test_disabled_languages_get_nothing(client: LanguageClient, tiny_model: Path) -> None:
    statuses = await start(client, {"model": str(tiny_model),
                                    "completion": {"enabledLanguages": ["rust"]}})
    await statuses.wait_for("ready")
    open_doc(client)
    result = await inline(client, LINE, CHAR)
    assert result is not None and list(result.items) == []
    assert statuses.seen[-1]["reason"] == "disabled for this language"
