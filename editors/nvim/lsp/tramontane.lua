-- For Neovim 0.11+: vim.lsp.config("tramontane", { init_options = { model = "..." } }) then
-- vim.lsp.enable("tramontane"). Ghost text and keys come with on_attach (options: setup()).
---@type vim.lsp.Config
return {
  cmd = { "lsp_server", "--stdio" },
  filetypes = require("tramontane.config").defaults.filetypes,
  root_markers = { ".git" },
  handlers = {
    ["tramontane/status"] = function(...)
      return require("tramontane.status").handler(...)
    end,
  },
  on_attach = function(client, bufnr)
    require("tramontane").attach(client, bufnr)
  end,
}
