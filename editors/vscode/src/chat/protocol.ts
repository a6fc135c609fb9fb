/**
 * The chat protocol of issue 12, as the editor sees it: `tramontane/chat` and its streamed
 * `tramontane/chatDelta` notifications, `tramontane/chatClose`, the server's
 * `tramontane/runTool` requests for tools the editor implements, and `workspace/applyEdit` for
 * `propose_edit`. Names and shapes are fixed there; this module only types them and reads what
 * arrives defensively (a malformed delta is dropped, never thrown at the event loop).
 *
 * Plain TypeScript: used by the extension and, for the types, by the webview page.
 */

export const CHAT_METHOD = 'tramontane/chat';
export const CHAT_DELTA_METHOD = 'tramontane/chatDelta';
export const CHAT_CLOSE_METHOD = 'tramontane/chatClose';
export const RUN_TOOL_METHOD = 'tramontane/runTool';
export const APPLY_EDIT_METHOD = 'workspace/applyEdit';

export interface Position {
  line: number;
  character: number;
}

export interface Range {
  start: Position;
  end: Position;
}

export interface TextPart {
  type: 'text';
  text: string;
}

export interface ImagePart {
  type: 'image_url';
  image_url: { url: string };
}

export type Part = TextPart | ImagePart;

/** The OpenAI/Mistral message shape. What the server returns (`tool_calls` included) is kept
 * as it came and sent back with the next turn: the editor never rewrites it. */
export interface Message {
  role: 'system' | 'user' | 'assistant' | 'tool';
  content: string | Part[];
  tool_calls?: unknown;
  tool_call_id?: string;
  name?: string;
}

/** A tool the editor runs itself, offered to the model with the request (`clientTools`). */
export interface ToolSpec {
  name: string;
  description: string;
  /** Its arguments' JSON schema. */
  parameters: Record<string, unknown>;
}

export interface ChatContext {
  uri: string;
  range?: Range;
}

export interface ChatParams {
  chatId: string;
  messages: Message[];
  tools?: boolean | string[];
  clientTools?: ToolSpec[];
  sampling?: { maxTokens?: number; temperature?: number; topP?: number };
  context?: ChatContext;
}

export interface ToolCall {
  id: string;
  name: string;
  /** As the server sent them: usually an object, possibly a JSON string. */
  arguments: unknown;
}

export interface ToolResult {
  id: string;
  content: string;
  isError: boolean;
}

export type ChatDelta =
  | { chatId: string; kind: 'text'; text: string }
  | { chatId: string; kind: 'toolCall'; toolCall: ToolCall }
  | { chatId: string; kind: 'toolResult'; toolResult: ToolResult };

export const FINISH_REASONS = ['stop', 'length', 'cancelled', 'toolLimit'] as const;
export type FinishReason = (typeof FINISH_REASONS)[number];

export interface Usage {
  promptTokens: number;
  reusedTokens: number;
  generatedTokens: number;
}

export interface ChatResult {
  chatId: string;
  message: { role: 'assistant'; content: string };
  /** The user's message as the model read it (with the attached context). */
  userMessage?: Message;
  /** Everything the turn added (assistant messages, tool calls and results): sent back as
   * they are with the next turn. */
  messages: Message[];
  finishReason: FinishReason;
  usage?: Usage;
}

/** `tramontane/runTool` params: the server asks the editor to run one of its client tools. */
export interface RunToolParams {
  chatId: string;
  id: string;
  name: string;
  arguments: unknown;
}

/** The editor's answer to `tramontane/runTool`: the same shape as a tool result delta. */
export interface RunToolResult {
  content: string;
  isError: boolean;
}

function record(value: unknown): Record<string, unknown> | undefined {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
    ? value as Record<string, unknown>
    : undefined;
}

function isString(value: unknown): value is string {
  return typeof value === 'string';
}

/** A `tramontane/chatDelta` notification's params, or undefined when malformed. */
export function parseDelta(params: unknown): ChatDelta | undefined {
  const raw = record(params);
  if (raw === undefined || !isString(raw.chatId)) {
    return undefined;
  }
  const chatId = raw.chatId;
  if (raw.kind === 'text' && isString(raw.text)) {
    return { chatId, kind: 'text', text: raw.text };
  }
  const call = record(raw.toolCall);
  if (raw.kind === 'toolCall' && call !== undefined && isString(call.id) && isString(call.name)) {
    return { chatId, kind: 'toolCall',
      toolCall: { id: call.id, name: call.name, arguments: call.arguments ?? {} } };
  }
  const result = record(raw.toolResult);
  if (raw.kind === 'toolResult' && result !== undefined && isString(result.id) &&
    isString(result.content)) {
    return { chatId, kind: 'toolResult',
      toolResult: { id: result.id, content: result.content, isError: result.isError === true } };
  }
  return undefined;
}

function isMessage(value: unknown): value is Message {
  const raw = record(value);
  return raw !== undefined && ['system', 'user', 'assistant', 'tool'].includes(raw.role as string) &&
    (isString(raw.content) || Array.isArray(raw.content));
}

/** A `tramontane/chat` result; throws a readable error when the server's reply is not one. */
export function parseResult(value: unknown): ChatResult {
  const raw = record(value);
  const message = record(raw?.message);
  if (raw === undefined || !isString(raw.chatId) || message === undefined ||
    !isString(message.content)) {
    throw new Error(`malformed ${CHAT_METHOD} result: ${JSON.stringify(value ?? null).slice(0, 200)}`);
  }
  const messages = Array.isArray(raw.messages) ? raw.messages.filter(isMessage) : [];
  const finishReason = FINISH_REASONS.find((reason) => reason === raw.finishReason) ?? 'stop';
  const result: ChatResult = {
    chatId: raw.chatId,
    message: { role: 'assistant', content: message.content },
    // A server that omits `messages` still gave an answer: keep it for the next turn.
    messages: messages.length > 0 ? messages : [{ role: 'assistant', content: message.content }],
    finishReason,
  };
  if (isMessage(raw.userMessage) && raw.userMessage.role === 'user') {
    result.userMessage = raw.userMessage;
  }
  const usage = record(raw.usage);
  if (usage !== undefined) {
    result.usage = {
      promptTokens: Number(usage.promptTokens ?? 0),
      reusedTokens: Number(usage.reusedTokens ?? 0),
      generatedTokens: Number(usage.generatedTokens ?? 0),
    };
  }
  return result;
}

export function parseRunTool(params: unknown): RunToolParams | undefined {
  const raw = record(params);
  if (raw === undefined || !isString(raw.chatId) || !isString(raw.id) || !isString(raw.name)) {
    return undefined;
  }
  return { chatId: raw.chatId, id: raw.id, name: raw.name, arguments: raw.arguments ?? {} };
}

/** Tool arguments as the user reads them: pretty JSON (a JSON string is parsed first). */
export function formatArguments(args: unknown): string {
  if (typeof args === 'string') {
    try {
      return JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      return args; // not JSON: shown as the model wrote it
    }
  }
  return JSON.stringify(args, null, 2);
}
