/**
 * Pasted and dropped images: which ones are accepted, and their size. The page checks a file
 * before reading it; the extension checks the `data:` URI again before anything is sent (the
 * limit is `tramontane.chat.maxImageMiB`, the same setting the server enforces).
 */

export const MIB = 1024 * 1024;

/** The formats a vision model's image encoder reads (PNG, JPEG, GIF, WebP). */
export const IMAGE_TYPES: readonly string[] = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];

const DATA_URI = /^data:(image\/(?:png|jpeg|gif|webp));base64,([A-Za-z0-9+/]*={0,2})$/;

/** The decoded size of a base64 `data:` image, or undefined when it is not one we accept. */
export function dataUriBytes(url: string): number | undefined {
  const match = DATA_URI.exec(url);
  const payload = match?.[2];
  if (payload === undefined) {
    return undefined;
  }
  const padding = payload.endsWith('==') ? 2 : payload.endsWith('=') ? 1 : 0;
  return Math.floor(payload.length / 4) * 3 - padding;
}

export function formatMiB(bytes: number): string {
  return `${(bytes / MIB).toFixed(1)} MiB`;
}

/** Why an image cannot be attached, or undefined when it can. */
export function imageProblem(name: string, type: string, bytes: number, maxBytes: number):
string | undefined {
  if (!IMAGE_TYPES.includes(type)) {
    return `${name} is not an image the model can read (PNG, JPEG, GIF or WebP).`;
  }
  if (bytes > maxBytes) {
    return `${name} is ${formatMiB(bytes)}, over the ${formatMiB(maxBytes)} limit ` +
      '(tramontane.chat.maxImageMiB): it was not attached.';
  }
  return undefined;
}

/** The same check on a `data:` URI (the extension's side). */
export function dataUriProblem(name: string, url: string, maxBytes: number): string | undefined {
  const bytes = dataUriBytes(url);
  const type = /^data:([^;,]+)/.exec(url)?.[1] ?? 'unknown';
  return bytes === undefined
    ? `${name} is not an image the model can read (PNG, JPEG, GIF or WebP).`
    : imageProblem(name, type, bytes, maxBytes);
}
