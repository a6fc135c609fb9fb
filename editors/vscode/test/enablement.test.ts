/** `tramontane.enable` and the toggle commands. */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  describe as describeState,
  enableMap,
  isEnabled,
  toggleEverywhere,
  toggleLanguage,
} from '../src/core/enablement';

describe('enablement', () => {
  test('a language entry wins over "*", and everything is on by default', () => {
    const map = { '*': true, markdown: false };
    assert.equal(isEnabled(map, 'python'), true);
    assert.equal(isEnabled(map, 'markdown'), false);
    assert.equal(isEnabled({}, 'python'), true);
    assert.equal(isEnabled({ '*': false, rust: true }, 'rust'), true);
    assert.equal(isEnabled({ '*': false, rust: true }, 'go'), false);
  });

  test('the setting is read leniently', () => {
    assert.deepEqual(enableMap(undefined), { '*': true });
    assert.deepEqual(enableMap(['python']), { '*': true });
    assert.deepEqual(enableMap({ '*': true, go: 'no', rust: false }), { '*': true, rust: false });
  });

  test('toggling one language flips it and drops entries equal to "*"', () => {
    assert.deepEqual(toggleLanguage({ '*': true }, 'markdown'), { '*': true, markdown: false });
    assert.deepEqual(toggleLanguage({ '*': true, markdown: false }, 'markdown'), { '*': true });
    assert.deepEqual(toggleLanguage({ '*': false }, 'rust'), { '*': false, rust: true });
    assert.deepEqual(toggleLanguage({}, 'go'), { go: false });
  });

  test('toggling everywhere keeps the languages turned off one by one', () => {
    const off = toggleEverywhere({ '*': true, markdown: false, rust: true });
    assert.deepEqual(off, { '*': false, markdown: false });
    assert.equal(isEnabled(off, 'rust'), false);
    const on = toggleEverywhere(off);
    assert.deepEqual(on, { '*': true, markdown: false });
    assert.equal(isEnabled(on, 'python'), true);
    assert.equal(isEnabled(on, 'markdown'), false);
  });

  test('what the menu and status bar say', () => {
    assert.equal(describeState({ '*': true }, 'python'), 'on');
    assert.equal(describeState({ '*': true, python: false }, 'python'), 'off for python');
    assert.equal(describeState({ '*': false }, 'python'), 'off everywhere');
    assert.equal(describeState({ '*': false }, undefined), 'off everywhere');
  });
});
