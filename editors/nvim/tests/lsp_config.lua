-- Neovim 0.11's way: lsp/tramontane.lua through vim.lsp.config + vim.lsp.enable, no setup().
-- Run by tests/editors/test_nvim.py:
--   nvim --headless --clean -c "luafile editors/nvim/tests/lsp_config.lua"
local H = dofile(vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":h") .. "/harness.lua")

local api = vim.api

H.run(function()
  H.step("vim.lsp.config + vim.lsp.enable start the server from lsp/tramontane.lua")
  vim.lsp.config("tramontane", {
    cmd = { H.server, "--stdio" },
    init_options = { model = H.model, compile = false,
                     completion = { maxTokens = 8, timeBudgetMs = 60000 } },
  })
  vim.lsp.enable("tramontane")
  local project = vim.fn.tempname()
  vim.fn.mkdir(project .. "/.git", "p")
  vim.fn.mkdir(project .. "/src", "p")
  vim.cmd.edit(project .. "/src/demo.py")
  local buf = api.nvim_get_current_buf()
  api.nvim_buf_set_lines(buf, 0, -1, true, { "def add(a, b):", "    ", "", "print(add(1, 2))" })
  local client = H.wait_ready(buf, 60000)
  H.eq(client.name, "tramontane", "client name")
  H.eq(client.config.root_dir, vim.uv.fs_realpath(project), "root_dir from root_markers")
  H.truthy(vim.tbl_contains(client.config.filetypes, "python"), "python is a default filetype")
  H.eq(client.config.init_options.model, H.model, "initializationOptions.model")
  for _, method in ipairs({ "tramontane/status", "tramontane/chatDelta", "tramontane/runTool",
                            "workspace/applyEdit" }) do
    H.truthy(client.handlers[method], "lsp/tramontane.lua's handler for " .. method)
  end
  H.truthy(client.handlers["workspace/applyEdit"] ~= vim.lsp.handlers["workspace/applyEdit"],
    "workspace/applyEdit: the plugin's for this client, Neovim's for the others")
  H.eq(client.config.capabilities.workspace.workspaceEdit.changeAnnotationSupport,
    { groupsOnLabel = false }, "the client says it honours change annotations")

  H.step("on_attach from lsp/tramontane.lua gives ghost text and the <Tab> key")
  local completion = require("tramontane.completion")
  api.nvim_win_set_cursor(0, { 2, 3 })
  H.type("Ar")
  H.wait("ghost text", function()
    return require("tramontane").suggestion()
  end, 20000)
  local ghost = require("tramontane").suggestion()
  H.truthy(#api.nvim_buf_get_extmarks(buf, completion.ns, 0, -1, {}) == 1, "one ghost extmark")
  H.type("<Tab>")
  H.wait("the accepted text in the buffer", function()
    return table.concat(api.nvim_buf_get_lines(buf, 1, -1, true), "\n")
      == "    r" .. ghost .. "\n\nprint(add(1, 2))"
  end, 5000)
  H.type("<Esc>")

  H.step(":checkhealth tramontane reads the vim.lsp.config configuration")
  vim.cmd("checkhealth tramontane")
  local report = table.concat(api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  H.out("CHECKHEALTH BEGIN\n" .. report .. "\nCHECKHEALTH END")
  H.truthy(report:find("configured by vim.lsp.config", 1, true), "checkhealth names the source")
  H.truthy(report:find("server command: `" .. H.server .. " --stdio`", 1, true),
    "checkhealth names the server command")
  H.truthy(report:find("model: " .. H.model, 1, true), "checkhealth names the model")
end)
