-- Loaded at startup: only a command; the plugin's modules load on first use.
if vim.g.loaded_tramontane then
  return
end
vim.g.loaded_tramontane = true

vim.api.nvim_create_user_command("TramontaneStatus", function()
  local status = require("tramontane.status")
  local current = status.get()
  vim.notify(current and ("Tramontane " .. status.format(current))
    or "Tramontane: no server attached to this buffer")
end, { desc = "Show the Tramontane server's status" })
