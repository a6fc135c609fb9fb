-- Ghost text: ask `textDocument/inlineCompletion` as the user types, show the answer as extmarks,
-- keep it while the user types what it shows, insert it on accept.
--
-- The buffer is never changed until accept: the suggestion lives in extmarks only. One request
-- per buffer is in flight at most; a keystroke cancels it ($/cancelRequest) and its answer, if
-- it still arrives, is dropped.
local config = require("tramontane.config")

local api = vim.api
local uv = vim.uv or vim.loop

local M = {}

M.METHOD = "textDocument/inlineCompletion"
M.ns = api.nvim_create_namespace("tramontane")

local HAS_011 = vim.fn.has("nvim-0.11") == 1
local REQUEST_CANCELLED = -32800
local TRIGGER_AUTOMATIC = 2

---@type table<integer, tramontane.BufferState>
local buffers = {}
M._buffers = buffers -- read by the tests

-- Neovim 0.10 has client.request(...) fields; 0.11 has client:request(...) methods.
local function client_request(client, method, params, handler, bufnr)
  if HAS_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

local function client_cancel(client, id)
  if HAS_011 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

--- Byte column of an LSP `character` on `line`, in the client's position encoding.
---@param line string
---@param character integer
---@param encoding string
---@return integer
local function byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  local ok, col
  if HAS_011 then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  end
  return ok and col or #line
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == "i"
end

local function cursor(buf)
  if api.nvim_get_current_buf() ~= buf then
    return nil
  end
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

---@param buf integer
---@return tramontane.BufferState
local function state(buf)
  local s = buffers[buf]
  if not s then
    s = { clients = {} }
    buffers[buf] = s
  end
  return s
end

local function hide(buf)
  if api.nvim_buf_is_valid(buf) then
    api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  end
end

local function cancel_pending(s)
  local pending = s.pending
  if not pending then
    return
  end
  s.pending = nil
  local client = vim.lsp.get_client_by_id(pending.client_id)
  if client then
    client_cancel(client, pending.id)
  end
end

local function stop_timer(s)
  if s.timer then
    s.timer:stop()
  end
end

--- What is left to show of the suggestion, given what the user typed since it appeared:
--- nil when the text typed is not the beginning of the suggestion (a stale ghost).
---@return string|nil rest, integer row, integer col
local function remainder(buf, sug)
  local row, col = cursor(buf)
  if not row or row < sug.row or (row == sug.row and col < sug.col) then
    return nil, 0, 0
  end
  local _, newlines = sug.text:gsub("\n", "")
  if row - sug.row > newlines then
    return nil, 0, 0
  end
  local ok, typed = pcall(api.nvim_buf_get_text, buf, sug.row, sug.col, row, col, {})
  if not ok then
    return nil, 0, 0
  end
  local text = table.concat(typed, "\n")
  if #text < #sug.text and sug.text:sub(1, #text) == text then
    return sug.text:sub(#text + 1), row, col
  end
  return nil, 0, 0
end

-- Virtual text shows a tab as one cell: expand it the way the buffer would.
local function display(line, buf)
  return (line:gsub("\t", string.rep(" ", vim.bo[buf].tabstop)))
end

--- Show `text` at (row, col): its first line in the line, the others as virtual lines below.
local function render(buf, text, row, col)
  hide(buf)
  local hl = config.options.ghost_text.hl_group
  local lines = vim.split(text, "\n", { plain = true })
  local line = api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
  local opts = { hl_mode = "combine", priority = 1000 }
  if lines[1] ~= "" then
    opts.virt_text = { { display(lines[1], buf), hl } }
    -- At the end of a line an overlay leaves the cursor where it is; inside a line the rest
    -- of the line must move right to make room.
    opts.virt_text_pos = col < #line and "inline" or "overlay"
  end
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      table.insert(opts.virt_lines, { { display(lines[i], buf), hl } })
    end
  end
  api.nvim_buf_set_extmark(buf, M.ns, row, col, opts)
end

--- Show what is left of the suggestion; clear it and return false when it no longer matches.
local function refresh(buf)
  local s = buffers[buf]
  if not s or not s.suggestion then
    return false
  end
  local rest, row, col = remainder(buf, s.suggestion)
  if rest and in_insert_mode() then
    render(buf, rest, row, col)
    return true
  end
  s.suggestion = nil
  hide(buf)
  return false
end

--- The suggestion an inlineCompletion answer holds for the request `pending`, or nil.
local function suggestion_from(buf, pending, result, encoding)
  local items = type(result) == "table" and (result.items or result) or {}
  for _, item in ipairs(items) do
    local text = item.insertText
    if type(text) == "table" then -- a StringValue (snippet): show and insert its raw value
      text = text.value
    end
    if type(text) == "string" and text ~= "" then
      local sug = { text = text, row = pending.row, col = pending.col, overwrite = "" }
      local range = item.range
      if range then
        local line = api.nvim_buf_get_lines(buf, pending.row, pending.row + 1, false)[1] or ""
        local first = byte_col(line, range.start.character, encoding)
        local last = byte_col(line, range["end"].character, encoding)
        local same_line = range.start.line == pending.row and range["end"].line == pending.row
        local typed = line:sub(first + 1, pending.col)
        if same_line and first <= pending.col and pending.col <= last
            and text:sub(1, #typed) == typed then
          sug.text = text:sub(#typed + 1)
          sug.overwrite = line:sub(pending.col + 1, last)
        else
          sug.text = ""
        end
      end
      if sug.text ~= "" then
        return sug
      end
    end
  end
  return nil
end

local function on_result(buf, pending, err, result)
  local s = buffers[buf]
  if not s or s.pending ~= pending then
    return -- superseded: a newer keystroke already cancelled it
  end
  s.pending = nil
  if err then
    if err.code ~= REQUEST_CANCELLED then
      vim.lsp.log.warn("tramontane: inlineCompletion failed:", err.message)
    end
    return
  end
  local row, col = cursor(buf)
  if row ~= pending.row or col ~= pending.col or not in_insert_mode()
      or api.nvim_buf_get_changedtick(buf) ~= pending.tick then
    return -- the text moved on meanwhile
  end
  local client = vim.lsp.get_client_by_id(pending.client_id)
  local encoding = client and client.offset_encoding or "utf-16"
  local sug = suggestion_from(buf, pending, result, encoding)
  s.suggestion = sug
  if sug then
    sug.client_id = pending.client_id
    render(buf, sug.text, sug.row, sug.col)
  end
end

local function live_client(s)
  for id in pairs(s.clients) do
    local client = vim.lsp.get_client_by_id(id)
    if client then
      return client
    end
    s.clients[id] = nil
  end
  return nil
end

--- Send one inlineCompletion request at the cursor, cancelling the one in flight.
---@param buf integer
---@return integer|nil request_id
function M.request(buf)
  local s = buffers[buf]
  local client = s and live_client(s)
  local row, col = cursor(buf)
  if not client or not row or not in_insert_mode() then
    return nil
  end
  cancel_pending(s)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = TRIGGER_AUTOMATIC }
  local pending = { client_id = client.id, tick = api.nvim_buf_get_changedtick(buf),
                    row = row, col = col }
  s.pending = pending
  local ok, id = client_request(client, M.METHOD, params, function(err, result)
    on_result(buf, pending, err, result)
  end, buf)
  if not ok or not id then
    s.pending = nil
    return nil
  end
  pending.id = id
  return id
end

local function schedule(buf)
  local s = buffers[buf]
  s.timer = s.timer or uv.new_timer()
  s.timer:stop()
  s.timer:start(config.options.ghost_text.debounce_ms, 0, vim.schedule_wrap(function()
    if buffers[buf] == s and api.nvim_buf_is_valid(buf) then
      M.request(buf)
    end
  end))
end

local function on_text_changed(buf)
  local s = buffers[buf]
  cancel_pending(s) -- a newer keystroke: the answer in flight would be for old text
  if refresh(buf) then
    return -- the user is typing what the ghost shows: keep showing the rest
  end
  schedule(buf)
end

local function on_cursor_moved(buf)
  local s = buffers[buf]
  refresh(buf)
  local row, col = cursor(buf)
  if s.pending and (row ~= s.pending.row or col ~= s.pending.col) then
    cancel_pending(s)
  end
end

--- Hide the ghost text and forget the request in flight.
---@param buf? integer
---@return boolean was_visible
function M.dismiss(buf)
  buf = buf or api.nvim_get_current_buf()
  local s = buffers[buf]
  if not s then
    return false
  end
  local visible = s.suggestion ~= nil
  stop_timer(s)
  cancel_pending(s)
  s.suggestion = nil
  hide(buf)
  return visible
end

--- Show `text` as ghost text at the cursor as if the server had suggested it (for tests and
--- other sources of suggestions); it behaves like any other until typed over or accepted.
---@param buf integer
---@param text string
function M.show(buf, text)
  local row, col = cursor(buf)
  if not row or text == "" then
    return
  end
  local s = state(buf)
  cancel_pending(s)
  s.suggestion = { text = text, row = row, col = col, overwrite = "", client_id = 0 }
  render(buf, text, row, col)
end

--- The ghost text currently shown in `buf`, or nil.
---@param buf? integer
---@return string|nil
function M.visible_text(buf)
  buf = buf or api.nvim_get_current_buf()
  local s = buffers[buf]
  if not s or not s.suggestion then
    return nil
  end
  return (remainder(buf, s.suggestion))
end

local function next_word(text)
  local word = text:match("^\n?[ \t]*[%w_]+") or text:match("^\n?[ \t]*[^%w_%s]+")
      or text:match("^\n?[ \t]*")
  if word == "" then -- another blank such as \r: take one character
    word = text:match("^[%z\1-\127\194-\244][\128-\191]*")
  end
  return word
end

--- Insert the ghost text (all of it, its next word or its next line) at the cursor.
---@param kind? "all"|"word"|"line"
---@return boolean inserted
function M.accept(kind)
  local buf = api.nvim_get_current_buf()
  local s = buffers[buf]
  if not s or not s.suggestion then
    return false
  end
  local sug = s.suggestion
  local rest, row, col = remainder(buf, sug)
  if not rest then
    M.dismiss(buf)
    return false
  end
  local part = rest
  if kind == "word" then
    part = next_word(rest)
  elseif kind == "line" then
    part = rest:match("^\n?[^\n]*")
  end
  local last = col
  if part == rest then
    s.suggestion = nil -- fully accepted; the edit below starts the next request
    local line = api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
    if sug.overwrite ~= "" and line:sub(col + 1, col + #sug.overwrite) == sug.overwrite then
      last = col + #sug.overwrite
    end
  end
  hide(buf)
  local lines = vim.split(part, "\n", { plain = true })
  api.nvim_buf_set_text(buf, row, col, row, last, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  refresh(buf)
  return true
end

--- Start ghost text for `client` in `buf` (the client's on_attach).
---@param client vim.lsp.Client
---@param buf integer
function M.attach(client, buf)
  local s = state(buf)
  s.clients[client.id] = true
  if s.augroup then
    return
  end
  s.augroup = api.nvim_create_augroup("tramontane_buf_" .. buf, { clear = true })
  local function on(events, callback)
    api.nvim_create_autocmd(events, { group = s.augroup, buffer = buf, callback = function()
      if buffers[buf] == s then
        callback(buf)
      end
    end })
  end
  on({ "TextChangedI", "TextChangedP" }, on_text_changed)
  on("CursorMovedI", on_cursor_moved)
  on("InsertEnter", schedule)
  on({ "InsertLeave", "BufLeave" }, M.dismiss)
  on({ "BufUnload", "BufWipeout" }, M.detach)
  api.nvim_create_autocmd("LspDetach", { group = s.augroup, buffer = buf, callback = function(ev)
    s.clients[ev.data.client_id] = nil
    if next(s.clients) == nil then
      M.detach(buf)
    end
  end })
end

--- Stop ghost text in `buf`.
---@param buf integer
function M.detach(buf)
  local s = buffers[buf]
  if not s then
    return
  end
  M.dismiss(buf)
  if s.timer then
    s.timer:close()
  end
  pcall(api.nvim_del_augroup_by_id, s.augroup)
  buffers[buf] = nil
end

return M
