-- :checkhealth tramontane — the server command, the model, the server's status, the chat.
local config = require("tramontane.config")
local status = require("tramontane.status")

local health = vim.health

local M = {}

local function report_command(cmd)
  local exe = cmd[1]
  local path = vim.fn.exepath(exe)
  local line = table.concat(cmd, " ")
  if path ~= "" then
    health.ok("server command: `" .. line .. "` (" .. path .. ")")
  else
    health.error("server command: `" .. line .. "`: `" .. exe .. "` is not executable", {
      "Install the server (`pip install tramontane` in a virtual environment) and put its "
        .. "`bin` folder on PATH, or set `cmd = { \"/path/to/venv/bin/lsp_server\", \"--stdio\" }`",
    })
  end
end

local function report_model(model)
  if not model or model == "" then
    health.warn("model: not set: the server gives no completions (status reason \"no model\")", {
      "Set `model = \"/path/to/checkpoint\"` in setup() (or init_options.model)",
    })
    return
  end
  model = vim.fn.expand(model)
  if vim.fn.isdirectory(model) == 0 then
    health.error("model: " .. model .. " is not a folder")
    return
  end
  local marker
  for _, name in ipairs({ "params.json", "config.json" }) do
    if vim.uv.fs_stat(model .. "/" .. name) then
      marker = name
      break
    end
  end
  if marker then
    health.ok("model: " .. model .. " (" .. marker .. ")")
  else
    health.error("model: " .. model .. " has neither params.json nor config.json")
  end
end

--- The configuration in use: setup()'s, or vim.lsp.config's on 0.11+ when only that is used.
local function configured()
  local opts = config.options
  local cmd, model = opts.cmd, opts.model
  local source = "setup()"
  local ok, lsp_config = pcall(function()
    return vim.lsp.config and vim.lsp.config.tramontane
  end)
  if ok and lsp_config and vim.lsp.is_enabled and vim.lsp.is_enabled("tramontane") then
    cmd = lsp_config.cmd or cmd
    model = vim.tbl_get(lsp_config, "init_options", "model") or model
    source = "vim.lsp.config"
  end
  return cmd, model, source
end

--- The chat: its tools, the clipboard tool for images, the edit confirmation on each server.
---@param clients vim.lsp.Client[]
function M.check_chat(clients)
  health.start("tramontane: chat")
  local chat = config.options.chat
  local tools = chat.tools == true and "all" or chat.tools == false and "none"
    or table.concat(chat.tools, ", ")
  health.info(string.format("server tools: %s; editor tools: %s", tools,
    #chat.client_tools > 0 and table.concat(chat.client_tools, ", ") or "none"))
  local clipboard = require("tramontane.chat.attach").clipboard_tool()
  if clipboard then
    health.ok("clipboard images: " .. clipboard.exe .. " (" .. vim.fn.exepath(clipboard.exe) .. ")")
  else
    health.warn("clipboard images: no wl-paste, xclip or pngpaste: :TramontaneChatImage needs "
      .. "a file path", { "Install wl-clipboard (Wayland), xclip (X11) or pngpaste (macOS)" })
  end
  for _, client in ipairs(clients) do
    local handler = client.handlers["workspace/applyEdit"]
    if handler == nil then
      health.info(string.format("client %d: edits proposed in the chat are confirmed (the "
        .. "handler is installed when the chat first uses the server)", client.id))
    elseif not debug.getinfo(handler, "S").source:find("/lua/tramontane/", 1, true) then
      health.warn(string.format("client %d: its workspace/applyEdit handler is not the plugin's: "
        .. "edits proposed in the chat may apply without asking", client.id))
    else
      health.ok(string.format("client %d: edits proposed in the chat are confirmed", client.id))
    end
  end
end

function M.check()
  health.start("tramontane: Neovim")
  local v = vim.version()
  local version = string.format("%d.%d.%d", v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok("Neovim " .. version)
  else
    health.error("Neovim " .. version .. ": Tramontane needs 0.10 or newer")
  end
  local provider = config.options.ghost_text.provider
  if provider == "builtin" and not vim.lsp.inline_completion then
    health.warn("ghost text: \"builtin\" asked, but vim.lsp.inline_completion needs Neovim "
      .. "0.12: the plugin's ghost text is used")
  else
    health.ok("ghost text: " .. provider)
  end

  health.start("tramontane: configuration")
  local cmd, model, source = configured()
  health.info("configured by " .. source)
  report_command(cmd)
  report_model(model)

  health.start("tramontane: server")
  local clients = vim.lsp.get_clients({ name = "tramontane" })
  if #clients == 0 then
    health.warn("no server running", {
      "Open a file of a configured filetype: " .. table.concat(config.options.filetypes, ", "),
    })
  end
  for _, client in ipairs(clients) do
    local client_model = vim.tbl_get(client.config, "init_options", "model") or "(none)"
    health.info(string.format("client %d: `%s`, model %s, position encoding %s", client.id,
      table.concat(client.config.cmd or {}, " "), client_model, client.offset_encoding))
    local current = status.latest[client.id]
    if not current then
      health.warn("client " .. client.id .. ": no status received yet")
    elseif current.state == "error" then
      health.error("client " .. client.id .. " status: " .. status.format(current))
    else
      health.ok("client " .. client.id .. " status: " .. status.format(current))
    end
  end
  if #status.history > 0 then
    local lines = {}
    for i = math.max(1, #status.history - 4), #status.history do
      local s = status.history[i]
      table.insert(lines, os.date("%H:%M:%S", s.time) .. " " .. status.format(s))
    end
    health.info("recent statuses:\n" .. table.concat(lines, "\n"))
  end
  M.check_chat(clients)
end

return M
