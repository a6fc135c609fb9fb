-- Tools the plugin runs for the model (`clientTools`): the server asks with `tramontane/runTool
-- {chatId, id, name, arguments}` and gets `{content, isError}` back. The server has checked
-- the arguments against the tool's schema already; what cannot be answered is an error result
-- the model reads, never an RPC error.
local api = vim.api

local M = {}

M.METHOD = "tramontane/runTool"
M.MAX_PROBLEMS = 200

local SEVERITIES = { "error", "warning", "info", "hint" }

--- The specs, as the model sees them (the same as the VS Code extension's).
M.SPECS = {
  diagnostics = {
    name = "diagnostics",
    description = "List the problems (errors, warnings) the editor reports for a workspace "
      .. "file, or for all open files when no path is given, with line numbers.",
    parameters = {
      type = "object",
      properties = {
        path = { type = "string", description = "A file path relative to the workspace folder." },
      },
      additionalProperties = false,
    },
  },
}

--- The specs of the tools named.
---@param names string[]
---@return table[]
function M.specs(names)
  local specs = {}
  for _, name in ipairs(names) do
    table.insert(specs, M.SPECS[name])
  end
  return specs
end

local function root_of(client)
  local folder = client and client.workspace_folders and client.workspace_folders[1]
  local root = folder and vim.uri_to_fname(folder.uri) or (client and client.config.root_dir)
  return vim.fs.normalize(root or vim.fn.getcwd())
end

local function shown(path, root)
  if path:sub(1, #root + 1) == root .. "/" then
    return path:sub(#root + 2)
  end
  return path
end

--- The editor's diagnostics of one file (`path`, relative to the workspace root) or of every
--- buffer, one line each: `path:line:column: severity: message [source]`.
---@param args { path?: string }
---@param client? vim.lsp.Client
---@return string content, boolean is_error
function M.diagnostics(args, client)
  local root = root_of(client)
  local want
  if type(args.path) == "string" and args.path ~= "" then
    local path = args.path:gsub("^%./", "")
    want = vim.fs.normalize(path:sub(1, 1) == "/" and path or (root .. "/" .. path))
  end
  local problems = {}
  for _, d in ipairs(vim.diagnostic.get(nil)) do
    local name = api.nvim_buf_is_valid(d.bufnr) and api.nvim_buf_get_name(d.bufnr) or ""
    local path = name ~= "" and vim.fs.normalize(name) or ("[buffer " .. d.bufnr .. "]")
    if not want or path == want then
      table.insert(problems, {
        path = shown(path, root),
        lnum = d.lnum,
        col = d.col,
        severity = SEVERITIES[d.severity] or "error",
        rank = d.severity or 1,
        message = (d.message or ""):gsub("%s+", " "),
        source = d.source,
      })
    end
  end
  local label = want and shown(want, root)
  if #problems == 0 then
    return label and ("No problems reported in " .. label .. ".") or "No problems reported.", false
  end
  table.sort(problems, function(a, b)
    if a.rank ~= b.rank then
      return a.rank < b.rank
    end
    if a.path ~= b.path then
      return a.path < b.path
    end
    if a.lnum ~= b.lnum then
      return a.lnum < b.lnum
    end
    return a.col < b.col
  end)
  local lines = {}
  for i = 1, math.min(#problems, M.MAX_PROBLEMS) do
    local p = problems[i]
    table.insert(lines, string.format("%s:%d:%d: %s: %s%s", p.path, p.lnum + 1, p.col + 1,
      p.severity, p.message, p.source and (" [" .. p.source .. "]") or ""))
  end
  if #problems > M.MAX_PROBLEMS then
    table.insert(lines, string.format("… and %d more", #problems - M.MAX_PROBLEMS))
  end
  return table.concat(lines, "\n"), false
end

local RUNNERS = { diagnostics = M.diagnostics }

--- The `tramontane/runTool` handler (server request).
---@param params { chatId: string, id: string, name: string, arguments: table|string }
---@param ctx lsp.HandlerContext
---@return { content: string, isError: boolean }
function M.handler(_, params, ctx)
  local offered = require("tramontane.config").options.chat.client_tools
  local name = type(params) == "table" and params.name
  if type(name) ~= "string" or not RUNNERS[name] or not vim.tbl_contains(offered, name) then
    return { content = "the editor has no tool named " .. vim.inspect(name), isError = true }
  end
  local args = params.arguments
  if type(args) == "string" then
    local ok, decoded = pcall(vim.json.decode, args, { luanil = { object = true } })
    args = ok and decoded or nil
  end
  if type(args) ~= "table" then
    return { content = "the arguments of " .. name .. " must be an object", isError = true }
  end
  local content, is_error = RUNNERS[name](args, vim.lsp.get_client_by_id(ctx.client_id))
  return { content = content, isError = is_error }
end

return M
