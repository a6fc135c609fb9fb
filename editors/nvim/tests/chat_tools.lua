-- The chat's tool steps and edit proposals, against the real server with a scripted model
-- (tests/editors/chat_server.py: the message is the model's script). Run by
-- tests/editors/test_nvim.py:
--   nvim --headless --clean -c "luafile editors/nvim/tests/chat_tools.lua"
local H = dofile(vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":h") .. "/harness.lua")

local api = vim.api

local SOURCE = { "def add(a, b):", "    return a + b", "", "print(add(1, c))" }
local FENCE = "```"

local function lines(buf)
  return api.nvim_buf_get_lines(buf, 0, -1, true)
end

--- Send `script` as the chat message (written into the input, as the user would).
local function send_script(chat, script)
  local s = chat.session()
  local row = require("tramontane.chat.view").input_row(s)
  api.nvim_buf_set_lines(s.buf, row + 1, -1, true, { vim.json.encode({ script = script }) })
  H.truthy(chat.send(), "the message was sent")
  return H.wait("the answer", function()
    return s.turn.state ~= "running" and s.turn
  end, 30000)
end

local function rows_of(buf, text)
  local rows = {}
  for i, l in ipairs(lines(buf)) do
    if l == text then
      table.insert(rows, i)
    end
  end
  return rows
end

H.run(function()
  vim.cmd.runtime("plugin/tramontane.lua")
  local tramontane = require("tramontane")
  local chat = tramontane.chat
  tramontane.setup({
    cmd = { H.python, H.root .. "/tests/editors/chat_server.py" },
    filetypes = { "python" },
    settings = { chat = { toolTimeoutMs = 60000 } },
  })

  H.step("the scripted server starts for a python buffer of a project")
  local project = vim.fn.tempname()
  vim.fn.mkdir(project .. "/.git", "p")
  vim.fn.mkdir(project .. "/src", "p")
  vim.cmd.edit(project .. "/src/demo.py")
  local source = api.nvim_get_current_buf()
  api.nvim_buf_set_lines(source, 0, -1, true, SOURCE)
  vim.cmd("silent write")
  local client = H.wait_ready(source, 30000)
  local deltas = {}
  local orig_delta = client.handlers["tramontane/chatDelta"]
  client.handlers["tramontane/chatDelta"] = function(err, params, ctx)
    table.insert(deltas, params)
    return orig_delta(err, params, ctx)
  end
  local lint = api.nvim_create_namespace("test_lint")
  vim.diagnostic.set(lint, source, {
    { lnum = 3, col = 14, message = "undefined name 'c'", severity = vim.diagnostic.severity.ERROR,
      source = "pyflakes" },
    { lnum = 0, col = 0, message = "missing\n  docstring",
      severity = vim.diagnostic.severity.WARN },
  })

  H.step("a client tool: the server asks for diagnostics, the step folds, the answer goes on")
  vim.cmd("TramontaneChat")
  local s = chat.session()
  local buf, win = s.buf, api.nvim_get_current_win()
  local script = {
    { calls = { { name = "diagnostics", arguments = { path = "src/demo.py" } } } },
    { text = { "The error ", "is on line 4." } },
  }
  local turn = send_script(chat, script)
  H.eq(turn.state, "done", "the turn")
  H.eq({ s.last_request.tools, s.last_request.clientTools }, { true, { {
    name = "diagnostics",
    description = "List the problems (errors, warnings) the editor reports for a workspace "
      .. "file, or for all open files when no path is given, with line numbers.",
    parameters = { type = "object", additionalProperties = false, properties = {
      path = { type = "string", description = "A file path relative to the workspace folder." } } },
  } } }, "tools offered: the server's, and the plugin's diagnostics")
  local problems = "src/demo.py:4:15: error: undefined name 'c' [pyflakes]\n"
    .. "src/demo.py:1:1: warning: missing docstring"
  H.eq(deltas, {
    { chatId = s.chat_id, kind = "toolCall",
      toolCall = { id = "call1", name = "diagnostics", arguments = '{"path": "src/demo.py"}' } },
    { chatId = s.chat_id, kind = "toolResult",
      toolResult = { id = "call1", content = problems, isError = false } },
    { chatId = s.chat_id, kind = "text", text = "The error " },
    { chatId = s.chat_id, kind = "text", text = "is on line 4." },
  }, "the deltas: the call, the plugin's answer to runTool, the text")
  local want = { "## You", vim.json.encode({ script = script }), "", "## Tramontane", "",
    "### ⚙ diagnostics ✓", FENCE .. "json", '{"path": "src/demo.py"}', FENCE,
    FENCE .. "text" }
  vim.list_extend(want, vim.split(problems, "\n"))
  vim.list_extend(want, { FENCE, "", "The error is on line 4.", "", "## You", "" })
  H.eq(lines(buf), want, "the buffer")
  H.eq({ vim.fn.foldclosed(6), vim.fn.foldclosedend(6) }, { 6, 13 }, "the tool step is folded")
  H.eq({ vim.fn.foldclosed(5), vim.fn.foldclosed(15) }, { -1, -1 }, "the text is not")
  H.eq(vim.tbl_map(function(m)
    return m.role
  end, s.history), { "user", "assistant", "tool", "assistant" }, "the history: call and result")
  H.eq(s.history[3], { role = "tool", tool_call_id = "call1", name = "diagnostics",
    content = problems }, "the tool's result in the history")

  H.step("a call the server refuses (schema) shows as an error step")
  deltas = {}
  turn = send_script(chat, {
    { calls = { { name = "diagnostics", arguments = { path = 42 } } } },
    { text = { "Sorry." } },
  })
  H.eq(deltas[2].toolResult, { id = "call2", isError = true,
    content = "diagnostics: invalid arguments: path: 42 is not of type 'string'. "
      .. "Expected {path?: string}" },
    "the server's refusal")
  local heading = rows_of(buf, "### ⚙ diagnostics ✗")
  H.eq(#heading, 1, "an error step")
  H.eq(lines(buf)[heading[1] + 4], FENCE .. "text error", "its result block")
  H.eq({ vim.fn.foldclosed(heading[1]), vim.fn.foldclosedend(heading[1]) },
    { heading[1], heading[1] + 6 }, "folded too")

  H.step("an edit proposal asks first; rejected, nothing changes")
  local asked = {}
  local answer
  vim.ui.select = function(items, opts, on_choice)
    table.insert(asked, { items = items, prompt = opts.prompt, source = lines(source) })
    vim.defer_fn(function()
      on_choice(answer)
    end, 300)
  end
  local uri = vim.uri_from_bufnr(source)
  local function proposal(version)
    return { label = "propose_edit", edit = {
      documentChanges = { { textDocument = { uri = uri, version = version }, edits = { {
        range = { start = { line = 0, character = 4 }, ["end"] = { line = 0, character = 7 } },
        newText = "plus", annotationId = "tramontane.proposedEdit" } } } },
      changeAnnotations = { ["tramontane.proposedEdit"] = {
        label = "Proposed edit", needsConfirmation = true, description = "proposed in the chat" } },
    } }
  end
  local name = vim.fn.fnamemodify(project .. "/src/demo.py", ":~:.")
  answer = "Reject"
  turn = send_script(chat, {
    { applyEdit = proposal(vim.lsp.util.buf_versions[source]) },
  })
  H.eq(asked, { { items = { "Accept", "Reject" }, prompt = "Tramontane: apply the proposed edit to "
    .. name .. "?", source = SOURCE } }, "asked once, with the file unchanged while asking")
  H.eq(lines(source), SOURCE, "the source after a reject")
  H.eq(s.history[#s.history].content, 'applyEdit -> {"applied": false, '
    .. '"failureReason": "the user rejected the edit"}', "the server's answer")
  local diff = rows_of(buf, "#### ✎ propose_edit: " .. name)
  H.eq(#diff, 1, "the diff's heading in the chat")
  H.eq(vim.list_slice(lines(buf), diff[1] + 1, diff[1] + 3), { "```diff", "--- a/" .. name,
    "+++ b/" .. name }, "the diff")
  H.truthy(vim.tbl_contains(lines(buf), "-def add(a, b):")
    and vim.tbl_contains(lines(buf), "+def plus(a, b):"), "the diff's lines")
  H.eq(#rows_of(buf, "_edit rejected_"), 1, "the outcome under the diff")

  H.step("accepted, the buffer changes (not the file) and u undoes it")
  answer = "Accept"
  asked = {}
  send_script(chat, {
    { applyEdit = proposal(vim.lsp.util.buf_versions[source]) },
  })
  H.eq({ #asked, asked[1].source }, { 1, SOURCE }, "asked again, before anything changed")
  H.truthy(debug.getinfo(vim.lsp.handlers["workspace/applyEdit"], "S").source
    :find("runtime/lua/vim/lsp/handlers.lua", 1, true), "other servers keep Neovim's handler")
  local edited = vim.deepcopy(SOURCE)
  edited[1] = "def plus(a, b):"
  H.eq(lines(source), edited, "the source after accept")
  H.eq(vim.fn.readfile(project .. "/src/demo.py"), SOURCE, "the file on disk")
  H.eq(s.history[#s.history].content, 'applyEdit -> {"applied": true}', "the server's answer")
  H.eq(#rows_of(buf, "_edit accepted (u in the buffer undoes it)_"), 1, "the outcome")
  api.nvim_buf_call(source, function()
    vim.cmd("silent undo")
  end)
  H.eq(lines(source), SOURCE, "after u in the source")

  H.step("an edit of an older version of the document is refused without asking")
  asked = {}
  send_script(chat, {
    { applyEdit = proposal(vim.lsp.util.buf_versions[source] - 1) },
  })
  H.eq(asked, {}, "not asked")
  H.eq(s.history[#s.history].content, 'applyEdit -> {"applied": false, "failureReason": "'
    .. name .. ' changed since the edit was proposed"}', "the server's answer")
  H.eq(lines(source), SOURCE, "the source")

  H.step(":checkhealth tramontane has a chat section")
  vim.cmd("checkhealth tramontane")
  local report = table.concat(api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  H.out("CHECKHEALTH BEGIN\n" .. report .. "\nCHECKHEALTH END")
  H.truthy(report:find("server tools: all; editor tools: diagnostics", 1, true), "the tools")
  H.truthy(report:find("client " .. client.id .. ": edits proposed in the chat are confirmed", 1,
    true), "the edit handler")
end)
