-- For Neovim 0.11+: vim.lsp.config("tramontane", { init_options = { model = "..." } }) then
-- vim.lsp.enable("tramontane"). Ghost text and keys come with on_attach (options: setup()); the
-- handlers stream the chat and confirm its edits.
---@type vim.lsp.Config
return {
  cmd = { "lsp_server", "--stdio" },
  filetypes = require("tramontane.config").defaults.filetypes,
  root_markers = { ".git" },
  capabilities = require("tramontane").capabilities(),
  handlers = require("tramontane").handlers(),
  on_attach = function(client, bufnr)
    require("tramontane").attach(client, bufnr)
  end,
}
