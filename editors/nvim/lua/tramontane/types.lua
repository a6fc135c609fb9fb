---@meta
-- LuaCATS types for the language server (lua-language-server); never required at run time.

---@class tramontane.GhostTextOptions
---@field provider? "plugin"|"builtin" "builtin" = Neovim 0.12's vim.lsp.inline_completion
---@field debounce_ms? integer wait this long after a keystroke before asking the server
---@field hl_group? string highlight of the ghost text (default TramontaneGhostText -> Comment)

---@class tramontane.Keymaps
---@field accept? string|false
---@field accept_word? string|false
---@field accept_line? string|false
---@field dismiss? string|false

---@class tramontane.Config
---@field cmd? string[] the server command (default { "lsp_server", "--stdio" })
---@field model? string checkpoint folder (initializationOptions.model)
---@field device? string "cpu", "cuda", "cuda:N", "mps"
---@field dtype? string "float32", "bfloat16", "float16"
---@field filetypes? string[] filetypes that start the server
---@field root_markers? string[] files that mark a project root
---@field completion? table the server's completion.* settings (maxTokens, timeBudgetMs, ...)
---@field settings? table any other server setting, sent as is (e.g. { compile = false })
---@field ghost_text? tramontane.GhostTextOptions
---@field keymaps? tramontane.Keymaps|false false = map no key

---@class tramontane.Status
---@field state "loading"|"ready"|"busy"|"error"
---@field message string
---@field reason? string why the last completion came back empty
---@field client_id integer
---@field time integer

---@class tramontane.Suggestion
---@field text string the ghost text, from the anchor on
---@field row integer 0-based anchor line
---@field col integer anchor byte column
---@field overwrite string text after the anchor the item's range replaces on full accept
---@field client_id integer

---@class tramontane.Pending
---@field id integer request id
---@field client_id integer
---@field tick integer changedtick when sent
---@field row integer
---@field col integer

---@class tramontane.BufferState
---@field clients table<integer, true>
---@field augroup? integer
---@field timer? uv.uv_timer_t
---@field pending? tramontane.Pending
---@field suggestion? tramontane.Suggestion
