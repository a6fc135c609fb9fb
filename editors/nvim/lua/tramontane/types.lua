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

---@class tramontane.ChatKeymaps
---@field send? string|false normal mode, in the chat buffer (default <CR>)
---@field cancel? string|false normal mode, in the chat buffer (default <C-c>)

---@class tramontane.ChatOptions
---@field window? "vsplit"|"split"|"tab" where :TramontaneChat opens the chat buffer
---@field tools? boolean|string[] the server's built-in tools: all, none, or these
---@field client_tools? string[] tools the plugin runs for the model (default { "diagnostics" })
---@field keymaps? tramontane.ChatKeymaps

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
---@field chat? tramontane.ChatOptions

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

---@class tramontane.Attachment
---@field kind "context"|"image"
---@field label string what the attachment line shows
---@field buf? integer context: the buffer the selection is in
---@field mark? integer context: the extmark spanning the selection in that buffer
---@field url? string image: a data: URI
---@field bytes? integer image: its size

---@class tramontane.ChatToolStep
---@field mark integer extmark on the step's heading line
---@field name string

---@class tramontane.ChatTurn
---@field request_id? integer
---@field client_id integer
---@field state "running"|"done"|"cancelled"|"failed"
---@field user table the user's message as sent (without the attached context)
---@field text string[] the answer's text pieces so far
---@field heading integer extmark on the "## Tramontane" line
---@field tail integer extmark where the answer goes on
---@field steps table<string, tramontane.ChatToolStep> tool steps by call id
---@field after_step boolean the last thing drawn was a tool step

---@class tramontane.ChatSession
---@field buf integer the chat buffer
---@field chat_id string
---@field client_id? integer the server the conversation talks to
---@field source_buf? integer the buffer :TramontaneChat was run from
---@field history table[] the messages sent before the next user message
---@field attachments table<string, tramontane.Attachment> by reference ("image/2")
---@field next_id integer
---@field input integer extmark on the last "## You" line: the input is below it
---@field turn? tramontane.ChatTurn
---@field cancelled? integer the id of the last request cancelled (its -32800 may be on its way)
---@field last_request? table params of the last tramontane/chat request
---@field last_result? table the last tramontane/chat result
