-- The chat buffer: a Markdown conversation that the user writes into below the last "## You".
--
-- Its structure is kept with extmarks, not read back from the text (an answer may hold headings
-- of its own): the input separator, each answer's heading and the point where it goes on, and
-- the tool steps, which fold closed. The buffer stays editable; text typed after the point an
-- answer streams to stays after it.
local api = vim.api

local M = {}

M.YOU = "## You"
M.ANSWER = "## Tramontane"
M.ns = api.nvim_create_namespace("tramontane_chat")
M.fold_ns = api.nvim_create_namespace("tramontane_chat_folds")
M.note_ns = api.nvim_create_namespace("tramontane_chat_notes")

-- An attachment line ends with a link to its reference: "...](tramontane:image/2)".
local REF = "^%s*!?%[.*%]%(tramontane:(%a+/%d+)%)%s*$"

---@param ref string
---@param attachment tramontane.Attachment
---@return string
function M.attachment_line(ref, attachment)
  local bang = attachment.kind == "image" and "!" or ""
  return string.format("%s[%s](tramontane:%s)", bang, attachment.label, ref)
end

local function mark_pos(buf, ns, id)
  local pos = api.nvim_buf_get_extmark_by_id(buf, ns, id, {})
  return pos[1], pos[2]
end

local function line(buf, row)
  return api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
end

--- A backtick fence longer than any run of backticks in `text`.
local function fence(text)
  local longest = 2
  for run in text:gmatch("`+") do
    longest = math.max(longest, #run)
  end
  return string.rep("`", longest + 1)
end

-- Fold levels from the fold extmarks, computed once per change of the buffer.
---@type table<integer, { key: string, levels: table<integer, string> }>
local folds = {}

--- 'foldexpr' of chat windows: a tool step is a closed fold (foldlevel 0), the rest is open text.
---@return string
function M.foldexpr()
  local buf = api.nvim_get_current_buf()
  local marks = api.nvim_buf_get_extmarks(buf, M.fold_ns, 0, -1, { details = true })
  local key = api.nvim_buf_get_changedtick(buf) .. ":" .. #marks
  local cached = folds[buf]
  if not cached or cached.key ~= key then
    cached = { key = key, levels = {} }
    for _, mark in ipairs(marks) do
      local first, last = mark[2] + 1, mark[4].end_row + 1
      cached.levels[first] = ">1"
      for lnum = first + 1, last do
        cached.levels[lnum] = "1"
      end
    end
    folds[buf] = cached
  end
  return cached.levels[vim.v.lnum] or "0"
end

---@param win integer
function M.setup_window(win)
  local function set(name, value)
    api.nvim_set_option_value(name, value, { win = win, scope = "local" })
  end
  set("foldmethod", "expr")
  set("foldexpr", "v:lua.require'tramontane.chat.view'.foldexpr()")
  set("foldlevel", 0)
  set("foldenable", true)
  set("wrap", true)
  set("linebreak", true)
end

---@param name string
---@return integer buf
function M.create(name)
  local buf = api.nvim_create_buf(false, true)
  api.nvim_buf_set_name(buf, name)
  vim.bo[buf].bufhidden = "hide"
  vim.bo[buf].filetype = "markdown"
  api.nvim_create_autocmd("BufWinEnter", { buffer = buf, callback = function()
    M.setup_window(api.nvim_get_current_win())
  end })
  api.nvim_create_autocmd("BufWipeout", { buffer = buf, callback = function()
    folds[buf] = nil
  end })
  return buf
end

--- Empty the buffer: only the input separator is left.
---@param session tramontane.ChatSession
function M.reset(session)
  local buf = session.buf
  for _, ns in ipairs({ M.ns, M.fold_ns, M.note_ns }) do
    api.nvim_buf_clear_namespace(buf, ns, 0, -1)
  end
  api.nvim_buf_set_lines(buf, 0, -1, false, { M.YOU, "" })
  session.input = api.nvim_buf_set_extmark(buf, M.ns, 0, 0, {})
end

--- The row of the input separator: its extmark, or the last "## You" line if that line was
--- edited away; -1 when there is none (then the whole buffer is the input).
---@param session tramontane.ChatSession
---@return integer
function M.input_row(session)
  local buf = session.buf
  local row = session.input and mark_pos(session.buf, M.ns, session.input)
  if row and vim.trim(line(buf, row)) == M.YOU then
    return row
  end
  local lines = api.nvim_buf_get_lines(buf, 0, -1, false)
  for i = #lines, 1, -1 do
    if vim.trim(lines[i]) == M.YOU then
      return i - 1
    end
  end
  return -1
end

--- What the user wrote below the separator, and the attachments it references.
---@param session tramontane.ChatSession
---@return string text, string[] refs
function M.input(session)
  local lines = api.nvim_buf_get_lines(session.buf, M.input_row(session) + 1, -1, false)
  local text, refs = {}, {}
  for _, l in ipairs(lines) do
    local ref = l:match(REF)
    if ref and session.attachments[ref] then
      table.insert(refs, ref)
    else
      table.insert(text, l)
    end
  end
  return vim.trim(table.concat(text, "\n")), refs
end

--- Show `attachment` in the input, below the separator and the attachments already there; an
--- attachment of the same kind is replaced when `replace` is set (one selection per message).
---@param session tramontane.ChatSession
---@param ref string
---@param attachment tramontane.Attachment
---@param replace? boolean
function M.add_attachment(session, ref, attachment, replace)
  local buf = session.buf
  local row = M.input_row(session) + 1
  local count = api.nvim_buf_line_count(buf)
  while row < count do
    local old = line(buf, row):match(REF)
    if not old then
      break
    end
    local same = session.attachments[old]
    if replace and same and same.kind == attachment.kind then
      api.nvim_buf_set_lines(buf, row, row + 1, false, {})
      count = count - 1
    else
      row = row + 1
    end
  end
  api.nvim_buf_set_lines(buf, row, row, false, { M.attachment_line(ref, attachment) })
end

-- Windows showing `buf` whose cursor is on row `row`: they follow the answer as it grows.
local function following(buf, row)
  local wins = {}
  for _, win in ipairs(api.nvim_list_wins()) do
    if api.nvim_win_get_buf(win) == buf and api.nvim_win_get_cursor(win)[1] - 1 == row then
      table.insert(wins, win)
    end
  end
  return wins
end

local function follow(wins, buf, row)
  for _, win in ipairs(wins) do
    if api.nvim_win_is_valid(win) and api.nvim_win_get_buf(win) == buf then
      pcall(api.nvim_win_set_cursor, win, { row + 1, 0 })
    end
  end
end

--- Insert `text` where the turn's answer goes on.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param text string
function M.append(session, turn, text)
  if text == "" then
    return
  end
  local buf = session.buf
  local row, col = mark_pos(buf, M.ns, turn.tail)
  local wins = following(buf, row)
  local lines = vim.split(text, "\n", { plain = true })
  api.nvim_buf_set_text(buf, row, col, row, col, lines)
  follow(wins, buf, (mark_pos(buf, M.ns, turn.tail)))
end

--- Start the answer below the user's message: a heading, then the text as it streams.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
function M.begin_answer(session, turn)
  local buf = session.buf
  local input = M.input_row(session)
  local last = api.nvim_buf_line_count(buf) - 1
  while last > input + 1 and line(buf, last):match("^%s*$") do
    last = last - 1
  end
  api.nvim_buf_set_lines(buf, last + 1, -1, false, { "", M.ANSWER, "", "" })
  turn.heading = api.nvim_buf_set_extmark(buf, M.ns, last + 2, 0, {})
  turn.tail = api.nvim_buf_set_extmark(buf, M.ns, last + 4, 0, { right_gravity = true })
  for _, win in ipairs(api.nvim_list_wins()) do
    if api.nvim_win_get_buf(win) == buf and api.nvim_win_get_cursor(win)[1] - 1 > input then
      api.nvim_win_set_cursor(win, { last + 5, 0 })
    end
  end
end

--- A short note after the answer's heading ("answering…", "24 tokens"), as virtual text.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param text string|nil
function M.status(session, turn, text)
  local buf = session.buf
  local row = mark_pos(buf, M.ns, turn.heading)
  api.nvim_buf_clear_namespace(buf, M.note_ns, row, row + 1)
  if text then
    api.nvim_buf_set_extmark(buf, M.note_ns, row, 0, {
      virt_text = { { text, "Comment" } },
      virt_text_pos = "eol",
    })
  end
end

-- What goes before a new block at the tail: a blank line between it and the text above.
local function block_start(session, turn)
  local buf = session.buf
  local row, col = mark_pos(buf, M.ns, turn.tail)
  if col > 0 then
    return "\n\n"
  end
  local above = row > 0 and line(buf, row - 1) or ""
  if above:match("^%s*$") or above == M.ANSWER then
    return ""
  end
  return "\n"
end

--- A tool call, as the heading of a step that folds once its result is in.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param call { id: string, name: string, arguments: string }
function M.tool_call(session, turn, call)
  local arguments = type(call.arguments) == "string" and call.arguments
    or vim.json.encode(call.arguments)
  local f = fence(arguments)
  M.append(session, turn, block_start(session, turn))
  local row = mark_pos(session.buf, M.ns, turn.tail)
  M.append(session, turn, table.concat({ "### ⚙ " .. call.name, f .. "json", arguments, f }, "\n"))
  turn.steps[call.id] = {
    name = call.name,
    mark = api.nvim_buf_set_extmark(session.buf, M.ns, row, 0, {}),
  }
  turn.after_step = true
end

--- A tool's result: its block goes below the call, the heading says ✓ or ✗, the step folds.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param result { id: string, content: string, isError: boolean }
function M.tool_result(session, turn, result)
  local buf = session.buf
  local step = turn.steps[result.id]
  local content = type(result.content) == "string" and result.content or vim.inspect(result.content)
  local f = fence(content)
  local body = content:sub(-1) == "\n" and content or content .. "\n"
  M.append(session, turn, "\n" .. f .. (result.isError and "text error" or "text") .. "\n"
    .. body .. f)
  turn.after_step = true
  if not step then
    return
  end
  local first = mark_pos(buf, M.ns, step.mark)
  local last = mark_pos(buf, M.ns, turn.tail)
  api.nvim_buf_set_extmark(buf, M.fold_ns, first, 0, { end_row = last, end_col = 0 })
  -- Rewriting the heading makes Neovim compute the folds from there again.
  local heading = "### ⚙ " .. step.name .. (result.isError and " ✗" or " ✓")
  api.nvim_buf_set_text(buf, first, 0, first, #line(buf, first), { heading })
end

--- A text delta: after a tool step the answer goes on in a new paragraph.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param text string
function M.text(session, turn, text)
  if turn.after_step and text ~= "" then
    turn.after_step = false
    M.append(session, turn, "\n\n")
  end
  M.append(session, turn, text)
end

--- A block of Markdown (e.g. an edit's diff) in the answer, on lines of its own.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param lines string[]
function M.block(session, turn, lines)
  M.append(session, turn, block_start(session, turn) .. table.concat(lines, "\n"))
  turn.after_step = true
end

--- End the answer (with an italic note when given) and open the input for the next message.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
---@param note string|nil
function M.finish(session, turn, note)
  local buf = session.buf
  M.status(session, turn, nil)
  local row = mark_pos(buf, M.ns, turn.tail)
  local wins = following(buf, row)
  if note then
    M.append(session, turn, block_start(session, turn) .. "_" .. note .. "_")
  end
  M.append(session, turn, "\n\n" .. M.YOU .. "\n")
  local tail = mark_pos(buf, M.ns, turn.tail)
  session.input = api.nvim_buf_set_extmark(buf, M.ns, tail - 1, 0, {})
  follow(wins, buf, tail)
end

--- Take the answer out again (the request failed): the user's message is the input again.
---@param session tramontane.ChatSession
---@param turn tramontane.ChatTurn
function M.discard(session, turn)
  local buf = session.buf
  local first = mark_pos(buf, M.ns, turn.heading) - 1
  local last = mark_pos(buf, M.ns, turn.tail)
  api.nvim_buf_clear_namespace(buf, M.fold_ns, first, last + 1)
  api.nvim_buf_clear_namespace(buf, M.note_ns, first, last + 1)
  api.nvim_buf_set_lines(buf, first, last + 1, false, {})
  for _, id in ipairs({ turn.heading, turn.tail }) do
    api.nvim_buf_del_extmark(buf, M.ns, id)
  end
end

--- Show the chat buffer: focus its window in this tab page, or open one.
---@param buf integer
---@param kind "vsplit"|"split"|"tab"
---@return integer win
function M.show(buf, kind)
  for _, win in ipairs(api.nvim_tabpage_list_wins(0)) do
    if api.nvim_win_get_buf(win) == buf then
      api.nvim_set_current_win(win)
      return win
    end
  end
  local win
  if kind == "tab" then
    vim.cmd("tab split")
    win = api.nvim_get_current_win()
    api.nvim_win_set_buf(win, buf)
  else
    win = api.nvim_open_win(buf, true, { split = kind == "split" and "below" or "right", win = -1 })
  end
  M.setup_window(win)
  return win
end

--- The windows of any tab page showing `buf`.
---@param buf integer
---@return integer[]
function M.windows(buf)
  return vim.tbl_filter(function(win)
    return api.nvim_win_get_buf(win) == buf
  end, api.nvim_list_wins())
end

return M
