-- The chat: a conversation in a Markdown buffer, one `tramontane/chat` request per message,
-- the answer streamed in from `tramontane/chatDelta`. The server decides everything (prompt,
-- tools, context); this side keeps the conversation's messages, draws, attaches, confirms.
--
-- The messages sent before a new one are what the server returned for each answered turn (the
-- user's message as the model read it, with its context, then what the turn added); a turn
-- stopped with <C-c> contributes the user's message and the partial answer, or nothing when no
-- text had come; a failed turn contributes nothing, and its message stays in the input.
local attach = require("tramontane.chat.attach")
local config = require("tramontane.config")
local tools = require("tramontane.chat.tools")
local view = require("tramontane.chat.view")

local api = vim.api

local M = {}

M.CHAT = "tramontane/chat"
M.CLOSE = "tramontane/chatClose"
M.DELTA = "tramontane/chatDelta"
local NAME = "tramontane"
local REQUEST_CANCELLED = -32800
-- After a cancel, the next request waits at most this long for the server's -32800, so that
-- late deltas of the cancelled turn cannot land in the new one.
local CANCEL_GRACE_MS = 5000

---@type tramontane.ChatSession|nil
local session

local counter = 0

local function notify(message, level)
  vim.notify("Tramontane: " .. message, level or vim.log.levels.INFO)
end

local function new_chat_id()
  counter = counter + 1
  return string.format("nvim-%d-%d-%d", vim.fn.getpid(), os.time(), counter)
end

--- The current chat session (nil before the first :TramontaneChat).
---@return tramontane.ChatSession|nil
function M.session()
  return session
end

local function close_chat(s)
  local client = s.client_id and vim.lsp.get_client_by_id(s.client_id)
  if client and not client:is_stopped() then
    client:notify(M.CLOSE, { chatId = s.chat_id })
  end
end

--- Stop the turn's request ($/cancelRequest); what came so far joins the history.
local function stop(s, turn)
  turn.state = "cancelled"
  local client = vim.lsp.get_client_by_id(turn.client_id)
  if client and turn.request_id then
    client:cancel_request(turn.request_id)
    s.cancelled = turn.request_id
  end
  local partial = table.concat(turn.text)
  if partial ~= "" then
    vim.list_extend(s.history, { turn.user, { role = "assistant", content = partial } })
  end
end

local function create_session()
  counter = counter + 1
  local buf = view.create("tramontane://chat/" .. counter)
  ---@type tramontane.ChatSession
  local s = { buf = buf, chat_id = new_chat_id(), history = {}, attachments = {}, next_id = 1,
              input = 0 }
  view.reset(s)
  api.nvim_create_autocmd("BufWipeout", { buffer = buf, callback = function()
    if session == s then
      if s.turn and s.turn.state == "running" then
        stop(s, s.turn)
      end
      close_chat(s)
      session = nil
    end
  end })
  local keymaps = config.options.chat.keymaps
  local actions = { send = M.send, cancel = M.cancel }
  for name, lhs in pairs(keymaps) do
    if lhs then
      vim.keymap.set("n", lhs, function()
        actions[name]()
      end, { buffer = buf, desc = "Tramontane chat: " .. name })
    end
  end
  return s
end

--- The server the chat talks to: the one it used so far, else the one of the buffer the chat
--- was opened from, else any Tramontane server.
---@return vim.lsp.Client|nil
function M.client()
  local s = session
  local client = s and s.client_id and vim.lsp.get_client_by_id(s.client_id)
  if not client or client:is_stopped() then
    local source = s and s.source_buf
    client = source and api.nvim_buf_is_valid(source)
        and vim.lsp.get_clients({ name = NAME, bufnr = source })[1]
      or vim.lsp.get_clients({ name = NAME })[1]
  end
  if client then
    -- A client configured without the plugin's handlers still streams and confirms edits.
    for method, handler in pairs(require("tramontane").handlers()) do
      client.handlers[method] = client.handlers[method] or handler
    end
  end
  return client
end

--- The largest image the server takes (its chat.maxImageMiB setting, as configured).
---@return number
function M.max_image_mib()
  local client = M.client()
  local from_client = client and vim.tbl_get(client.config, "init_options", "chat", "maxImageMiB")
  return tonumber(from_client) or tonumber(vim.tbl_get(config.options.settings, "chat",
    "maxImageMiB")) or 20
end

--- Open the chat buffer (creating the conversation if there is none) and focus it.
---@param opts? { source_buf?: integer }
---@return tramontane.ChatSession
function M.open(opts)
  opts = opts or {}
  if not session or not api.nvim_buf_is_valid(session.buf) then
    session = create_session()
  end
  local source = opts.source_buf
  if source and source ~= session.buf then
    session.source_buf = source
  end
  view.show(session.buf, config.options.chat.window)
  return session
end

--- Start over: a new conversation in the same buffer (the old one's cache is freed).
function M.new()
  if not session or not api.nvim_buf_is_valid(session.buf) then
    return M.open()
  end
  if session.turn and session.turn.state == "running" then
    stop(session, session.turn)
  end
  close_chat(session)
  session.chat_id = new_chat_id()
  session.history = {}
  session.attachments = {}
  session.turn = nil
  session.last_request, session.last_result = nil, nil
  view.reset(session)
  return session
end

local function add(kind_attachment, replace)
  local s = session or M.open()
  local ref = kind_attachment.kind .. "/" .. s.next_id
  s.next_id = s.next_id + 1
  s.attachments[ref] = kind_attachment
  view.add_attachment(s, ref, kind_attachment, replace)
  return ref
end

--- Attach lines `line1`..`line2` of `buf` (the visual selection when they are its lines) to the
--- next message: the server adds the text to it (the request's `context`).
---@param buf integer
---@param line1 integer
---@param line2 integer
---@return string|nil ref
function M.attach_selection(buf, line1, line2)
  local attachment, err = attach.selection(buf, line1, line2)
  if not attachment then
    notify(err, vim.log.levels.WARN)
    return nil
  end
  return add(attachment, true)
end

--- Attach an image file, or the clipboard's image when `path` is nil or "".
---@param path? string
---@return string|nil ref
function M.attach_image(path)
  local max = M.max_image_mib()
  local attachment, err
  if path and path ~= "" then
    attachment, err = attach.image_file(path, max)
  else
    attachment, err = attach.clipboard_image(max)
  end
  if not attachment then
    notify(err, vim.log.levels.WARN)
    return nil
  end
  return add(attachment)
end

local function note_for(reason)
  if reason == "length" then
    return "stopped at the token limit (chat.maxTokens)"
  elseif reason == "toolLimit" then
    return "stopped after the most tool steps allowed (chat.maxToolSteps)"
  elseif reason == "cancelled" then
    return "stopped"
  end
  return nil
end

local function usage_text(usage)
  if type(usage) ~= "table" or type(usage.generatedTokens) ~= "number" then
    return nil
  end
  return string.format("%d tokens (%d of %d prompt tokens reused)", usage.generatedTokens,
    usage.reusedTokens or 0, usage.promptTokens or 0)
end

local function on_result(s, turn, err, result)
  if session ~= s or s.turn ~= turn or turn.state ~= "running" then
    return -- cancelled, or the conversation was started over
  end
  if not err and (type(result) ~= "table" or type(result.message) ~= "table") then
    err = { message = "the server's answer has no message: " .. vim.inspect(result) }
  end
  if err then
    if err.code == REQUEST_CANCELLED then
      return
    end
    turn.state = "failed"
    view.discard(s, turn)
    notify(err.message or tostring(err), vim.log.levels.ERROR)
    return
  end
  turn.state = "done"
  s.last_result = result
  table.insert(s.history, result.userMessage or turn.user)
  vim.list_extend(s.history, result.messages or { result.message })
  view.finish(s, turn, note_for(result.finishReason))
  local usage = usage_text(result.usage)
  if usage then
    api.nvim_buf_set_extmark(s.buf, view.note_ns, api.nvim_buf_get_extmark_by_id(s.buf, view.ns,
      turn.heading, {})[1], 0, { virt_text = { { usage, "Comment" } } })
  end
end

--- The user's message: the input's text, and its images as parts.
local function user_message(text, images)
  if #images == 0 then
    return { role = "user", content = text }
  end
  local parts = {}
  if text ~= "" then
    table.insert(parts, { type = "text", text = text })
  end
  for _, image in ipairs(images) do
    table.insert(parts, { type = "image_url", image_url = { url = image.url } })
  end
  return { role = "user", content = parts }
end

--- Wait (without blocking) until `client` has no request `id` in flight, then call `fn`.
local function after(client, id, fn)
  local deadline = vim.uv.now() + CANCEL_GRACE_MS
  local function check()
    if not id or not client.requests[id] or vim.uv.now() > deadline then
      fn()
    else
      vim.defer_fn(check, 20)
    end
  end
  check()
end

--- Send what the user wrote below the last separator, with its attachments.
---@return boolean sent
function M.send()
  local s = session
  if not s or not api.nvim_buf_is_valid(s.buf) then
    notify("open a chat first: :TramontaneChat", vim.log.levels.WARN)
    return false
  end
  if s.turn and s.turn.state == "running" then
    local running = vim.lsp.get_client_by_id(s.turn.client_id)
    if running and not running:is_stopped() then
      notify("an answer is still coming: <C-c> in the chat stops it", vim.log.levels.WARN)
      return false
    end
    s.turn.state = "failed"
    view.finish(s, s.turn, "no answer: the server stopped")
  end
  local text, refs = view.input(s)
  local images, selection = {}, nil
  for _, ref in ipairs(refs) do
    local attachment = s.attachments[ref]
    if attachment.kind == "image" then
      table.insert(images, attachment)
    else
      selection = attachment
    end
  end
  if text == "" and #images == 0 then
    notify("write your message below the last \"" .. view.YOU .. "\"", vim.log.levels.WARN)
    return false
  end
  local client = M.client()
  if not client then
    notify("no server is running: open a file the server starts for (see :checkhealth "
      .. "tramontane)", vim.log.levels.WARN)
    return false
  end
  local context
  if selection then
    local err
    context, err = attach.context(selection, client)
    if not context then
      notify(err, vim.log.levels.WARN)
      return false
    end
  end
  local options = config.options.chat
  local user = user_message(text, images)
  local messages = vim.list_extend(vim.deepcopy(s.history), { user })
  local params = { chatId = s.chat_id, messages = messages, tools = options.tools,
                   context = context }
  if #options.client_tools > 0 then
    params.clientTools = tools.specs(options.client_tools)
  end
  s.client_id = client.id
  ---@type tramontane.ChatTurn
  local turn = { client_id = client.id, state = "running", user = user, text = {}, steps = {},
                 after_step = false, heading = 0, tail = 0 }
  local previous = s.cancelled
  s.turn = turn
  s.last_request = params
  view.begin_answer(s, turn)
  view.status(s, turn, "answering… (" .. (options.keymaps.cancel or "cancel()") .. " stops)")
  after(client, previous, function()
    if s.turn ~= turn or turn.state ~= "running" then
      return
    end
    local ok, id = client:request(M.CHAT, params, function(err, result)
      on_result(s, turn, err, result)
    end, selection and selection.buf or nil)
    if not ok then
      on_result(s, turn, { message = "the server is not running" }, nil)
      return
    end
    turn.request_id = id
  end)
  return true
end

--- Stop the answer that is coming ($/cancelRequest). Returns false when none is.
---@return boolean
function M.cancel()
  local s = session
  local turn = s and s.turn
  if not turn or turn.state ~= "running" then
    return false
  end
  stop(s, turn)
  view.finish(s, turn, note_for("cancelled"))
  return true
end

--- `tramontane/chatDelta`: a piece of the running answer.
---@param params { chatId: string, kind: string, text?: string, toolCall?: table,
---  toolResult?: table }
---@param ctx lsp.HandlerContext
function M.on_delta(_, params, ctx)
  local s = session
  local turn = s and s.turn
  if not turn or turn.state ~= "running" or type(params) ~= "table"
      or params.chatId ~= s.chat_id or ctx.client_id ~= turn.client_id then
    return -- a late delta of a stopped answer, or another conversation's
  end
  if params.kind == "text" and type(params.text) == "string" then
    table.insert(turn.text, params.text)
    view.text(s, turn, params.text)
  elseif params.kind == "toolCall" and type(params.toolCall) == "table" then
    view.tool_call(s, turn, params.toolCall)
  elseif params.kind == "toolResult" and type(params.toolResult) == "table" then
    view.tool_result(s, turn, params.toolResult)
  end
end

--- Draw a proposed edit's diff in the running answer (applyEdit comes during a turn).
---@param client_id integer
---@param label string|nil
---@param what string the files
---@param diff string[]
---@return { turn: tramontane.ChatTurn }|nil
function M.show_edit(client_id, label, what, diff)
  local s = session
  local turn = s and s.turn
  if not turn or turn.state ~= "running" or turn.client_id ~= client_id then
    return nil
  end
  local lines = { "#### ✎ " .. (label or "proposed edit") .. ": " .. what, "```diff" }
  vim.list_extend(lines, diff)
  table.insert(lines, "```")
  view.block(s, turn, lines)
  return { turn = turn }
end

--- Say under the diff what became of the edit.
---@param shown { turn: tramontane.ChatTurn }|nil
---@param outcome string
function M.edit_outcome(shown, outcome)
  local s = session
  if not shown or not s or s.turn ~= shown.turn or shown.turn.state ~= "running" then
    return
  end
  view.block(s, shown.turn, { "_edit " .. outcome .. "_" })
end

--- :[range]TramontaneChat [new]
---@param opts { args: string, range: integer, line1: integer, line2: integer }
function M.command(opts)
  local arg = vim.trim(opts.args or "")
  if arg ~= "" and arg ~= "new" then
    notify("unknown argument " .. vim.inspect(arg) .. " (:TramontaneChat [new])",
      vim.log.levels.ERROR)
    return
  end
  local source = api.nvim_get_current_buf()
  local from_chat = session and source == session.buf
  if arg == "new" then
    M.new()
  end
  M.open({ source_buf = source })
  if opts.range > 0 and not from_chat then
    M.attach_selection(source, opts.line1, opts.line2)
  end
end

--- :TramontaneChatImage [path]
---@param opts { args: string }
function M.image_command(opts)
  local source = api.nvim_get_current_buf()
  M.open({ source_buf = source })
  M.attach_image(vim.trim(opts.args or ""))
end

return M
