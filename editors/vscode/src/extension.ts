/**
 * The VS Code side: the only module that imports `vscode` and `vscode-languageclient`. It wires
 * the plain-Node core (src/core: settings mapping, status model, notices, request forwarding,
 * all tested against the real server without VS Code) to VS Code's API. Keep it thin: all the
 * intelligence stays in the server. (A chat view will sit beside this, in src/chat.)
 */

import { homedir } from 'node:os';
import * as vscode from 'vscode';
import {
  LanguageClient,
  type LanguageClientOptions,
  RevealOutputChannelOn,
  type ServerOptions,
  State,
} from 'vscode-languageclient/node';

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

let extension: Tramontane | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  extension = new Tramontane();
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

class Tramontane implements vscode.Disposable {
  private readonly output = vscode.window.createOutputChannel('Tramontane');
  private readonly item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  private readonly status = new StatusModel();
  private readonly notices = new ModelNotices();
  private readonly disposables: { dispose(): unknown }[] = [];
  private client: LanguageClient | undefined;
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

  constructor() {
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
    );
    this.paint();
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
