-- Loaded at startup: only commands; the plugin's modules load on first use.
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

vim.api.nvim_create_user_command("TramontaneChat", function(opts)
  require("tramontane.chat").command(opts)
end, {
  desc = "Open the Tramontane chat (with a range: attach those lines; `new`: start over)",
  nargs = "?",
  range = true,
  complete = function()
    return { "new" }
  end,
})

vim.api.nvim_create_user_command("TramontaneChatImage", function(opts)
  require("tramontane.chat").image_command(opts)
end, {
  desc = "Attach an image file to the Tramontane chat message (no path: the clipboard's image)",
  nargs = "?",
  complete = "file",
})
