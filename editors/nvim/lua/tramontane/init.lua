-- Tramontane for Neovim: starts the `lsp_server` language server, shows its inline completions
-- as ghost text, and holds a chat with it (lua/tramontane/chat/). All the intelligence is in the
-- server; this side speaks LSP plus the `tramontane/*` methods (status, chat).
local config = require("tramontane.config")
local status = require("tramontane.status")

local api = vim.api

local M = {}

M.NAME = "tramontane"

-- require("tramontane").chat: the chat's functions (lua/tramontane/chat/init.lua), loaded on use.
setmetatable(M, { __index = function(_, key)
  if key == "chat" then
    return require("tramontane.chat")
  end
end })

local function builtin_available()
  return vim.lsp.inline_completion ~= nil
end

--- True when ghost text comes from Neovim's own vim.lsp.inline_completion (0.12+).
function M.uses_builtin()
  return config.options.ghost_text.provider == "builtin" and builtin_available()
end

local function define_highlight()
  api.nvim_set_hl(0, "TramontaneGhostText", { link = "Comment", default = true })
end

-- The key's own meaning, before any key typed after it ("i": at the start of the typeahead).
local function feed(lhs)
  api.nvim_feedkeys(vim.keycode(lhs), "in", false)
end

local ACTIONS = {
  accept = function() return M.accept() end,
  accept_word = function() return M.accept_word() end,
  accept_line = function() return M.accept_line() end,
  dismiss = function() return M.dismiss() end,
}

--- Buffer-local insert-mode keys; each falls back to the key's own meaning when no ghost
--- text is shown (so <Tab> still indents).
local function map_keys(buf)
  local keymaps = config.options.keymaps
  if not keymaps then
    return
  end
  for name, lhs in pairs(keymaps) do
    if lhs then
      vim.keymap.set("i", lhs, function()
        if not ACTIONS[name]() then
          feed(lhs)
        end
      end, { buffer = buf, desc = "Tramontane: " .. name:gsub("_", " ") })
    end
  end
end

local warned_builtin = false

--- Turn on ghost text for `client` in `buf`. Used as on_attach by setup() and by
--- lsp/tramontane.lua; call it from your own on_attach if you replace theirs.
---@param client vim.lsp.Client
---@param buf integer
function M.attach(client, buf)
  define_highlight()
  if config.options.ghost_text.provider == "builtin" then
    if builtin_available() then
      vim.lsp.inline_completion.enable(true, { bufnr = buf, client_id = client.id })
      map_keys(buf)
      return
    end
    if not warned_builtin then
      warned_builtin = true
      vim.notify("Tramontane: ghost_text.provider = \"builtin\" needs Neovim 0.12 "
        .. "(vim.lsp.inline_completion); using the plugin's ghost text", vim.log.levels.WARN)
    end
  end
  require("tramontane.completion").attach(client, buf)
  map_keys(buf)
end

--- The handlers of the server's messages: `tramontane/status`; the chat's deltas, its tools
--- (`tramontane/runTool`) and `workspace/applyEdit`, which asks before applying (for this server
--- only: Neovim's own handler applies at once). Each loads its module on first use.
---@return table<string, function>
function M.handlers()
  local function lazy(module, field)
    return function(...)
      return require(module)[field](...)
    end
  end
  return {
    ["tramontane/status"] = lazy("tramontane.status", "handler"),
    ["tramontane/chatDelta"] = lazy("tramontane.chat", "on_delta"),
    ["tramontane/runTool"] = lazy("tramontane.chat.tools", "handler"),
    ["workspace/applyEdit"] = lazy("tramontane.chat.edits", "handler"),
  }
end

--- Neovim's client capabilities, plus what the chat's edit handler does: it takes
--- `documentChanges` and honours change annotations (every edit is confirmed).
---@return lsp.ClientCapabilities
function M.capabilities()
  return vim.tbl_deep_extend("force", vim.lsp.protocol.make_client_capabilities(), {
    workspace = {
      workspaceEdit = {
        documentChanges = true,
        changeAnnotationSupport = { groupsOnLabel = false },
      },
    },
  })
end

--- The client configuration setup() starts (also what :checkhealth reports).
---@param buf? integer
---@return vim.lsp.ClientConfig
function M.client_config(buf)
  local opts = config.options
  local root = buf and vim.fs.root(buf, opts.root_markers) or nil
  return {
    name = M.NAME,
    cmd = opts.cmd,
    root_dir = root or vim.fn.getcwd(),
    init_options = config.init_options(opts),
    capabilities = M.capabilities(),
    handlers = M.handlers(),
    on_attach = M.attach,
  }
end

--- Start (or reuse) the server for `buf`.
---@param buf? integer
---@return integer|nil client_id
function M.start(buf)
  buf = buf or api.nvim_get_current_buf()
  if vim.bo[buf].buftype ~= "" then
    return nil
  end
  return vim.lsp.start(M.client_config(buf), { bufnr = buf })
end

---@param opts? tramontane.Config
function M.setup(opts)
  local options = config.set(opts)
  define_highlight()
  local group = api.nvim_create_augroup("tramontane", { clear = true })
  api.nvim_create_autocmd("ColorScheme", { group = group, callback = define_highlight })
  if #options.filetypes == 0 then
    return
  end
  api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = options.filetypes,
    callback = function(ev)
      M.start(ev.buf)
    end,
  })
  -- Buffers opened before setup() (lazy loading) get the server too.
  for _, buf in ipairs(api.nvim_list_bufs()) do
    local filetype = api.nvim_buf_is_loaded(buf) and vim.bo[buf].filetype
    if filetype and vim.tbl_contains(options.filetypes, filetype) then
      M.start(buf)
    end
  end
end

--- Insert the whole ghost text. Returns false when none is shown.
---@return boolean
function M.accept()
  if M.uses_builtin() then
    return vim.lsp.inline_completion.get() == true
  end
  return require("tramontane.completion").accept("all")
end

--- Insert the ghost text's next word.
---@return boolean
function M.accept_word()
  if M.uses_builtin() then
    return false -- not offered by vim.lsp.inline_completion
  end
  return require("tramontane.completion").accept("word")
end

--- Insert the ghost text up to the end of its current line.
---@return boolean
function M.accept_line()
  if M.uses_builtin() then
    return false
  end
  return require("tramontane.completion").accept("line")
end

--- Hide the ghost text. Returns false when none was shown.
---@return boolean
function M.dismiss()
  if M.uses_builtin() then
    return false
  end
  return require("tramontane.completion").dismiss()
end

--- The ghost text shown in the current buffer, or nil.
---@return string|nil
function M.suggestion()
  return require("tramontane.completion").visible_text()
end

--- A short status for statuslines ("Tramontane ✓", "Tramontane ✗ no model", ...), "" when no
--- server is attached to the buffer. `User TramontaneStatus` fires on every change.
---@param buf? integer
---@return string
function M.status(buf)
  return status.line(buf)
end

--- The latest `tramontane/status` of the buffer's server: { state, message, reason? } or nil.
---@param buf? integer
---@return tramontane.Status|nil
function M.server_status(buf)
  return status.get(buf)
end

return M
