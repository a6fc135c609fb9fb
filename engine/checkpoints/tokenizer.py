"""Tokenizer access: the checkpoint's mistral-common tokenizer, and exact incremental decoding.

Streaming text one token at a time cannot call `decode` per token: SentencePiece drops the
leading space of a decoded fragment, and a character split over byte-fallback tokens (`<0xF0>`
...) or over Tekken's byte-level tokens decodes to U+FFFD. Instead every token maps to its exact
bytes, and an incremental UTF-8 decoder emits a character only once all its bytes have arrived.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from mistral_common.exceptions import TokenizerException
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from ..errors import GenerationError, ModelLoadError

TOKENIZER_GLOBS = ("tekken.json", "tokenizer.model.v*", "*.model.v*", "tokenizer.model")


def find_tokenizer_file(folder: Path) -> Path:
    """The Mistral tokenizer file of a checkpoint folder (Tekken preferred, then newest SPM)."""
    for pattern in TOKENIZER_GLOBS:
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
    raise ModelLoadError(
        folder,
        "no Mistral tokenizer file (tekken.json or tokenizer.model.v1/v2/v3/v7); copy the one "
        "published with the model into this folder",
    )


def load_tokenizer(path: Path) -> MistralTokenizer:
    try:
        return MistralTokenizer.from_file(str(path))
    except (TokenizerException, ValueError, OSError, RuntimeError, KeyError) as e:
        raise ModelLoadError(path, f"cannot read the tokenizer ({e})") from None


def encode_fim(tokenizer: MistralTokenizer, prefix: str, suffix: str) -> list[int]:
    """`[BOS] [SUFFIX] suffix [PREFIX] prefix`, from mistral-common's `encode_fim`.

    v1 tokenizers refuse FIM; v2 ones "encode" it with `<unk>` in place of the [SUFFIX] and
    [PREFIX] tokens they lack, which would silently feed the model garbage: both are refused.
    """
    raw = tokenizer.instruct_tokenizer.tokenizer
    try:
        tokens = tokenizer.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
    except TokenizerException as e:
        tokens, reason = [], str(e)
    else:
        reason = "no [SUFFIX] and [PREFIX] tokens"
    if len(tokens) < 2 or tokens[1] == raw.unk_id:
        version = getattr(raw.version, "value", raw.version)
        raise GenerationError(
            f"this model's tokenizer ({version}) has no fill-in-the-middle ({reason}); use a FIM "
            "model with a v3 or newer tokenizer, such as Codestral")
    return list(tokens)


class TokenBytes(Protocol):
    def __call__(self, token_id: int) -> bytes: ...


def token_bytes_fn(tokenizer: MistralTokenizer) -> TokenBytes:
    """A function giving the exact bytes each token adds to the text (b"" for control tokens)."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    if isinstance(raw, Tekkenizer):

        @lru_cache(maxsize=65536)
        def tekken_bytes(token_id: int) -> bytes:
            return raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE)

        return tekken_bytes
    if isinstance(raw, SentencePieceTokenizer):
        # The SentencePieceProcessor: mistral-common exposes no byte view of its pieces.
        sp: Any = raw._model

        @lru_cache(maxsize=65536)
        def spm_bytes(token_id: int) -> bytes:
            if sp.is_byte(token_id):
                return bytes([int(sp.id_to_piece(token_id)[3:-1], 16)])
            if sp.is_control(token_id) or sp.is_unknown(token_id):
                return b""
            return sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")

        return spm_bytes
    raise TypeError(f"unsupported tokenizer {type(raw).__name__}")


class TextStream:
    """Turns generated token ids into UTF-8-safe text deltas."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self._bytes = token_bytes_fn(tokenizer)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token: "" while a character still lacks bytes."""
        return self._decoder.decode(self._bytes(token_id))

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
