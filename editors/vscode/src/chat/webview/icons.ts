/** The page's icons: small inline SVGs built with the DOM (the CSP allows no icon font). */

const PATHS = {
  send: 'M2.5 2.2 14 8 2.5 13.8 4.3 8Zm1.8 5.8h5',
  stop: 'M4.5 4.5h7v7h-7z',
  plus: 'M8 3v10M3 8h10',
  history: 'M2.5 8a5.5 5.5 0 1 0 1.6-3.9M2.5 2.5v2.6h2.6M8 5v3.2l2.2 1.4',
  trash: 'M3 4.5h10M6.5 4.5V3h3v1.5M4.5 4.5l.7 9h5.6l.7-9',
  copy: 'M5.5 5.5h7v8h-7zM3.5 10.5v-8h7',
  insert: 'M8 2.5v7M5 6.5l3 3 3-3M3 13h10',
  close: 'M4.5 4.5l7 7M11.5 4.5l-7 7',
  file: 'M4 2h5l3 3v9H4zM9 2v3h3',
  selection: 'M3 4.5h10M3 8h6.5M3 11.5h8',
  tool: 'M10 2.6a3 3 0 0 0-3.3 4L2.6 10.7a1.3 1.3 0 0 0 1.8 1.8l4.1-4.1a3 3 0 0 0 4-3.3l-1.7 1.7-1.6-.4-.4-1.6Z',
  chevron: 'M6 4l4 4-4 4',
  check: 'M3.5 8.5l3 3 6-6.5',
  error: 'M8 4.5v4.2M8 10.8v.4M8 1.8l6.5 11.7h-13Z',
  image: 'M2.5 3.5h11v9h-11zM2.5 10.5l3-3 3 3 2-2 3 3M10.5 6.2v.1',
  sparkle: 'M8 1.5 9.4 6.6 14.5 8 9.4 9.4 8 14.5 6.6 9.4 1.5 8 6.6 6.6Z',
  user: 'M8 8a2.7 2.7 0 1 0 0-5.4A2.7 2.7 0 0 0 8 8Zm-5 5.8c.4-2.6 2.4-4.2 5-4.2s4.6 1.6 5 4.2',
} as const;

export type IconName = keyof typeof PATHS;

const SVG = 'http://www.w3.org/2000/svg';

export function icon(name: IconName): SVGSVGElement {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 16 16');
  svg.setAttribute('class', `icon icon-${name}`);
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS(SVG, 'path');
  path.setAttribute('d', PATHS[name]);
  svg.append(path);
  return svg;
}
