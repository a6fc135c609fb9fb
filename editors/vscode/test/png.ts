/** A minimal PNG encoder for test images (RGB, no filter): no image library needed. */

import { crc32, deflateSync } from 'node:zlib';

function chunk(type: string, data: Buffer): Buffer {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

export function png(width: number, height: number,
  pixel: (x: number, y: number) => [number, number, number]): Buffer {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.writeUInt8(8, 8); // bit depth
  header.writeUInt8(2, 9); // RGB
  const rows = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0; y < height; y++) {
    const row = y * (width * 3 + 1);
    for (let x = 0; x < width; x++) {
      const [r, g, b] = pixel(x, y);
      rows.writeUInt8(r, row + 1 + x * 3);
      rows.writeUInt8(g, row + 2 + x * 3);
      rows.writeUInt8(b, row + 3 + x * 3);
    }
  }
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', header),
    chunk('IDAT', deflateSync(rows)), chunk('IEND', Buffer.alloc(0))]);
}

/** A small picture of a terminal with a red traceback line, like a pasted screenshot. */
export function terminalShot(): Buffer {
  const lines: [number, number, [number, number, number]][] = [
    [8, 70, [204, 204, 204]], [18, 120, [106, 153, 85]], [28, 95, [204, 204, 204]],
    [38, 140, [86, 156, 214]], [48, 80, [204, 204, 204]], [62, 150, [244, 71, 71]],
    [72, 110, [244, 71, 71]],
  ];
  return png(180, 90, (x, y) => {
    if (y < 6) {
      return [60, 60, 60];
    }
    for (const [top, length, color] of lines) {
      if (y >= top + 4 && y < top + 8 && x >= 8 && x < 8 + length && x % 7 !== 0) {
        return color;
      }
    }
    return [24, 24, 24];
  });
}
