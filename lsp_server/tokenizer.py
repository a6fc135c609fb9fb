"""The prompt side of a mistral-common tokenizer: token counts for the prompt windows, the FIM
prompt, chat prompts. Every prompt is mistral-common's encoding, never a hand-written template.

The local backend's comes from the model folder; a remote backend's from the `backend.tokenizer`
setting (the served model's tokenizer file).
"""

from __future__ import annotations

import re
from functools import cached_property

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine

# Lone UTF-16 surrogates (a JSON `\ud800` reaches Python as such a code point): no tokenizer can
# encode them. Prompts see U+FFFD instead; the documents themselves stay exact.
_SURROGATE = re.compile("[\ud800-\udfff]")


def prompt_text(text: str) -> str:
    """`text` as a tokenizer can take it (lone surrogates become U+FFFD)."""
    return _SURROGATE.sub("\ufffd", text)


class PromptTokenizer:
    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self.mistral = tokenizer
        self._raw = tokenizer.instruct_tokenizer.tokenizer

    def count(self, text: str) -> int:
        """Tokens of `text` inside a prompt (no BOS/EOS)."""
        return len(self._raw.encode(prompt_text(text), bos=False, eos=False)) if text else 0

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """`[BOS] [SUFFIX] suffix [PREFIX] prefix`; `engine.GenerationError` for a tokenizer
        without FIM."""
        return engine.encode_fim(self.mistral, prompt_text(prefix), prompt_text(suffix))

    @cached_property
    def version(self) -> str:
        return str(getattr(self._raw.version, "value", self._raw.version))
