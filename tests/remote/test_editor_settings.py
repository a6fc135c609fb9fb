"""The editors pass the `backend` settings to the server: the Neovim plugin sends its `settings`
table as it is (checked in headless Neovim 0.11.4), and the server reads it without a warning.
(The VS Code extension's declarations are checked against settings.py in
tests/editors/test_vscode_settings.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from lsp_server.settings import BackendSettings, Settings, merge_settings
from tests.editors.test_nvim import PLUGIN, nvim_binary

BACKEND = {"kind": "openai", "url": "https://codestral.internal.example/v1",
           "model": "codestral", "tokenizer": "/models/codestral/tokenizer.model.v3",
           "apiKeyEnv": "TRAMONTANE_API_KEY", "maxRequestsPerSecond": 4, "caBundle": None}


def test_the_neovim_plugin_sends_the_backend_settings(tmp_path: Path) -> None:
    lua = (f"vim.opt.rtp:prepend({json.dumps(str(PLUGIN))})\n"
           "local config = require('tramontane.config')\n"
           f"local opts = config.set({{ settings = {{ backend = vim.json.decode("
           f"{json.dumps(json.dumps(BACKEND))}) }} }})\n"
           "io.stdout:write(vim.json.encode(config.init_options(opts)))\n")
    script = tmp_path / "init.lua"
    script.write_text(lua)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
           "XDG_STATE_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([str(nvim_binary()), "--headless", "--clean", "-c",
                             f"luafile {script}", "-c", "qa!"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent == {"backend": BACKEND}  # JSON's null stays null (vim.NIL)
    settings, warnings = merge_settings(Settings(), sent)
    assert warnings == []
    assert settings.backend == BackendSettings(
        "openai", "https://codestral.internal.example/v1", "codestral",
        "/models/codestral/tokenizer.model.v3", "TRAMONTANE_API_KEY", 4.0, None)
