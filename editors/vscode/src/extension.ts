/**
 * The VS Code side: the only module that imports `vscode` and `vscode-languageclient`. It wires
 * the plain-Node core (src/core: settings mapping, status model, notices, request forwarding;
 * src/chat: the chat session, controller and page, all tested without VS Code) to VS Code's
 * API. Keep it thin: all the intelligence stays in the server.
 */

import { randomUUID } from 'node:crypto';
import { homedir } from 'node:os';
import { basename, isAbsolute, relative } from 'node:path';
import * as vscode from 'vscode';
import {
  LanguageClient,
  type LanguageClientOptions,
  RevealOutputChannelOn,
  type ServerOptions,
  State,
  type WorkspaceEdit as LspWorkspaceEdit,
} from 'vscode-languageclient/node';

import { editorContext } from './chat/context';
import { ChatController } from './chat/controller';
import { DIAGNOSTICS_TOOL, formatProblems, type Problem, requestedPath } from './chat/diagnostics';
import { isTextDocumentEdit, type WorkspaceEdit } from './chat/edits';
import { chatHtml } from './chat/html';
import { MIB } from './chat/images';
import {
  type CancelToken,
  type ChatTransport,
  ChatSession,
  type EditOutcome,
  type HandlerRegistry,
} from './chat/session';
import { ChatStore } from './chat/store';
import { describe, enableMap, isEnabled, toggleEverywhere, toggleLanguage } from './core/enablement';
import { findExecutable } from './core/executable';
import { type InlineItem, InlineForwarder, lspTriggerKind } from './core/inline';
import {
  ModelNotices,
  type Notice,
  OPEN_SETTINGS,
  SHOW_LOG,
  serverFailed,
  serverNotFound,
} from './core/notices';
import {
  concernsServer,
  configurationChange,
  initializationOptions,
  needsRestart,
  SECTION,
  serverCommand,
  type SettingsGetter,
} from './core/settings';
import { STATUS_METHOD, StatusModel, statusView } from './core/status';

const SELECTOR = [{ scheme: 'file' }, { scheme: 'untitled' }];
const CHAT_VIEW = 'tramontane.chat';

let extension: Tramontane | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  extension = new Tramontane(context);
  context.subscriptions.push(extension);
  await extension.start();
}

export async function deactivate(): Promise<void> {
  await extension?.stop();
  extension = undefined;
}

function settings(): SettingsGetter {
  const config = vscode.workspace.getConfiguration(SECTION);
  return (key: string) => config.get(key);
}

function workingFolder(): string | undefined {
  return vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
}

function activeLanguage(): string | undefined {
  return vscode.window.activeTextEditor?.document.languageId;
}

function toVscodeItem(item: InlineItem): vscode.InlineCompletionItem {
  const text = typeof item.insertText === 'string'
    ? item.insertText
    : new vscode.SnippetString(item.insertText.value);
  const r = item.range;
  const range = r === undefined
    ? undefined
    : new vscode.Range(r.start.line, r.start.character, r.end.line, r.end.character);
  const result = new vscode.InlineCompletionItem(text, range);
  if (item.filterText !== undefined) {
    result.filterText = item.filterText;
  }
  return result;
}

function chatTransport(client: LanguageClient): ChatTransport {
  return {
    sendRequest: (method, params, token) => {
      if (!client.isRunning()) {
        return Promise.reject(new Error('The Tramontane server is not running.'));
      }
      return client.sendRequest(method, params, token);
    },
    sendNotification: async (method, params) => {
      if (client.isRunning()) {
        await client.sendNotification(method, params);
      }
    },
  };
}

/** Registered before the client starts, so its applyEdit handler replaces the library's. */
function chatHandlers(client: LanguageClient): HandlerRegistry {
  return {
    onNotification: (method, handler) => client.onNotification(method, handler),
    onRequest: (method, handler) => client.onRequest(method,
      (params: unknown, token: vscode.CancellationToken) => handler(params, token)),
  };
}

function problemSeverity(severity: vscode.DiagnosticSeverity): Problem['severity'] {
  switch (severity) {
    case vscode.DiagnosticSeverity.Error:
      return 'error';
    case vscode.DiagnosticSeverity.Warning:
      return 'warning';
    case vscode.DiagnosticSeverity.Information:
      return 'info';
    case vscode.DiagnosticSeverity.Hint:
      return 'hint';
  }
}

/** The path of a file inside a workspace folder, relative to it; undefined outside them. */
function workspacePath(uri: vscode.Uri): string | undefined {
  const folder = vscode.workspace.getWorkspaceFolder(uri);
  if (folder === undefined) {
    return undefined;
  }
  const path = relative(folder.uri.fsPath, uri.fsPath);
  return path.startsWith('..') || isAbsolute(path) ? undefined : path;
}

/** The `diagnostics` client tool: VS Code's problems, for workspace files only. */
function runDiagnostics(args: unknown, token: CancelToken): Promise<{ content: string;
  isError: boolean; }> {
  const path = requestedPath(args);
  const problems: Problem[] = [];
  for (const [uri, diagnostics] of vscode.languages.getDiagnostics()) {
    const relativePath = workspacePath(uri);
    if (relativePath === undefined || (path !== undefined && relativePath !== path)) {
      continue;
    }
    for (const d of diagnostics) {
      const problem: Problem = { path: relativePath, line: d.range.start.line,
        character: d.range.start.character, severity: problemSeverity(d.severity),
        message: d.message };
      if (d.source !== undefined) {
        problem.source = d.source;
      }
      problems.push(problem);
    }
  }
  if (token.isCancellationRequested) {
    return Promise.resolve({ content: 'cancelled', isError: true });
  }
  return Promise.resolve({ content: formatProblems(problems, path), isError: false });
}

/** The chat view's page: its HTML with the CSP, and the messages both ways. */
class ChatViewProvider implements vscode.WebviewViewProvider {
  constructor(private readonly extensionUri: vscode.Uri, private readonly controller: ChatController) {}

  resolveWebviewView(view: vscode.WebviewView): void {
    const webview = view.webview;
    webview.options = {
      enableScripts: true,
      enableCommandUris: false,
      localResourceRoots: [vscode.Uri.joinPath(this.extensionUri, 'dist'),
        vscode.Uri.joinPath(this.extensionUri, 'media')],
    };
    webview.html = chatHtml({
      cspSource: webview.cspSource,
      scriptUri: webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, 'dist', 'chat.js'))
        .toString(),
      styleUri: webview.asWebviewUri(vscode.Uri.joinPath(this.extensionUri, 'media', 'chat.css'))
        .toString(),
    });
    const port = { post: (message: unknown): void => { void webview.postMessage(message); } };
    this.controller.setView(port);
    webview.onDidReceiveMessage((message: unknown) => { void this.controller.receive(message); });
    view.onDidDispose(() => { this.controller.setView(undefined); });
  }
}

class Tramontane implements vscode.Disposable {
  private readonly output = vscode.window.createOutputChannel('Tramontane');
  private readonly item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  private readonly status = new StatusModel();
  private readonly notices = new ModelNotices();
  private readonly disposables: { dispose(): unknown }[] = [];
  private client: LanguageClient | undefined;
  private readonly chatSession = new ChatSession(undefined, {
    tools: [{ spec: DIAGNOSTICS_TOOL, run: runDiagnostics }],
    confirmEdit: (edit) => this.confirmEdit(edit),
    log: (line) => { this.output.appendLine(line); },
  });
  private readonly chat: ChatController;
  /** Starts, stops and restarts run one after the other, never interleaved. */
  private lifecycle: Promise<void> = Promise.resolve();
  private readonly forwarder = new InlineForwarder<vscode.CancellationToken>(
    {
      sendRequest: async (method, params, token) => {
        if (this.client?.isRunning() !== true) {
          return null;
        }
        return this.client.sendRequest(method, params, token);
      },
    },
    {
      isEnabled: (languageId) => isEnabled(enableMap(settings()('enable')), languageId),
      onError: (error) => {
        this.output.appendLine(`inline completion failed: ${String(error)}`);
      },
    },
  );

  constructor(context: vscode.ExtensionContext) {
    this.chat = new ChatController(this.chatSession, new ChatStore(context.workspaceState), {
      maxImageBytes: () => {
        const mib = settings()('chat.maxImageMiB');
        return (typeof mib === 'number' && mib > 0 ? mib : 20) * MIB;
      },
      insert: (code) => this.insert(code),
      copy: (code) => Promise.resolve(vscode.env.clipboard.writeText(code)),
      openLink: async (href) => { await vscode.env.openExternal(vscode.Uri.parse(href, true)); },
      log: (line) => { this.output.appendLine(line); },
      now: () => Date.now(),
      newId: () => randomUUID(),
    });
    this.item.name = 'Tramontane';
    this.item.command = 'tramontane.toggle';
    this.item.show();
    this.disposables.push(
      this.output,
      this.item,
      this.status.onDidChange(() => {
        this.paint();
      }),
      vscode.window.onDidChangeActiveTextEditor(() => {
        this.paint();
      }),
      vscode.workspace.onDidChangeConfiguration((event) => {
        this.configurationChanged(event);
      }),
      vscode.languages.registerInlineCompletionItemProvider(SELECTOR, {
        provideInlineCompletionItems: (document, position, context, token) =>
          this.provide(document, position, context, token),
      }),
      vscode.commands.registerCommand('tramontane.toggle', () => this.menu()),
      vscode.commands.registerCommand('tramontane.toggleGlobally', () =>
        this.updateEnable((map) => toggleEverywhere(map))),
      vscode.commands.registerCommand('tramontane.toggleLanguage', () => {
        const language = activeLanguage();
        return language === undefined
          ? vscode.window.showInformationMessage('Tramontane: no editor is active.')
          : this.updateEnable((map) => toggleLanguage(map, language));
      }),
      vscode.commands.registerCommand('tramontane.restart', () => this.restart()),
      vscode.commands.registerCommand('tramontane.showLog', () => {
        this.output.show();
      }),
      vscode.commands.registerCommand('tramontane.openSettings', () =>
        vscode.commands.executeCommand('workbench.action.openSettings', SECTION)),
      vscode.window.registerWebviewViewProvider(CHAT_VIEW,
        new ChatViewProvider(context.extensionUri, this.chat)),
      vscode.commands.registerCommand('tramontane.askAboutSelection', () => this.askAboutSelection()),
      vscode.commands.registerCommand('tramontane.newChat', async () => {
        this.chat.newChat();
        await vscode.commands.executeCommand(`${CHAT_VIEW}.focus`);
      }),
      vscode.window.onDidChangeActiveTextEditor(() => { this.chat.setContext(this.editorContext()); }),
      vscode.window.onDidChangeTextEditorSelection((event) => {
        if (event.textEditor === vscode.window.activeTextEditor) {
          this.chat.setContext(this.editorContext());
        }
      }),
    );
    this.chat.setContext(this.editorContext());
    this.paint();
  }

  private editorContext(): ReturnType<typeof editorContext> {
    const editor = vscode.window.activeTextEditor;
    if (editor === undefined) {
      return {};
    }
    const { document, selection } = editor;
    return editorContext({
      uri: document.uri.toString(),
      scheme: document.uri.scheme,
      name: basename(document.uri.path),
      selection: { start: { line: selection.start.line, character: selection.start.character },
        end: { line: selection.end.line, character: selection.end.character } },
    });
  }

  private async askAboutSelection(): Promise<void> {
    await vscode.commands.executeCommand(`${CHAT_VIEW}.focus`);
    this.chat.setContext(this.editorContext(), true);
  }

  /** A code block's Insert: into the last active editor, replacing its selections. */
  private async insert(code: string): Promise<void> {
    const editor = vscode.window.activeTextEditor ?? vscode.window.visibleTextEditors[0];
    if (editor === undefined) {
      void vscode.window.showInformationMessage('Tramontane: open an editor to insert the code into.');
      return;
    }
    await editor.edit((builder) => {
      for (const selection of editor.selections) {
        builder.replace(selection, code);
      }
    });
    await vscode.window.showTextDocument(editor.document, editor.viewColumn);
  }

  /** `propose_edit`: every part of the edit needs confirmation (ChatSession made sure), so VS
   * Code shows its refactor preview and nothing changes until the user applies it there. An
   * edit made for another version of an open document is refused, as vscode-languageclient
   * does. */
  private async confirmEdit(edit: WorkspaceEdit): Promise<EditOutcome> {
    const client = this.client;
    if (client === undefined) {
      return { applied: false, failureReason: 'The language client is not running.' };
    }
    for (const change of edit.documentChanges ?? []) {
      if (!isTextDocumentEdit(change) || change.textDocument.version === null) {
        continue;
      }
      const uri = change.textDocument.uri;
      const open = vscode.workspace.textDocuments.find((d) => d.uri.toString() === uri);
      if (open !== undefined && open.version !== change.textDocument.version) {
        return { applied: false, failureReason: `${uri} changed since the edit was proposed.` };
      }
    }
    // Our WorkspaceEdit is LSP's, typed by hand (src/chat does not import the client library).
    const converted = await client.protocol2CodeConverter.asWorkspaceEdit(edit as LspWorkspaceEdit);
    const applied = await vscode.workspace.applyEdit(converted);
    return applied
      ? { applied }
      : { applied, failureReason: 'The user did not apply the edit.' };
  }

  start(): Promise<void> {
    return this.queue(() => this.doStart());
  }

  stop(): Promise<void> {
    return this.queue(() => this.doStop());
  }

  restart(): Promise<void> {
    return this.queue(async () => {
      await this.doStop();
      await this.doStart();
    });
  }

  private queue(step: () => Promise<void>): Promise<void> {
    this.lifecycle = this.lifecycle.then(step, step);
    return this.lifecycle;
  }

  private async doStart(): Promise<void> {
    const { command, args } = serverCommand(settings());
    this.status.starting();
    if (findExecutable(command, process.env, workingFolder()) === undefined) {
      this.status.stopped(`The language server \`${command}\` was not found.`);
      this.notify(serverNotFound(command));
      return;
    }
    const serverOptions: ServerOptions = { command, args };
    const clientOptions: LanguageClientOptions = {
      documentSelector: SELECTOR,
      outputChannel: this.output,
      revealOutputChannelOn: RevealOutputChannelOn.Never,
      initializationOptions: () => initializationOptions(settings(), homedir()),
    };
    const client = new LanguageClient('tramontane', 'Tramontane', serverOptions, clientOptions);
    // Registered before start, so they replace the library's default showMessage handler.
    client.onNotification(STATUS_METHOD, (params: unknown) => {
      if (!this.status.update(params)) {
        this.output.appendLine(`ignored a malformed ${STATUS_METHOD}: ${JSON.stringify(params)}`);
        return;
      }
      this.notify(this.notices.status(this.status.status));
    });
    client.onNotification('window/showMessage', (params: unknown) => {
      this.notify(this.notices.showMessage(params));
    });
    client.onDidChangeState((event) => {
      if (this.client !== client) {
        return; // an old client winding down
      }
      if (event.newState === State.Stopped) {
        this.status.stopped('The language server stopped: Show Log says why.');
      } else if (event.newState === State.Starting) {
        this.status.starting();
      }
    });
    this.chatSession.attach(chatHandlers(client));
    this.chatSession.setTransport(chatTransport(client));
    this.client = client;
    try {
      await client.start();
    } catch (error) {
      this.status.stopped(`The language server could not be started: ${String(error)}`);
      this.notify(serverFailed(command, error));
    }
  }

  private async doStop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.chatSession.setTransport(undefined);
    if (client !== undefined && client.needsStop()) {
      await client.stop();
    }
    this.status.stopped('The language server is stopped.');
  }

  dispose(): void {
    for (const disposable of this.disposables) {
      disposable.dispose();
    }
  }

  private async provide(
    document: vscode.TextDocument,
    position: vscode.Position,
    context: vscode.InlineCompletionContext,
    token: vscode.CancellationToken,
  ): Promise<vscode.InlineCompletionItem[] | null> {
    const client = this.client;
    if (client === undefined) {
      return null;
    }
    const selected = context.selectedCompletionInfo;
    const items = await this.forwarder.provide({
      uri: client.code2ProtocolConverter.asUri(document.uri),
      languageId: document.languageId,
      position: { line: position.line, character: position.character },
      triggerKind: lspTriggerKind(context.triggerKind),
      ...(selected === undefined ? {} : {
        selectedCompletionInfo: {
          range: client.code2ProtocolConverter.asRange(selected.range),
          text: selected.text,
        },
      }),
    }, token);
    return items === null ? null : items.map(toVscodeItem);
  }

  private configurationChanged(event: vscode.ConfigurationChangeEvent): void {
    const affects = (section: string): boolean => event.affectsConfiguration(section);
    if (!affects(SECTION)) {
      return;
    }
    if (needsRestart(affects)) {
      void this.restart();
    } else if (concernsServer(affects) && this.client?.isRunning() === true) {
      void this.client.sendNotification('workspace/didChangeConfiguration',
        configurationChange(settings(), homedir()));
    }
    this.paint();
  }

  private paint(): void {
    const language = activeLanguage();
    const map = enableMap(settings()('enable'));
    const off = language !== undefined && !isEnabled(map, language)
      ? describe(map, language)
      : undefined;
    const view = statusView(this.status.status, off);
    this.item.text = view.text;
    this.item.tooltip = new vscode.MarkdownString(view.tooltip);
    this.item.backgroundColor = view.severity === 'normal'
      ? undefined
      : new vscode.ThemeColor(`statusBarItem.${view.severity}Background`);
  }

  private async updateEnable(change: (map: ReturnType<typeof enableMap>) => object): Promise<void> {
    const config = vscode.workspace.getConfiguration(SECTION);
    const where = config.inspect('enable');
    const target = where?.workspaceFolderValue !== undefined
      ? vscode.ConfigurationTarget.WorkspaceFolder
      : where?.workspaceValue !== undefined
        ? vscode.ConfigurationTarget.Workspace
        : vscode.ConfigurationTarget.Global;
    await config.update('enable', change(enableMap(config.get('enable'))), target);
  }

  private async menu(): Promise<void> {
    const map = enableMap(settings()('enable'));
    const language = activeLanguage();
    const everywhere = isEnabled(map, '*');
    const items: (vscode.QuickPickItem & { run: () => Thenable<unknown> })[] = [{
      label: everywhere ? '$(circle-slash) Turn off everywhere' : '$(check) Turn on everywhere',
      description: `completions are ${describe(map, language)}`,
      run: () => this.updateEnable((m) => toggleEverywhere(m)),
    }];
    if (language !== undefined) {
      const here = isEnabled(map, language);
      items.push({
        label: here ? `$(circle-slash) Turn off for ${language}` : `$(check) Turn on for ${language}`,
        run: () => this.updateEnable((m) => toggleLanguage(m, language)),
      });
    }
    items.push(
      { label: '$(gear) Open settings', run: () => vscode.commands.executeCommand('tramontane.openSettings') },
      { label: '$(output) Show log', run: () => {
        this.output.show();
        return Promise.resolve();
      } },
      { label: '$(debug-restart) Restart server', run: () => this.restart() },
    );
    const picked = await vscode.window.showQuickPick(items, { title: 'Tramontane' });
    await picked?.run();
  }

  private notify(notice: Notice | undefined): void {
    if (notice === undefined) {
      return;
    }
    const show = notice.severity === 'error'
      ? vscode.window.showErrorMessage
      : notice.severity === 'warning'
        ? vscode.window.showWarningMessage
        : vscode.window.showInformationMessage;
    const actions = notice.setting === undefined ? [] : [OPEN_SETTINGS, SHOW_LOG];
    void show(notice.message, ...actions).then((choice) => {
      if (choice === OPEN_SETTINGS) {
        void vscode.commands.executeCommand('workbench.action.openSettings', notice.setting);
      } else if (choice === SHOW_LOG) {
        this.output.show();
      }
    });
  }
}
