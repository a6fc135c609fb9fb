/**
 * The chat page's HTML and its content security policy.
 *
 * The policy allows the page's one script (by nonce) and its stylesheet (from the webview's own
 * resource origin, and by nonce), images only as `data:` URIs (pasted screenshots, thumbnails),
 * and nothing else: no inline script or event-handler attribute, no remote image, font, frame
 * or connection. Markdown from the model is sanitised too (webview/markdown.ts); the policy is
 * what still holds if that ever fails.
 */

import { randomBytes } from 'node:crypto';

export interface PageResources {
  /** `webview.cspSource`: the origin VS Code serves the extension's files from. */
  cspSource: string;
  scriptUri: string;
  styleUri: string;
  nonce?: string;
}

export function newNonce(): string {
  return randomBytes(18).toString('base64url');
}

export function contentSecurityPolicy(cspSource: string, nonce: string): string {
  return [
    "default-src 'none'",
    `script-src 'nonce-${nonce}'`,
    `style-src ${cspSource} 'nonce-${nonce}'`,
    'img-src data:',
    "base-uri 'none'",
    "form-action 'none'",
    "frame-src 'none'",
  ].join('; ');
}

function escapeAttribute(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
}

export function chatHtml(resources: PageResources): string {
  const nonce = resources.nonce ?? newNonce();
  const csp = contentSecurityPolicy(resources.cspSource, nonce);
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${escapeAttribute(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" nonce="${nonce}" href="${escapeAttribute(resources.styleUri)}">
<title>Tramontane Chat</title>
</head>
<body>
<div id="app" class="app"></div>
<script nonce="${nonce}" src="${escapeAttribute(resources.scriptUri)}"></script>
</body>
</html>
`;
}
