-- `workspace/applyEdit` from the chat's `propose_edit`: Neovim's own handler applies an edit at
-- once; this one, installed for the Tramontane client only, shows the diff in the chat, asks
-- with vim.ui.select (accept / reject) and applies it only when accepted. The buffers change,
-- not the files (the user writes them), and `u` in a buffer undoes the edit.
local api = vim.api

local M = {}

M.METHOD = "workspace/applyEdit"
M.ACCEPT = "Accept"
M.REJECT = "Reject"

local function name_of(uri)
  local ok, fname = pcall(vim.uri_to_fname, uri)
  return ok and vim.fn.fnamemodify(fname, ":~:.") or uri
end

local function current_lines(uri)
  local buf = vim.uri_to_bufnr(uri)
  if api.nvim_buf_is_loaded(buf) then
    return api.nvim_buf_get_lines(buf, 0, -1, false), buf
  end
  local fname = vim.uri_to_fname(uri)
  if vim.fn.filereadable(fname) == 1 then
    return vim.fn.readfile(fname), buf
  end
  return {}, buf
end

--- `lines` after `edits`, computed in a scratch buffer by Neovim's own edit code.
local function edited(lines, edits, encoding)
  local scratch = api.nvim_create_buf(false, true)
  local ok, result = pcall(function()
    api.nvim_buf_set_lines(scratch, 0, -1, false, lines)
    vim.lsp.util.apply_text_edits(edits, scratch, encoding)
    return api.nvim_buf_get_lines(scratch, 0, -1, false)
  end)
  api.nvim_buf_delete(scratch, { force = true })
  if not ok then
    error(result, 0)
  end
  return result
end

--- What the edit does, file by file, as a unified diff (and the files it touches); an error
--- when a document changed since the server computed the edit.
---@param edit table a WorkspaceEdit
---@param encoding string
---@return string[] diff, string[] names
function M.preview(edit, encoding)
  local documents = {}
  for _, change in ipairs(edit.documentChanges or {}) do
    table.insert(documents, change)
  end
  for uri, edits in pairs(edit.changes or {}) do
    table.insert(documents, { textDocument = { uri = uri }, edits = edits })
  end
  local diff, names = {}, {}
  for _, change in ipairs(documents) do
    if change.kind == "create" or change.kind == "delete" then
      table.insert(names, name_of(change.uri))
      table.insert(diff, change.kind .. " " .. name_of(change.uri))
    elseif change.kind == "rename" then
      table.insert(names, name_of(change.oldUri))
      table.insert(diff, "rename " .. name_of(change.oldUri) .. " → " .. name_of(change.newUri))
    else
      local uri = change.textDocument.uri
      local name = name_of(uri)
      local before, buf = current_lines(uri)
      local version = change.textDocument.version
      local have = vim.lsp.util.buf_versions[buf]
      if type(version) == "number" and version > 0 and have and have > version then
        error(name .. " changed since the edit was proposed", 0)
      end
      local after = edited(before, change.edits, encoding)
      local text = vim.diff(table.concat(before, "\n") .. "\n", table.concat(after, "\n") .. "\n",
        { ctxlen = 2 })
      table.insert(names, name)
      table.insert(diff, "--- a/" .. name)
      table.insert(diff, "+++ b/" .. name)
      if text == "" then
        table.insert(diff, "(no change)")
      else
        vim.list_extend(diff, vim.split(vim.trim(text), "\n", { plain = true }))
      end
    end
  end
  return diff, names
end

--- Ask accept / reject: waits without blocking Neovim when called from the client's coroutine
--- (how Neovim runs server requests), else only a synchronous vim.ui.select can answer.
---@param prompt string
---@return string|nil
local function ask(prompt)
  local co, is_main = coroutine.running()
  local opts = { prompt = prompt, kind = "tramontane.edit" }
  if not co or is_main then
    local answer
    vim.ui.select({ M.ACCEPT, M.REJECT }, opts, function(choice)
      answer = choice
    end)
    return answer
  end
  vim.ui.select({ M.ACCEPT, M.REJECT }, opts, function(choice)
    -- A synchronous vim.ui.select calls back before the yield below: resume later.
    vim.schedule(function()
      coroutine.resume(co, choice)
    end)
  end)
  return coroutine.yield()
end

--- The `workspace/applyEdit` handler (server request).
---@param params { label?: string, edit: table }
---@param ctx lsp.HandlerContext
---@return { applied: boolean, failureReason?: string }
function M.handler(_, params, ctx)
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  if type(params) ~= "table" or type(params.edit) ~= "table" then
    return { applied = false, failureReason = "workspace/applyEdit without an edit" }
  end
  local encoding = client and client.offset_encoding or "utf-16"
  local ok, diff, names = pcall(M.preview, params.edit, encoding)
  if not ok then
    vim.notify("Tramontane: the proposed edit cannot be applied: " .. diff, vim.log.levels.WARN)
    return { applied = false, failureReason = diff }
  end
  local chat = require("tramontane.chat")
  local what = table.concat(names, ", ")
  local shown = chat.show_edit(ctx.client_id, params.label, what, diff)
  local choice = ask(string.format("Tramontane: apply the proposed edit to %s?", what))
  if choice ~= M.ACCEPT then
    chat.edit_outcome(shown, "rejected")
    return { applied = false, failureReason = "the user rejected the edit" }
  end
  local applied, err = pcall(vim.lsp.util.apply_workspace_edit, params.edit, encoding)
  if not applied then
    chat.edit_outcome(shown, "failed: " .. tostring(err))
    return { applied = false, failureReason = tostring(err) }
  end
  chat.edit_outcome(shown, "accepted (u in the buffer undoes it)")
  return { applied = true }
end

return M
