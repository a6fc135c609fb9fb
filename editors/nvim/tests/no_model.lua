-- What the user sees when no completion can come: no model configured. Also: setup() rejects
-- bad options with a message naming the option. Run by tests/editors/test_nvim.py.
local H = dofile(vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":h") .. "/harness.lua")

local api = vim.api

local function setup_error(opts)
  local ok, err = pcall(require("tramontane").setup, opts)
  H.truthy(not ok, "setup(" .. vim.inspect(opts) .. ") should fail")
  return err
end

H.run(function()
  H.step("setup() rejects bad options, naming them")
  H.eq(setup_error({ cmd = "lsp_server" }), "tramontane: option cmd = \"lsp_server\" is invalid "
    .. "(expected a non-empty list of strings, e.g. { \"lsp_server\", \"--stdio\" })", "cmd")
  H.eq(setup_error({ ghost_text = { provider = "copilot" } }), "tramontane: option "
    .. "ghost_text.provider = \"copilot\" is invalid (expected \"plugin\" or \"builtin\")",
    "ghost_text.provider")
  H.eq(setup_error({ keymaps = { accept_all = "<C-y>" } }), "tramontane: option "
    .. "keymaps.accept_all = \"<C-y>\" is invalid (expected one of accept, accept_word, "
    .. "accept_line, dismiss)", "keymaps.accept_all")
  H.eq(setup_error({ chat = { window = "float" } }), "tramontane: option chat.window = \"float\" "
    .. "is invalid (expected \"vsplit\", \"split\" or \"tab\")", "chat.window")
  H.eq(setup_error({ chat = { client_tools = { "shell" } } }), "tramontane: option "
    .. "chat.client_tools = { \"shell\" } is invalid (expected a list of tools the plugin runs: "
    .. "diagnostics (or {}))", "chat.client_tools")
  H.eq(setup_error({ chat = { tools = "all" } }), "tramontane: option chat.tools = \"all\" is "
    .. "invalid (expected true (every built-in tool), false (none) or a list of tool names)",
    "chat.tools")
  H.eq(setup_error({ chat = { keymaps = { stop = "q" } } }), "tramontane: option "
    .. "chat.keymaps.stop = \"q\" is invalid (expected one of send, cancel)", "chat.keymaps.stop")

  H.step("without a model the status says why, and no ghost text appears")
  local notified = {}
  vim.notify = function(msg, level)
    table.insert(notified, { msg = msg, level = level })
  end
  local tramontane = require("tramontane")
  tramontane.setup({ cmd = { H.server, "--stdio" }, filetypes = { "python" },
                     keymaps = { accept_word = false } })
  vim.cmd.edit(vim.fn.tempname() .. ".py")
  local buf = api.nvim_get_current_buf()
  local client = H.wait("a tramontane client", function()
    return vim.lsp.get_clients({ bufnr = buf, name = "tramontane" })[1]
  end, 30000)
  local status = require("tramontane.status")
  H.wait("status error", function()
    local s = status.latest[client.id]
    return s and s.state == "error"
  end, 30000)
  H.eq(tramontane.status(buf), "Tramontane ✗ no model", "statusline string")
  H.eq(tramontane.server_status(buf).reason, "no model", "status reason")
  H.wait("the error shown once", function()
    return #notified == 1
  end)
  H.eq(notified[1], { msg = "Tramontane: No model configured: set `model` to a Mistral "
    .. "checkpoint folder", level = vim.log.levels.WARN }, "notification")

  H.step("keymaps: the configured ones are mapped, the disabled one is not")
  local maps = {}
  for _, map in ipairs(api.nvim_buf_get_keymap(buf, "i")) do
    if (map.desc or ""):find("^Tramontane") then
      maps[map.lhs] = map.desc
    end
  end
  H.eq(maps, { ["<Tab>"] = "Tramontane: accept", ["<M-C-Right>"] = "Tramontane: accept line",
               ["<C-]>"] = "Tramontane: dismiss" }, "buffer-local insert-mode maps")

  H.step("<Tab> without ghost text does what <Tab> does (here: spaces to the next stop)")
  local completion = require("tramontane.completion")
  vim.bo[buf].expandtab = true
  vim.bo[buf].softtabstop = 4
  H.type("ix<Tab>y")
  H.sleep(300)
  H.eq(api.nvim_buf_get_lines(buf, 0, -1, true), { "x   y" }, "the typed text")
  H.eq(#api.nvim_buf_get_extmarks(buf, completion.ns, 0, -1, {}), 0, "ghost extmarks")
  H.type("<Esc>")

  H.step(":checkhealth tramontane says the model is missing and shows the status")
  vim.cmd("checkhealth tramontane")
  local report = table.concat(api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  H.out("CHECKHEALTH BEGIN\n" .. report .. "\nCHECKHEALTH END")
  H.truthy(report:find("model: not set", 1, true), "checkhealth: model not set")
  H.truthy(report:find("status: error: No model configured", 1, true), "checkhealth: status")
end)
