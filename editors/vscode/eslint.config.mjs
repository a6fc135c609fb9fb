// Strict, type-aware linting; `npm run check` runs it with --max-warnings=0.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['out/', 'dist/', 'node_modules/', '*.vsix', 'eslint.config.mjs'] },
  js.configs.recommended,
  ...tseslint.configs.strictTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true }],
      'no-console': 'error',
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      '@typescript-eslint/no-floating-promises': ['error', {
        allowForKnownSafeCalls: [
          { from: 'package', package: 'node:test', name: ['describe', 'test', 'it'] },
        ],
      }],
    },
  },
  {
    // The Chromium tests' stand-in for VS Code's webview host: plain browser JavaScript.
    files: ['test/fixtures/*.js'],
    ...tseslint.configs.disableTypeChecked,
    languageOptions: {
      parserOptions: { projectService: false },
      globals: Object.fromEntries(['window', 'document', 'sessionStorage', 'DataTransfer', 'File',
        'atob', 'ClipboardEvent', 'DragEvent', 'MessageEvent', 'getComputedStyle']
        .map((name) => [name, 'readonly'])),
    },
  },
  {
    // The core and the chat run in plain Node (the chat page in the webview) and are tested
    // there: no VS Code API in them.
    files: ['src/core/**/*.ts', 'src/chat/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        paths: [
          { name: 'vscode', message: 'src/core and src/chat run without VS Code: use src/extension.ts.' },
          { name: 'vscode-languageclient', message: 'src/core is transport-agnostic.' },
          { name: 'vscode-languageclient/node', message: 'src/core is transport-agnostic.' },
        ],
      }],
    },
  },
);
