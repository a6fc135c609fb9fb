-- What a chat message can carry besides its text: a selection of a buffer (the request's
-- `context`, which the server attaches to the message) and images (data: URI parts).
local api = vim.api

local M = {}

M.ns = api.nvim_create_namespace("tramontane_chat_selection")

local HAS_011 = vim.fn.has("nvim-0.11") == 1
local MIB = 1024 * 1024

--- The image formats a chat accepts, by their first bytes.
local FORMATS = {
  { mime = "image/png", name = "PNG", magic = function(head)
    return head:sub(1, 8) == "\137PNG\r\n\26\n"
  end },
  { mime = "image/jpeg", name = "JPEG", magic = function(head)
    return head:sub(1, 3) == "\255\216\255"
  end },
  { mime = "image/gif", name = "GIF", magic = function(head)
    return head:sub(1, 6) == "GIF87a" or head:sub(1, 6) == "GIF89a"
  end },
  { mime = "image/webp", name = "WEBP", magic = function(head)
    return head:sub(1, 4) == "RIFF" and head:sub(9, 12) == "WEBP"
  end },
}

--- The LSP `character` of byte column `col` of `line` in `encoding`.
---@param line string
---@param col integer
---@param encoding string
---@return integer
local function character(line, col, encoding)
  col = math.min(col, #line)
  if encoding == "utf-8" then
    return col
  end
  if HAS_011 then
    return vim.str_utfindex(line, encoding, col, false)
  end
  local utf32, utf16 = vim.str_utfindex(line, col)
  return encoding == "utf-16" and utf16 or utf32
end

local function size_text(bytes)
  if bytes < MIB then
    return string.format("%d KiB", math.max(1, math.floor(bytes / 1024 + 0.5)))
  end
  return string.format("%.1f MiB", bytes / MIB)
end

--- The selection a `:[range]TramontaneChat` names: the visual selection when the range is
--- '<,'> of a characterwise one, else whole lines. Kept as an extmark, so that edits made
--- before the message is sent move it along.
---@param buf integer
---@param line1 integer first line (1-based)
---@param line2 integer last line (1-based)
---@return tramontane.Attachment|nil, string|nil error
function M.selection(buf, line1, line2)
  if vim.bo[buf].buftype ~= "" or api.nvim_buf_get_name(buf) == "" then
    return nil, "select text in a file's buffer to attach it"
  end
  local last = api.nvim_buf_get_lines(buf, line2 - 1, line2, true)[1]
  local start_col, end_row, end_col = 0, line2 - 1, #last
  local from, to = api.nvim_buf_get_mark(buf, "<"), api.nvim_buf_get_mark(buf, ">")
  -- visualmode() is the current buffer's: ask it in `buf`.
  local mode = api.nvim_buf_call(buf, function()
    return vim.fn.visualmode()
  end)
  if mode == "v" and from[1] == line1 and to[1] == line2 then
    start_col = from[2]
    if to[2] < #last then -- else the selection ends with the line
      end_col = to[2] + 1 + vim.str_utf_end(last, to[2] + 1) -- past the last character selected
    end
  end
  local mark = api.nvim_buf_set_extmark(buf, M.ns, line1 - 1, start_col, {
    end_row = end_row, end_col = end_col, right_gravity = true, end_right_gravity = false,
  })
  local name = vim.fn.fnamemodify(api.nvim_buf_get_name(buf), ":~:.")
  local lines = line1 == line2 and ("line " .. line1) or string.format("lines %d-%d", line1, line2)
  return { kind = "context", label = "selection: " .. name .. ", " .. lines, buf = buf,
           mark = mark }
end

--- The request's `context` for a selection, in `client`'s position encoding; the buffer is
--- attached to the client first if it is not (the server reads the text it has been sent).
---@param attachment tramontane.Attachment
---@param client vim.lsp.Client
---@return table|nil context, string|nil error
function M.context(attachment, client)
  local buf = attachment.buf
  if not buf or not api.nvim_buf_is_valid(buf) then
    return nil, "the selected text's buffer is gone: remove the line \""
      .. attachment.label .. "\" or select again"
  end
  local attached = vim.lsp.buf_is_attached(buf, client.id)
  if not attached and not vim.lsp.buf_attach_client(buf, client.id) then
    return nil, "cannot send " .. api.nvim_buf_get_name(buf) .. " to the server"
  end
  local pos = api.nvim_buf_get_extmark_by_id(buf, M.ns, attachment.mark, { details = true })
  local first = api.nvim_buf_get_lines(buf, pos[1], pos[1] + 1, true)[1]
  local last = api.nvim_buf_get_lines(buf, pos[3].end_row, pos[3].end_row + 1, true)[1]
  local encoding = client.offset_encoding
  return {
    uri = vim.uri_from_bufnr(buf),
    range = {
      start = { line = pos[1], character = character(first, pos[2], encoding) },
      ["end"] = { line = pos[3].end_row, character = character(last, pos[3].end_col, encoding) },
    },
  }
end

--- An image, given its bytes: a data: URI part if it is a PNG, JPEG, GIF or WEBP image no
--- larger than `max_mib`.
---@param data string
---@param name string what the attachment line calls it
---@param max_mib number
---@return tramontane.Attachment|nil, string|nil error
function M.image(data, name, max_mib)
  if #data > max_mib * MIB then
    return nil, string.format("%s is %s: larger than chat.maxImageMiB (%s MiB)", name,
      size_text(#data), max_mib)
  end
  for _, format in ipairs(FORMATS) do
    if format.magic(data:sub(1, 16)) then
      return {
        kind = "image",
        label = string.format("image: %s, %s, %s", name, format.name, size_text(#data)),
        url = "data:" .. format.mime .. ";base64," .. vim.base64.encode(data),
        bytes = #data,
      }
    end
  end
  return nil, name .. " is not a PNG, JPEG, GIF or WEBP image"
end

--- An image file (its size is checked before it is read).
---@param path string
---@param max_mib number
---@return tramontane.Attachment|nil, string|nil error
function M.image_file(path, max_mib)
  local full = vim.fn.fnamemodify(vim.fn.expand(path), ":p")
  local name = vim.fn.fnamemodify(full, ":t")
  local stat = vim.uv.fs_stat(full)
  if not stat or stat.type ~= "file" then
    return nil, "no image file at " .. path
  end
  if stat.size > max_mib * MIB then
    return nil, string.format("%s is %s: larger than chat.maxImageMiB (%s MiB)", name,
      size_text(stat.size), max_mib)
  end
  local file, err = io.open(full, "rb")
  if not file then
    return nil, "cannot read " .. path .. ": " .. tostring(err)
  end
  local data = file:read("*a")
  file:close()
  return M.image(data, name, max_mib)
end

local IMAGE_TYPES = { "image/png", "image/jpeg", "image/webp", "image/gif" }

local function run(cmd)
  local ok, result = pcall(function()
    return vim.system(cmd, { text = false }):wait(5000)
  end)
  if not ok then
    return nil, tostring(result)
  end
  if result.code ~= 0 then
    local why = vim.trim(result.stderr or "")
    return nil, string.format("`%s` failed (exit code %d)%s", table.concat(cmd, " "), result.code,
      why ~= "" and (": " .. why) or "")
  end
  return result.stdout or ""
end

local function first_image_type(listing)
  local offered = {}
  for _, t in ipairs(vim.split(listing, "%s+", { trimempty = true })) do
    offered[t] = true
  end
  for _, t in ipairs(IMAGE_TYPES) do
    if offered[t] then
      return t
    end
  end
  return nil
end

--- The clipboard tools, in the order they are tried: the first one installed is used.
M.CLIPBOARD = {
  {
    exe = "wl-paste",
    list = { "wl-paste", "--list-types" },
    get = function(t) return { "wl-paste", "--no-newline", "--type", t } end,
  },
  {
    exe = "xclip",
    list = { "xclip", "-selection", "clipboard", "-target", "TARGETS", "-out" },
    get = function(t) return { "xclip", "-selection", "clipboard", "-target", t, "-out" } end,
  },
  { exe = "pngpaste", get = function() return { "pngpaste", "-" } end },
}

--- The first clipboard tool installed, or nil.
function M.clipboard_tool()
  for _, tool in ipairs(M.CLIPBOARD) do
    if vim.fn.executable(tool.exe) == 1 then
      return tool
    end
  end
  return nil
end

--- The clipboard's image, through wl-paste, xclip or pngpaste (whichever is installed).
---@param max_mib number
---@return tramontane.Attachment|nil, string|nil error
function M.clipboard_image(max_mib)
  local tool = M.clipboard_tool()
  if not tool then
    return nil, "no clipboard tool for images: install wl-clipboard (wl-paste, Wayland), xclip "
      .. "(X11) or pngpaste (macOS), or attach a file: :TramontaneChatImage path/to/image.png"
  end
  local mime = "image/png"
  if tool.list then
    local listing, err = run(tool.list)
    if not listing then
      return nil, err
    end
    mime = first_image_type(listing)
    if not mime then
      return nil, "the clipboard holds no image (" .. tool.exe .. " offers: "
        .. (vim.trim(listing) ~= "" and table.concat(vim.split(vim.trim(listing), "%s+"), ", ")
          or "nothing") .. ")"
    end
  end
  local data, err = run(tool.get(mime))
  if not data then
    return nil, err
  end
  if data == "" then
    return nil, "the clipboard holds no image (" .. tool.exe .. " gave nothing)"
  end
  return M.image(data, "clipboard." .. mime:match("/(%w+)$"), max_mib)
end

return M
