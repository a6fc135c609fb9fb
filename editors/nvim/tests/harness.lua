-- A tiny test harness for headless Neovim: the test body runs in a coroutine so that Neovim's
-- main loop keeps running between steps (keys typed with nvim_input go through insert mode,
-- autocommands, LSP messages and timers, exactly as for a user). Every wait is bounded.
--
-- Environment: TRAMONTANE_PLUGIN (editors/nvim), TRAMONTANE_SERVER (the lsp_server program),
-- TRAMONTANE_MODEL (a checkpoint folder), TRAMONTANE_TIMEOUT_MS (whole-run limit),
-- TRAMONTANE_PYTHON (the Python of the server, for scripted servers under tests/editors/).
local H = {}

H.plugin = assert(os.getenv("TRAMONTANE_PLUGIN"), "TRAMONTANE_PLUGIN is not set")
H.server = assert(os.getenv("TRAMONTANE_SERVER"), "TRAMONTANE_SERVER is not set")
H.model = assert(os.getenv("TRAMONTANE_MODEL"), "TRAMONTANE_MODEL is not set")
H.python = os.getenv("TRAMONTANE_PYTHON")
H.root = vim.fn.fnamemodify(H.plugin, ":p:h:h:h") -- the repository
local TOTAL_MS = tonumber(os.getenv("TRAMONTANE_TIMEOUT_MS") or "") or 90000

vim.opt.rtp:prepend(H.plugin)

local function out(line)
  io.stdout:write(line, "\n")
  io.stdout:flush()
end
H.out = out

local finished = false
local started = vim.uv.now()

local function finish(ok, message)
  if finished then
    return
  end
  finished = true
  if ok then
    out(string.format("ALL PASSED [%.1f s]", (vim.uv.now() - started) / 1000))
    vim.cmd("qall!")
  else
    out("FAIL: " .. tostring(message))
    vim.cmd("cquit 1")
  end
end

local co

local function resume(...)
  local ok, err = coroutine.resume(co, ...)
  if not ok then
    finish(false, debug.traceback(co, err))
  elseif coroutine.status(co) == "dead" then
    finish(true)
  end
end

--- Run `body` as the test; exit 0 when it returns, 1 (with the message) when it errors.
function H.run(body)
  co = coroutine.create(body)
  vim.defer_fn(function()
    finish(false, string.format("the whole test took more than %d ms", TOTAL_MS))
  end, TOTAL_MS)
  vim.schedule(resume)
end

function H.sleep(ms)
  vim.defer_fn(resume, ms)
  coroutine.yield()
end

--- Wait until `cond()` is truthy (polling every 10 ms); fail naming `what` after `timeout_ms`.
function H.wait(what, cond, timeout_ms)
  local deadline = vim.uv.now() + (timeout_ms or 10000)
  while true do
    local value = cond()
    if value then
      return value
    end
    if vim.uv.now() > deadline then
      error(string.format("timed out after %d ms waiting for: %s", timeout_ms or 10000, what), 2)
    end
    H.sleep(10)
  end
end

function H.eq(got, want, what)
  if not vim.deep_equal(got, want) then
    error(string.format("%s:\n  got:  %s\n  want: %s", what, vim.inspect(got),
      vim.inspect(want)), 2)
  end
end

function H.truthy(value, what)
  if not value then
    error(what, 2)
  end
  return value
end

--- Start a named test step (printed, so a failure shows how far the run went).
function H.step(name)
  out(string.format("STEP [%5.1f s] %s", (vim.uv.now() - started) / 1000, name))
end

--- Type keys as the user would (nvim_input notation: "<lt>" for "<").
function H.type(keys)
  vim.api.nvim_input(keys)
end

--- Type literal text.
function H.type_text(text)
  vim.api.nvim_input((text:gsub("<", "<lt>")))
end

--- The ghost text drawn by `ns` in `buf`, rebuilt from the extmarks: first line from virt_text,
--- further lines from virt_lines. nil when there is no extmark.
function H.ghost(buf, ns)
  local marks = vim.api.nvim_buf_get_extmarks(buf, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  assert(#marks == 1, "expected one ghost-text extmark, found " .. #marks)
  local details = marks[1][4]
  local first = {}
  for _, chunk in ipairs(details.virt_text or {}) do
    table.insert(first, chunk[1])
  end
  local lines = { table.concat(first) }
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local parts = {}
    for _, chunk in ipairs(virt_line) do
      table.insert(parts, chunk[1])
    end
    table.insert(lines, table.concat(parts))
  end
  return table.concat(lines, "\n"), marks[1][2], marks[1][3], details
end

--- Wait for the tramontane client of `buf` to report `ready`.
function H.wait_ready(buf, timeout_ms)
  local client = H.wait("a tramontane client attached", function()
    return vim.lsp.get_clients({ bufnr = buf, name = "tramontane" })[1]
  end, timeout_ms)
  local status = require("tramontane.status")
  H.wait("server status ready", function()
    local s = status.latest[client.id]
    if s and s.state == "error" then
      error("server status error: " .. status.format(s))
    end
    return s and s.state == "ready"
  end, timeout_ms)
  return client
end

return H
