/**
 * A scripted JSON-RPC peer standing in for the server's chat (issue 12's protocol), until the
 * real server has it: a real vscode-jsonrpc connection over in-memory streams, whose
 * `tramontane/chat` handler plays a script of steps (deltas, `tramontane/runTool` and
 * `workspace/applyEdit` requests to the editor, waiting for a cancel, the reply or an error)
 * and records what it was sent. The editor side gets `transport` and `registry`, the same
 * interfaces the extension gives ChatSession over vscode-languageclient.
 */

import { PassThrough } from 'node:stream';
import {
  type CancellationToken,
  createMessageConnection,
  type MessageConnection,
  ResponseError,
  StreamMessageReader,
  StreamMessageWriter,
} from 'vscode-jsonrpc/node';

import type { ChatParams } from '../src/chat/protocol';
import type { ChatTransport, HandlerRegistry } from '../src/chat/session';

export type Step =
  | { text: string }
  | { toolCall: { id: string; name: string; arguments: unknown } }
  | { toolResult: { id: string; content: string; isError: boolean } }
  /** Sends `tramontane/runTool` and waits for the editor's answer. */
  | { runTool: { id: string; name: string; arguments: unknown } }
  /** Sends `workspace/applyEdit` and waits for the editor's answer. */
  | { applyEdit: { label?: string; edit: unknown } }
  /** Waits for `$/cancelRequest` (at most `ms`), then sends `then` and answers -32800. */
  | { waitForCancel: { ms: number; then?: Step[] } }
  /** Ignores a cancel and waits. */
  | { sleep: number }
  /** Waits until the test says so (at most 10 s). */
  | { until: Promise<void> }
  | { error: { code: number; message: string } }
  /** The reply; by default built from the text steps, as the server does. */
  | { result: Record<string, unknown> };

export type Script = (params: ChatParams) => Step[];

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class ScriptedPeer {
  readonly requests: ChatParams[] = [];
  readonly closed: string[] = [];
  readonly cancelled: string[] = [];
  readonly toolAnswers: unknown[] = [];
  readonly editAnswers: unknown[] = [];
  readonly transport: ChatTransport;
  readonly registry: HandlerRegistry;
  private readonly client: MessageConnection;
  private readonly server: MessageConnection;

  constructor(private script: Script) {
    const up = new PassThrough();
    const down = new PassThrough();
    this.client = createMessageConnection(new StreamMessageReader(down), new StreamMessageWriter(up));
    this.server = createMessageConnection(new StreamMessageReader(up), new StreamMessageWriter(down));
    this.server.onRequest('tramontane/chat', (params: ChatParams, token: CancellationToken) =>
      this.play(params, token));
    this.server.onNotification('tramontane/chatClose', (params: { chatId: string }) => {
      this.closed.push(params.chatId);
    });
    this.server.listen();
    this.client.listen();
    const client = this.client;
    this.transport = {
      sendRequest: (method, params, token) => client.sendRequest(method, params, token),
      sendNotification: (method, params) => client.sendNotification(method, params),
    };
    this.registry = {
      onNotification: (method, handler) => client.onNotification(method, handler),
      onRequest: (method, handler) => client.onRequest(method,
        (params: unknown, token: CancellationToken) => handler(params, token)),
    };
  }

  setScript(script: Script): void {
    this.script = script;
  }

  dispose(): void {
    this.client.dispose();
    this.server.dispose();
  }

  private async play(params: ChatParams, token: CancellationToken): Promise<unknown> {
    this.requests.push(structuredClone(params));
    let text = '';
    const run = async (steps: Step[]): Promise<unknown> => {
      for (const step of steps) {
        if ('text' in step) {
          text += step.text;
          await this.server.sendNotification('tramontane/chatDelta',
            { chatId: params.chatId, kind: 'text', text: step.text });
        } else if ('toolCall' in step) {
          await this.server.sendNotification('tramontane/chatDelta',
            { chatId: params.chatId, kind: 'toolCall', toolCall: step.toolCall });
        } else if ('toolResult' in step) {
          await this.server.sendNotification('tramontane/chatDelta',
            { chatId: params.chatId, kind: 'toolResult', toolResult: step.toolResult });
        } else if ('runTool' in step) {
          this.toolAnswers.push(await this.server.sendRequest('tramontane/runTool',
            { chatId: params.chatId, ...step.runTool }));
        } else if ('applyEdit' in step) {
          this.editAnswers.push(await this.server.sendRequest('workspace/applyEdit', step.applyEdit));
        } else if ('waitForCancel' in step) {
          const started = Date.now();
          while (!token.isCancellationRequested && Date.now() - started < step.waitForCancel.ms) {
            await delay(5);
          }
          if (token.isCancellationRequested) {
            this.cancelled.push(params.chatId);
            await run(step.waitForCancel.then ?? []);
            throw new ResponseError(-32800, 'Request cancelled');
          }
        } else if ('sleep' in step) {
          await delay(step.sleep);
        } else if ('until' in step) {
          await Promise.race([step.until, delay(10_000)]);
        } else if ('error' in step) {
          throw new ResponseError(step.error.code, step.error.message);
        } else {
          return step.result;
        }
      }
      return {
        chatId: params.chatId,
        message: { role: 'assistant', content: text },
        messages: [{ role: 'assistant', content: text }],
        finishReason: 'stop',
        usage: { promptTokens: 10, reusedTokens: 0, generatedTokens: 4 },
      };
    };
    return run(this.script(params));
  }
}
