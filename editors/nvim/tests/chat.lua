-- The chat against the real server on a tiny random checkpoint (its answers are noise, but real
-- tokens, greedy: the same conversation gets the same answer). Run by tests/editors/test_nvim.py:
--   nvim --headless --clean -c "luafile editors/nvim/tests/chat.lua"
local H = dofile(vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":h") .. "/harness.lua")

local api = vim.api

local PNG_1X1 = vim.base64.decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkY"
  .. "PhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")

local SOURCE = {
  "def add(a, b):",
  '    """Add two numbers: ½ + ¼ = ¾."""',
  "    return a + b",
  "",
  "print(add(1, 2))",
}

local function lines(buf)
  return api.nvim_buf_get_lines(buf, 0, -1, true)
end

local NOTES = { length = "_stopped at the token limit (chat.maxTokens)_", stop = false }

--- The lines a finished answer adds after the user's message.
local function answer_lines(result)
  local out = { "", "## Tramontane", "" }
  vim.list_extend(out, vim.split(result.message.content, "\n", { plain = true }))
  local note = NOTES[result.finishReason]
  H.truthy(note ~= nil, "finish reason " .. result.finishReason)
  if note then
    vim.list_extend(out, { "", note })
  end
  vim.list_extend(out, { "", "## You", "" })
  return out
end

local function wait_turn(chat, state, timeout)
  return H.wait("the chat turn " .. state, function()
    local s = chat.session()
    return s.turn and s.turn.state == state and s.turn
  end, timeout or 30000)
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

H.run(function()
  vim.cmd.runtime("plugin/tramontane.lua") -- the commands (--clean sourced plugins before rtp)
  local tramontane = require("tramontane")
  local chat = tramontane.chat
  tramontane.setup({
    cmd = { H.server, "--stdio" },
    model = H.model,
    filetypes = { "python" },
    settings = { compile = false, chat = { maxTokens = 24, temperature = 0, maxImageMiB = 1 } },
    -- No tools: mistral-common (v3) puts the tool schemas before the last user message, so a
    -- follow-up with tools would share only its first token with the chat's cache.
    chat = { tools = false, client_tools = {} },
  })

  H.step("a python buffer starts the server")
  local dir = vim.fn.tempname()
  vim.fn.mkdir(dir, "p")
  vim.cmd.edit(dir .. "/demo.py")
  local source = api.nvim_get_current_buf()
  local source_win = api.nvim_get_current_win()
  api.nvim_buf_set_lines(source, 0, -1, true, SOURCE)
  local client = H.wait_ready(source, 60000)

  -- Record the deltas the plugin receives and what the buffer shows right after each one.
  local deltas = {}
  local orig_delta = client.handlers["tramontane/chatDelta"]
  client.handlers["tramontane/chatDelta"] = function(err, params, ctx)
    orig_delta(err, params, ctx)
    local s = chat.session()
    table.insert(deltas, { params = params, shown = s and lines(s.buf) })
  end
  local cancelled, notified = {}, {}
  local orig_cancel, orig_notify = client.cancel_request, client.notify
  client.cancel_request = function(self, id)
    table.insert(cancelled, id)
    return orig_cancel(self, id)
  end
  client.notify = function(self, method, params)
    table.insert(notified, { method = method, params = params })
    return orig_notify(self, method, params)
  end
  local messages = {}
  vim.notify = function(msg, level)
    table.insert(messages, { msg = msg, level = level })
  end

  H.step(":TramontaneChat opens a Markdown chat buffer in a split")
  vim.cmd("TramontaneChat")
  local s = chat.session()
  local buf = s.buf
  local win = api.nvim_get_current_win()
  H.eq(api.nvim_win_get_buf(win), buf, "the chat window is current")
  H.eq(#api.nvim_tabpage_list_wins(0), 2, "windows after :TramontaneChat")
  H.eq(vim.bo[buf].filetype, "markdown", "filetype")
  H.eq(vim.bo[buf].buftype, "nofile", "buftype")
  H.eq(lines(buf), { "## You", "" }, "a new chat")
  H.eq(vim.wo[win].foldmethod, "expr", "foldmethod")
  local maps = {}
  for _, map in ipairs(api.nvim_buf_get_keymap(buf, "n")) do
    maps[map.lhs] = map.desc
  end
  H.eq({ maps["<CR>"], maps["<C-C>"] }, { "Tramontane chat: send", "Tramontane chat: cancel" },
    "buffer-local normal-mode keys")

  H.step("<CR> sends the message; the answer streams into the buffer")
  H.type("Gi" .. "Explain this code.<Esc>")
  H.wait("the message typed", function()
    return api.nvim_get_mode().mode == "n" and lines(buf)[2] == "Explain this code."
  end)
  H.type("<CR>")
  local turn = wait_turn(chat, "done")
  local result = s.last_result
  local content = result.message.content
  H.truthy(#content > 0, "the tiny model answered something")
  local want = { "## You", "Explain this code." }
  vim.list_extend(want, answer_lines(result))
  H.eq(lines(buf), want, "the buffer: the message, then the server's final message")
  H.eq(s.last_request.messages, { { role = "user", content = "Explain this code." } },
    "messages sent")
  H.eq({ s.last_request.tools, s.last_request.clientTools }, { false, nil }, "no tools offered")
  H.eq(result.userMessage, { role = "user", content = "Explain this code." }, "userMessage")
  local texts = {}
  for i, d in ipairs(deltas) do
    H.eq(d.params.kind, "text", "delta " .. i .. " kind")
    table.insert(texts, d.params.text)
    local partial = { "## You", "Explain this code.", "", "## Tramontane", "" }
    vim.list_extend(partial, vim.split(table.concat(texts), "\n", { plain = true }))
    H.eq(d.shown, partial, "the buffer after delta " .. i)
  end
  H.truthy(#deltas >= 2, "the answer came in several deltas (" .. #deltas .. ")")
  H.eq(table.concat(texts), content, "the deltas joined = the final message")
  H.eq(api.nvim_win_get_cursor(win), { #want, 0 }, "the cursor followed to the new input line")
  H.truthy(turn.state == "done", "turn state")

  H.step("a follow-up sends the history back and reuses the chat's cache")
  local first = result
  H.type("iAnd now?<Esc>")
  H.wait("the follow-up typed", function()
    return lines(buf)[#lines(buf)] == "And now?" and api.nvim_get_mode().mode == "n"
  end)
  chat.send()
  wait_turn(chat, "done")
  local history = { first.userMessage }
  vim.list_extend(history, first.messages)
  table.insert(history, { role = "user", content = "And now?" })
  H.eq(s.last_request.messages, history, "messages of the second turn")
  H.truthy(s.last_result.usage.reusedTokens >= first.usage.promptTokens, string.format(
    "the second turn reused the first one's prompt (%s)", vim.inspect(s.last_result.usage)))

  H.step(":'<,'>TramontaneChat attaches the selected lines; the server adds them to the message")
  api.nvim_set_current_win(source_win)
  H.type("2GVj:TramontaneChat<CR>")
  H.wait("the selection attached", function()
    return api.nvim_get_current_buf() == buf and lines(buf)[#lines(buf) - 1]:find("selection")
  end)
  H.eq(vim.list_slice(lines(buf), #lines(buf) - 2), { "## You", "[selection: "
    .. vim.fn.fnamemodify(dir .. "/demo.py", ":~:.") .. ", lines 2-3](tramontane:context/1)", "" },
    "the input: the attachment's line below the separator, then the line to write on")
  H.type("GAWhat do these lines do?<Esc>")
  H.wait("the question typed", function()
    return lines(buf)[#lines(buf)] == "What do these lines do?" and api.nvim_get_mode().mode == "n"
  end)
  chat.send()
  wait_turn(chat, "done")
  local path = vim.uri_to_fname(vim.uri_from_bufnr(source))
  H.eq(s.last_request.context, { uri = vim.uri_from_bufnr(source), range = {
    start = { line = 1, character = 0 }, ["end"] = { line = 2, character = #SOURCE[3] } } },
    "the request's context")
  H.eq(s.last_request.messages[#s.last_request.messages].content, "What do these lines do?",
    "the user's text (the attachment line is not in it)")
  H.eq(s.last_result.userMessage.content, path .. ", lines 2-3:\n```python\n" .. SOURCE[2] .. "\n"
    .. SOURCE[3] .. "\n```\n\nWhat do these lines do?", "the message as the model read it")

  H.step("a characterwise selection is sent in the client's encoding; a new one replaces it")
  api.nvim_set_current_win(source_win)
  H.type("<Esc>1Gvll:TramontaneChat<CR>")
  H.wait("a first selection attached", function()
    return api.nvim_get_current_buf() == buf and lines(buf)[#lines(buf) - 1]:find("line 1]")
  end)
  api.nvim_set_current_win(source_win)
  local half = SOURCE[2]:find("½", 1, true)
  api.nvim_win_set_cursor(source_win, { 2, half - 1 })
  H.type("v4l:TramontaneChat<CR>")
  H.wait("the second selection attached", function()
    return api.nvim_get_current_buf() == buf and lines(buf)[#lines(buf) - 1]:find("line 2]")
  end)
  local input = vim.list_slice(lines(buf), #lines(buf) - 2)
  H.eq(input, { "## You", "[selection: " .. vim.fn.fnamemodify(path, ":~:.")
    .. ", line 2](tramontane:context/3)", "" }, "one selection in the input: the newer")
  H.type("GAAnd this?<Esc>")
  H.wait("the question typed", function()
    return lines(buf)[#lines(buf)] == "And this?" and api.nvim_get_mode().mode == "n"
  end)
  chat.send()
  wait_turn(chat, "done")
  H.eq(s.last_request.context.range, { start = { line = 1, character = half - 1 },
    ["end"] = { line = 1, character = half - 1 + #"½ + ¼" } }, "UTF-8 columns of ½ + ¼")
  H.eq(s.last_result.userMessage.content, path .. ", lines 2-2:\n```python\n½ + ¼\n```\n\n"
    .. "And this?", "the characters selected reach the server")

  H.step("an image for a model without vision: the error is shown, the message stays")
  write_file(dir .. "/pixel.png", PNG_1X1)
  vim.cmd("TramontaneChatImage " .. vim.fn.fnameescape(dir .. "/pixel.png"))
  H.eq(lines(buf)[#lines(buf) - 1], "![image: pixel.png, PNG, 1 KiB](tramontane:image/4)",
    "the image's line in the input")
  H.type("GAWhat is in this picture?<Esc>")
  H.wait("the question typed", function()
    return lines(buf)[#lines(buf)] == "What is in this picture?" and api.nvim_get_mode().mode == "n"
  end)
  local before = lines(buf)
  messages = {}
  H.type("<CR>")
  wait_turn(chat, "failed")
  H.eq(s.last_request.messages[#s.last_request.messages], { role = "user", content = {
    { type = "text", text = "What is in this picture?" },
    { type = "image_url",
      image_url = { url = "data:image/png;base64," .. vim.base64.encode(PNG_1X1) } },
  } }, "the message: its text and the image as a data: URI")
  H.eq(messages, { { msg = "Tramontane: this model has no vision encoder: it cannot read images "
    .. "(remove the image, or use a vision model such as Pixtral)",
    level = vim.log.levels.ERROR } },
    "the server's error, shown")
  H.eq(lines(buf), before, "the buffer after the error: the message and its image kept")
  local history_length = #s.history

  H.step("delete the image's line and send again: the text goes alone")
  api.nvim_win_set_cursor(win, { #before - 1, 0 })
  H.type("dd<CR>")
  wait_turn(chat, "done")
  H.eq(s.last_request.messages[#s.last_request.messages],
    { role = "user", content = "What is in this picture?" }, "the message without the image")
  H.eq(#s.history, history_length + 2, "the failed turn added nothing to the history")

  H.step("images: the size bound (chat.maxImageMiB), the format, the clipboard")
  local count = #lines(buf)
  messages = {}
  write_file(dir .. "/big.png", PNG_1X1 .. string.rep("\0", 1536 * 1024))
  vim.cmd("TramontaneChatImage " .. dir .. "/big.png")
  write_file(dir .. "/notes.txt", "not an image")
  vim.cmd("TramontaneChatImage " .. dir .. "/notes.txt")
  vim.cmd("TramontaneChatImage " .. dir .. "/missing.png")
  H.eq(messages, {
    { msg = "Tramontane: big.png is 1.5 MiB: larger than chat.maxImageMiB (1 MiB)",
      level = vim.log.levels.WARN },
    { msg = "Tramontane: notes.txt is not a PNG, JPEG, GIF or WEBP image",
      level = vim.log.levels.WARN },
    { msg = "Tramontane: no image file at " .. dir .. "/missing.png", level = vim.log.levels.WARN },
  }, "the messages")
  H.eq(#lines(buf), count, "nothing attached")
  -- A clipboard: a wl-paste that offers a PNG.
  local bin = dir .. "/bin"
  vim.fn.mkdir(bin, "p")
  write_file(bin .. "/wl-paste", table.concat({
    "#!/bin/sh",
    "if [ \"$1\" = --list-types ]; then printf 'text/plain\\nimage/png\\n'; exit 0; fi",
    "[ \"$*\" = \"--no-newline --type image/png\" ] && exec cat " .. dir .. "/pixel.png",
    "echo \"unexpected: $*\" >&2; exit 3",
  }, "\n"))
  vim.fn.setfperm(bin .. "/wl-paste", "rwxr-xr-x")
  local path_env = vim.env.PATH
  vim.env.PATH = bin .. ":" .. path_env
  vim.cmd("TramontaneChatImage")
  H.eq({ lines(buf)[#lines(buf) - 1], #messages }, {
    "![image: clipboard.png, PNG, 1 KiB](tramontane:image/5)", 3 },
    "the clipboard's image attached")
  H.eq(s.attachments["image/5"].url, "data:image/png;base64," .. vim.base64.encode(PNG_1X1),
    "its data")
  vim.env.PATH = dir .. "/nothing-here"
  vim.cmd("TramontaneChatImage")
  vim.env.PATH = path_env
  H.eq(messages[4], { msg = "Tramontane: no clipboard tool for images: install wl-clipboard "
    .. "(wl-paste, Wayland), xclip (X11) or pngpaste (macOS), or attach a file: "
    .. ":TramontaneChatImage path/to/image.png", level = vim.log.levels.WARN },
    "without a clipboard tool")

  H.step(":TramontaneChat new starts over and frees the old chat (chatClose)")
  local old_id = s.chat_id
  vim.cmd("TramontaneChat new")
  H.eq(lines(buf), { "## You", "" }, "the buffer of a new chat")
  H.eq({ #s.history, s.chat_id ~= old_id }, { 0, true }, "no history, a new chatId")
  local closes = vim.tbl_filter(function(n)
    return n.method == "tramontane/chatClose"
  end, notified)
  H.eq(closes, { { method = "tramontane/chatClose", params = { chatId = old_id } } }, "chatClose")

  H.step("<C-c> cancels the answer coming ($/cancelRequest); the server goes on")
  client:notify("workspace/didChangeConfiguration",
    { settings = { chat = { maxTokens = 4000, temperature = 0, maxImageMiB = 1 } } })
  H.type("GiTell me a long story.<Esc>")
  H.wait("the message typed", function()
    return lines(buf)[2] == "Tell me a long story." and api.nvim_get_mode().mode == "n"
  end)
  H.type("<CR>")
  local long = H.wait("a few deltas drawn", function()
    local t = s.turn
    return t and #t.text >= 3 and t
  end, 30000)
  -- nvim_input("<C-c>") from a timer is an interrupt (Neovim lets a mapped CTRL-C through only
  -- while it waits for typed keys); feed it as typed instead.
  api.nvim_feedkeys(vim.keycode("<C-c>"), "mt", false)
  H.wait("the turn cancelled", function()
    return long.state == "cancelled"
  end)
  H.eq(cancelled, { long.request_id }, "$/cancelRequest sent for the chat request")
  local partial = table.concat(long.text)
  local shown = lines(buf)
  local want_stopped = { "## You", "Tell me a long story.", "", "## Tramontane", "" }
  vim.list_extend(want_stopped, vim.split(partial, "\n", { plain = true }))
  vim.list_extend(want_stopped, { "", "_stopped_", "", "## You", "" })
  H.eq(shown, want_stopped, "the buffer: the partial answer, then a new input")
  H.wait("the server's answer to the cancel", function()
    return client.requests[long.request_id] == nil
  end)
  H.sleep(200)
  H.eq(lines(buf), shown, "no delta drawn after the cancel")
  H.eq(s.history, { { role = "user", content = "Tell me a long story." },
    { role = "assistant", content = partial } }, "the stopped turn in the history")
  client:notify("workspace/didChangeConfiguration",
    { settings = { chat = { maxTokens = 8, temperature = 0, maxImageMiB = 1 } } })
  H.type("iShorter, please.<Esc>")
  H.wait("the message typed", function()
    return lines(buf)[#lines(buf)] == "Shorter, please." and api.nvim_get_mode().mode == "n"
  end)
  H.type("<CR>")
  wait_turn(chat, "done")
  H.eq(#s.last_request.messages, 3, "the next turn sends the stopped one along")
  H.truthy(s.last_result.usage.generatedTokens <= 8, "the server answered the next turn")
end)
