-- Ghost text against the real server on a tiny random checkpoint (its text is noise, but real
-- tokens, and greedy: the same request gets the same answer). Run by tests/editors/test_nvim.py:
--   nvim --headless --clean -c "luafile editors/nvim/tests/ghost_text.lua"
local H = dofile(vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":h") .. "/harness.lua")

local api = vim.api
local METHOD = "textDocument/inlineCompletion"
-- The server waits this long before computing: requests stay in flight long enough for a
-- newer keystroke to supersede them.
local SERVER_DEBOUNCE_MS = 300

local TEXT = {
  'NAME = "🎉 世界"',
  "",
  "def greet(who):",
  "    ",
  "",
  "print(greet(NAME))",
}

--- How Neovim draws `text` in virtual text: control characters as <97>, ^A and so on.
local function drawn(text)
  local lines = vim.split(text, "\n", { plain = true })
  for i, l in ipairs(lines) do
    lines[i] = vim.fn.strtrans(l)
  end
  return table.concat(lines, "\n")
end

local function line(buf, row)
  return api.nvim_buf_get_lines(buf, row, row + 1, true)[1]
end

--- What the server answers here and now, asked directly (not through the plugin).
local function server_answer(client, buf)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 1 }
  local response = client:request_sync(METHOD, params, 20000, buf)
  H.truthy(response and not response.err, "direct inlineCompletion request failed: "
    .. vim.inspect(response))
  local items = response.result.items
  H.truthy(#items == 1 and items[1].insertText ~= "",
    "the server gave no completion here (the test needs one): " .. vim.inspect(response.result))
  return items[1].insertText
end

H.run(function()
  local tramontane = require("tramontane")
  local completion = require("tramontane.completion")
  tramontane.setup({
    cmd = { H.server, "--stdio" },
    model = H.model,
    filetypes = { "python" },
    completion = { maxTokens = 12, timeBudgetMs = 60000, debounceMs = SERVER_DEBOUNCE_MS },
    settings = { compile = false }, -- compiling the decode step takes tens of seconds
    ghost_text = { debounce_ms = 20 },
  })

  H.step("setup starts the server for a python buffer and it becomes ready")
  local dir = vim.fn.tempname()
  vim.fn.mkdir(dir, "p")
  vim.cmd.edit(dir .. "/demo.py")
  local buf = api.nvim_get_current_buf()
  api.nvim_buf_set_lines(buf, 0, -1, true, TEXT)
  local client = H.wait_ready(buf, 60000)
  H.eq(client.config.cmd, { H.server, "--stdio" }, "client command")
  H.eq(client.config.init_options.model, H.model, "initializationOptions.model")
  H.eq(client.offset_encoding, "utf-8", "negotiated position encoding")
  H.eq(tramontane.status(buf), "Tramontane ✓", "statusline string when ready")

  -- Record what the plugin sends: inlineCompletion request ids and params, and cancellations.
  local sent, cancelled = {}, {}
  local orig_request, orig_cancel = client.request, client.cancel_request
  client.request = function(self, method, params, handler, bufnr)
    local ok, id = orig_request(self, method, params, handler, bufnr)
    if method == METHOD then
      table.insert(sent, { id = id, params = vim.deepcopy(params) })
    end
    return ok, id
  end
  client.cancel_request = function(self, id)
    table.insert(cancelled, id)
    return orig_cancel(self, id)
  end

  H.step("ghost text appears after typing, with the text the server returns")
  api.nvim_win_set_cursor(0, { 1, 0 })
  H.type("A  # x") -- after the emoji and CJK: UTF-8 columns differ from characters
  local ghost0 = H.wait("ghost text on line 1", function()
    return H.ghost(buf, completion.ns)
  end, 20000)
  H.eq(line(buf, 0), 'NAME = "🎉 世界"  # x', "line 1 after typing (the ghost is not in it)")
  local last = sent[#sent]
  H.eq(last.params.position, { line = 0, character = #'NAME = "🎉 世界"  # x' },
    "position sent: UTF-8 byte column")
  local answer0 = server_answer(client, buf)
  H.eq(tramontane.suggestion(), answer0, "suggestion() = the server's completion")
  H.eq(ghost0, drawn(answer0), "ghost text drawn = the server's completion")
  local _, mark_row, mark_col = H.ghost(buf, completion.ns)
  H.eq({ mark_row, mark_col }, { 0, #line(buf, 0) }, "ghost text anchored at the cursor")

  H.step("typing what the ghost shows keeps the rest, without a new request")
  local first_char = vim.fn.strcharpart(answer0, 0, 1)
  local requests_before = #sent
  H.type_text(first_char)
  H.wait("the typed character in the buffer", function()
    return line(buf, 0) == 'NAME = "🎉 世界"  # x' .. first_char
  end)
  H.sleep(100)
  H.eq(tramontane.suggestion(), answer0:sub(#first_char + 1), "suggestion after typing into it")
  H.eq(H.ghost(buf, completion.ns), drawn(answer0:sub(#first_char + 1)), "ghost after typing")
  H.eq(#sent, requests_before, "requests sent while typing into the ghost")

  H.step("<Esc> hides the ghost text; the buffer never held it")
  H.type("<Esc>")
  H.wait("no ghost text in normal mode", function()
    return H.ghost(buf, completion.ns) == nil
  end)
  H.eq(api.nvim_buf_get_lines(buf, 0, -1, true)[1], 'NAME = "🎉 世界"  # x' .. first_char,
    "line 1 after <Esc>")

  H.step("accept() (the <Tab> key) inserts exactly the ghost text")
  api.nvim_win_set_cursor(0, { 4, 3 })
  H.type("A")
  H.wait("ghost text on the function body line", function()
    return H.ghost(buf, completion.ns)
  end, 20000)
  local ghost1 = server_answer(client, buf)
  H.eq(tramontane.suggestion(), ghost1, "suggestion() = the server's completion")
  H.eq(H.ghost(buf, completion.ns), drawn(ghost1), "ghost text drawn = the server's completion")
  local before = api.nvim_buf_get_lines(buf, 0, -1, true)
  H.type("<Tab>")
  local want = vim.deepcopy(before)
  local inserted = vim.split(ghost1, "\n", { plain = true })
  inserted[1] = before[4] .. inserted[1]
  for i = #inserted, 1, -1 do
    if i == 1 then
      want[4] = inserted[1]
    else
      table.insert(want, 5, inserted[i])
    end
  end
  H.wait("the accepted text in the buffer", function()
    return vim.deep_equal(api.nvim_buf_get_lines(buf, 0, -1, true), want)
  end, 5000)
  local end_row = 4 + #inserted - 1
  H.eq(api.nvim_win_get_cursor(0), { end_row, #want[end_row] }, "cursor after accept")
  H.truthy(H.ghost(buf, completion.ns) ~= drawn(ghost1), "the accepted ghost text is gone")

  H.step("a newer keystroke cancels the request in flight")
  -- Accepting changed the text: a request for the new text is now in flight on the server.
  local first = H.wait("a request in flight", function()
    local pending = completion._buffers[buf].pending
    return pending and pending.id
  end, 5000)
  H.type("z")
  local second = H.wait("a newer request", function()
    local pending = completion._buffers[buf].pending
    return pending and pending.id ~= first and pending.id
  end, 5000)
  H.truthy(vim.tbl_contains(cancelled, first), string.format(
    "$/cancelRequest for request %d (cancelled: %s)", first, vim.inspect(cancelled)))
  H.truthy(not vim.tbl_contains(cancelled, second), "the newer request is not cancelled")
  H.wait("ghost text for the newer request", function()
    return H.ghost(buf, completion.ns)
  end, 20000)
  local ghost2 = server_answer(client, buf)
  H.eq(tramontane.suggestion(), ghost2, "suggestion() = the server's answer to the newer text")
  H.eq(completion._buffers[buf].pending, nil, "nothing in flight once the answer is shown")

  H.step("a stale ghost text disappears when the user types something else")
  local other = ghost2:sub(1, 1) == "#" and "@" or "#"
  local typed_line = line(buf, api.nvim_win_get_cursor(0)[1] - 1)
  H.type_text(other)
  H.wait("the typed character in the buffer", function()
    return line(buf, api.nvim_win_get_cursor(0)[1] - 1) == typed_line .. other
  end)
  H.eq(H.ghost(buf, completion.ns), nil, "ghost text right after a non-matching keystroke")
  H.eq(tramontane.suggestion(), nil, "suggestion() after a non-matching keystroke")
  H.type("<Esc>")
  H.wait("normal mode", function()
    return api.nvim_get_mode().mode == "n"
  end)

  H.step("multi-line ghost text: virtual lines; accept_line and accept_word take parts")
  api.nvim_buf_set_lines(buf, 0, -1, true, { "x = [", "" })
  api.nvim_win_set_cursor(0, { 2, 0 })
  H.type("i")
  H.wait("insert mode", function()
    return api.nvim_get_mode().mode == "i"
  end)
  H.sleep(50)
  completion.dismiss(buf) -- the InsertEnter request: this step shows its own text
  completion.show(buf, "    one, two\n    three,\n]")
  local text, _, _, details = H.ghost(buf, completion.ns)
  H.eq(text, "    one, two\n    three,\n]", "rebuilt multi-line ghost text")
  H.eq(#details.virt_lines, 2, "virtual lines below the cursor line")
  H.eq(api.nvim_buf_get_lines(buf, 0, -1, true), { "x = [", "" }, "buffer while shown")
  H.type("<Cmd>lua require('tramontane').accept_word()<CR>")
  H.wait("one word accepted", function()
    return line(buf, 1) == "    one"
  end)
  H.eq(H.ghost(buf, completion.ns), ", two\n    three,\n]", "ghost after accept_word")
  H.type("<Cmd>lua require('tramontane').accept_line()<CR>")
  H.wait("the line accepted", function()
    return line(buf, 1) == "    one, two"
  end)
  H.eq(H.ghost(buf, completion.ns), "\n    three,\n]", "ghost after accept_line")
  H.type("<Cmd>lua require('tramontane').accept()<CR>")
  H.wait("the rest accepted", function()
    return vim.deep_equal(api.nvim_buf_get_lines(buf, 0, -1, true),
      { "x = [", "    one, two", "    three,", "]" })
  end)
  H.eq(api.nvim_win_get_cursor(0), { 4, 1 }, "cursor after the last accept")
  H.type("<Esc>")
  H.wait("normal mode and the server idle", function()
    local s = require("tramontane.status").latest[client.id]
    return api.nvim_get_mode().mode == "n" and s and s.state == "ready"
  end, 10000)

  H.step(":checkhealth tramontane")
  vim.cmd("checkhealth tramontane")
  local report = table.concat(api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  H.out("CHECKHEALTH BEGIN\n" .. report .. "\nCHECKHEALTH END")
  H.truthy(report:find(H.server, 1, true), "checkhealth names the server command")
  H.truthy(report:find(H.model, 1, true), "checkhealth names the model")
  H.truthy(report:find("status: ready", 1, true), "checkhealth shows the status")
end)
