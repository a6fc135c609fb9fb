-- The server's `tramontane/status` notifications: kept per client, logged, shown on demand.
local M = {}

M.METHOD = "tramontane/status"

local HISTORY = 20

---@type table<integer, tramontane.Status>
M.latest = {}
---@type tramontane.Status[]
M.history = {}

local function format(status)
  local text = status.state .. ": " .. (status.message or "")
  if status.reason then
    text = text .. " (" .. status.reason .. ")"
  end
  return text
end
M.format = format

--- The `tramontane/status` handler (vim.lsp handler signature).
---@param result tramontane.Status
---@param ctx lsp.HandlerContext
function M.handler(_, result, ctx)
  if type(result) ~= "table" or type(result.state) ~= "string" then
    return
  end
  local status = {
    state = result.state,
    message = result.message,
    reason = result.reason,
    client_id = ctx.client_id,
    time = os.time(),
  }
  M.latest[ctx.client_id] = status
  table.insert(M.history, status)
  if #M.history > HISTORY then
    table.remove(M.history, 1)
  end
  local log = status.state == "error" and vim.lsp.log.error or vim.lsp.log.info
  log("tramontane status", format(status))
  vim.schedule(function()
    if status.state == "error" then
      -- Once per distinct message: "no model configured" would otherwise repeat per keystroke.
      vim.notify_once("Tramontane: " .. (status.message or "error"), vim.log.levels.WARN)
    end
    vim.api.nvim_exec_autocmds("User", {
      pattern = "TramontaneStatus",
      modeline = false,
      data = status,
    })
  end)
end

--- The latest status of the server attached to `bufnr` (default: current buffer).
---@param bufnr? integer
---@return tramontane.Status|nil
function M.get(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  for _, client in ipairs(vim.lsp.get_clients({ bufnr = bufnr, name = "tramontane" })) do
    if M.latest[client.id] then
      return M.latest[client.id]
    end
  end
  return nil
end

--- A short string for statuslines: "" when no server is attached.
---@param bufnr? integer
---@return string
function M.line(bufnr)
  local status = M.get(bufnr)
  if not status then
    return ""
  end
  local icon = ({ loading = "…", ready = "✓", busy = "⋯", error = "✗" })[status.state] or "?"
  local text = "Tramontane " .. icon
  if status.reason then
    text = text .. " " .. status.reason
  end
  return text
end

return M
