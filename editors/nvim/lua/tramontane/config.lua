-- Options: defaults, validation, and what the server receives as initializationOptions.
local M = {}

---@type tramontane.Config
M.defaults = {
  cmd = { "lsp_server", "--stdio" },
  model = nil,
  device = nil,
  dtype = nil,
  filetypes = {
    "c", "cpp", "cs", "css", "go", "html", "java", "javascript", "javascriptreact", "json",
    "kotlin", "lua", "markdown", "php", "python", "ruby", "rust", "scala", "sh", "sql",
    "swift", "toml", "typescript", "typescriptreact", "yaml", "zig",
  },
  root_markers = { ".git" },
  completion = {},
  settings = {},
  ghost_text = {
    provider = "plugin",
    debounce_ms = 75,
    hl_group = "TramontaneGhostText",
  },
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    dismiss = "<C-]>",
  },
  chat = {
    window = "vsplit",
    tools = true,
    client_tools = { "diagnostics" },
    keymaps = {
      send = "<CR>",
      cancel = "<C-c>",
    },
  },
}

---@type tramontane.Config
M.options = vim.deepcopy(M.defaults)

local PROVIDERS = { plugin = true, builtin = true }
local WINDOWS = { vsplit = true, split = true, tab = true }
-- The tools the plugin runs itself when the model asks (lua/tramontane/chat/tools.lua).
M.CLIENT_TOOLS = { "diagnostics" }

local function is_string_list(value)
  if type(value) ~= "table" then
    return false
  end
  for _, item in ipairs(value) do
    if type(item) ~= "string" then
      return false
    end
  end
  return #value == vim.tbl_count(value)
end

--- Check the user's options; raise an error that names the bad key, the value and what is
--- expected (setup() is called from the user's config: a clear error beats a silent default).
---@param opts table
local function validate(opts)
  local function fail(key, expected)
    error(string.format("tramontane: option %s = %s is invalid (expected %s)", key,
      vim.inspect(vim.tbl_get(opts, unpack(vim.split(key, ".", { plain = true })))), expected), 0)
  end
  if not is_string_list(opts.cmd) or #opts.cmd == 0 then
    fail("cmd", "a non-empty list of strings, e.g. { \"lsp_server\", \"--stdio\" }")
  end
  if opts.model ~= nil and type(opts.model) ~= "string" then
    fail("model", "a checkpoint folder path (string) or nil")
  end
  for _, key in ipairs({ "device", "dtype" }) do
    if opts[key] ~= nil and type(opts[key]) ~= "string" then
      fail(key, "a string or nil")
    end
  end
  if not is_string_list(opts.filetypes) then
    fail("filetypes", "a list of filetype names")
  end
  if not is_string_list(opts.root_markers) then
    fail("root_markers", "a list of file names")
  end
  if type(opts.completion) ~= "table" then
    fail("completion", "a table of server settings such as { maxTokens = 64 }")
  end
  if type(opts.settings) ~= "table" then
    fail("settings", "a table of other server settings such as { compile = false }")
  end
  local ghost = opts.ghost_text
  if type(ghost) ~= "table" then
    fail("ghost_text", "a table")
  end
  if not PROVIDERS[ghost.provider] then
    fail("ghost_text.provider", "\"plugin\" or \"builtin\"")
  end
  if type(ghost.debounce_ms) ~= "number" or ghost.debounce_ms < 0 then
    fail("ghost_text.debounce_ms", "a number of milliseconds >= 0")
  end
  if type(ghost.hl_group) ~= "string" then
    fail("ghost_text.hl_group", "a highlight group name")
  end
  if opts.keymaps ~= false then
    if type(opts.keymaps) ~= "table" then
      fail("keymaps", "a table, or false to map no key")
    end
    for name, lhs in pairs(opts.keymaps) do
      if M.defaults.keymaps[name] == nil then
        fail("keymaps." .. name, "one of accept, accept_word, accept_line, dismiss")
      end
      if lhs ~= false and type(lhs) ~= "string" then
        fail("keymaps." .. name, "a key sequence or false")
      end
    end
  end
  local chat = opts.chat
  if type(chat) ~= "table" then
    fail("chat", "a table")
  end
  if not WINDOWS[chat.window] then
    fail("chat.window", "\"vsplit\", \"split\" or \"tab\"")
  end
  if type(chat.tools) ~= "boolean" and not is_string_list(chat.tools) then
    fail("chat.tools", "true (every built-in tool), false (none) or a list of tool names")
  end
  local known = is_string_list(chat.client_tools)
  for _, name in ipairs(known and chat.client_tools or {}) do
    known = known and vim.tbl_contains(M.CLIENT_TOOLS, name)
  end
  if not known then
    fail("chat.client_tools", "a list of tools the plugin runs: "
      .. table.concat(M.CLIENT_TOOLS, ", ") .. " (or {})")
  end
  if type(chat.keymaps) ~= "table" then
    fail("chat.keymaps", "a table")
  end
  for name, lhs in pairs(chat.keymaps) do
    if M.defaults.chat.keymaps[name] == nil then
      fail("chat.keymaps." .. name, "one of send, cancel")
    end
    if lhs ~= false and type(lhs) ~= "string" then
      fail("chat.keymaps." .. name, "a key sequence or false")
    end
  end
end

--- Merge the user's options over the defaults, validate, and make them current.
---@param opts? tramontane.Config
---@return tramontane.Config
function M.set(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("tramontane: setup() expects a table of options, got " .. type(opts), 0)
  end
  local merged = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  -- Lists replace the defaults rather than merging index by index.
  for _, key in ipairs({ "cmd", "filetypes", "root_markers" }) do
    if opts[key] ~= nil then
      merged[key] = opts[key]
    end
  end
  if opts.keymaps == false then
    merged.keymaps = false
  end
  local chat = type(opts.chat) == "table" and opts.chat or {}
  for _, key in ipairs({ "tools", "client_tools" }) do
    if chat[key] ~= nil then
      merged.chat[key] = chat[key]
    end
  end
  validate(merged)
  M.options = merged
  return merged
end

--- The server's settings (README "Settings"), sent as initializationOptions.
---@param opts? tramontane.Config
---@return table
function M.init_options(opts)
  opts = opts or M.options
  local init = vim.deepcopy(opts.settings)
  if next(opts.completion) ~= nil then
    init.completion = vim.tbl_deep_extend("force", init.completion or {}, opts.completion)
  end
  if opts.model then
    init.model = vim.fn.expand(opts.model)
  end
  init.device = opts.device or init.device
  init.dtype = opts.dtype or init.dtype
  if next(init) == nil then
    return vim.empty_dict() -- {} would be sent as a JSON list, which the server refuses
  end
  return init
end

return M
