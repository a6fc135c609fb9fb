"""Which tokenizer a remote backend builds its prompts with.

The server cuts the prompt windows by token counts and, for vLLM, sends the FIM prompt as token
ids: the tokenizer must be the served model's own, or the ids mean other text. So:

- `backend.tokenizer` names it: a tokenizer file (`tekken.json`, `tokenizer.model.v3`) or a
  folder holding one, found as the engine finds a checkpoint's (Tekken first, then the newest
  SentencePiece version);
- otherwise, when `backend.model` names a known Mistral model, the tokenizer that mistral-common
  ships for it (its `data/` folder: no download). The table below lists the open-weight models
  whose tokenizer is one of those files; a served name matches if it starts with an entry once
  lowercased, an organisation prefix (`mistralai/`) dropped;
- Mistral's API builds the FIM prompt itself from text: there the tokenizer only sizes the
  windows, and the Codestral models it serves under other names (`codestral-latest`,
  `codestral-2501`, ...) are counted with Codestral 22B's v3 tokenizer. Their own tokenizers are
  not published; counts may differ by a few percent, which moves a window's edge by a line.
- anything else is an error that asks for the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import mistral_common

import engine

from ..tokenizer import PromptTokenizer
from .base import BackendError

V3 = "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN_NEMO = "tekken_240718.json"
TEKKEN_PIXTRAL = "tekken_240911.json"

# (served-name prefix, file in mistral-common's data folder); the first match wins.
KNOWN_MODELS: tuple[tuple[str, str], ...] = (
    ("codestral-22b", V3),
    ("codestral-2405", V3),
    ("mamba-codestral-7b", V3),
    ("codestral-mamba", V3),
    ("mistral-7b-instruct-v0.3", V3),
    ("mistral-7b-v0.3", V3),
    ("mixtral-8x22b", V3),
    ("open-mixtral-8x22b", V3),
    ("mistral-nemo", TEKKEN_NEMO),
    ("open-mistral-nemo", TEKKEN_NEMO),
    ("ministral-8b", TEKKEN_NEMO),
    ("pixtral-12b", TEKKEN_PIXTRAL),
)
# The name our deploy/compose.yaml serves Codestral 22B under.
EXACT_MODELS = {"codestral": V3}
# Mistral's API only: served Codestral models whose tokenizer is not published.
API_CODESTRAL = re.compile(r"codestral(-latest|-\d{4})?$")


def data_folder() -> Path:
    return Path(mistral_common.__file__).resolve().parent / "data"


def normalized(model: str) -> str:
    return model.strip().lower().rsplit("/", 1)[-1]


def shipped_tokenizer(model: str, *, text_fim: bool) -> Path | None:
    """mistral-common's file for `model`, or None if it is not a model we know. `text_fim`: the
    backend sends the FIM prompt as text (Mistral's API), so the tokenizer only counts."""
    name = normalized(model)
    found = EXACT_MODELS.get(name) or next(
        (file for prefix, file in KNOWN_MODELS if name.startswith(prefix)), None)
    if found is None and text_fim and API_CODESTRAL.fullmatch(name):
        found = V3
    return data_folder() / found if found is not None else None


def load(setting: str | None, model: str, *, text_fim: bool) -> tuple[PromptTokenizer, Path]:
    """Blocking (reads a file): the prompt tokenizer and where it came from."""
    if setting is not None:
        path = Path(setting).expanduser()
        try:
            file = engine.find_tokenizer_file(path) if path.is_dir() else path
        except engine.ModelLoadError as e:
            raise BackendError(f"backend.tokenizer {setting!r}: {e.problem}") from None
        if not file.is_file():
            raise BackendError(f"backend.tokenizer {setting!r} is not a tokenizer file or a "
                               "folder holding one")
    else:
        shipped = shipped_tokenizer(model, text_fim=text_fim)
        if shipped is None:
            raise BackendError(
                f"no tokenizer known for the served model {model!r}: set backend.tokenizer to "
                "its tokenizer file (tekken.json or tokenizer.model.v3) or its model folder")
        if not shipped.is_file():
            raise BackendError(f"mistral-common {mistral_common.__version__} does not ship "
                               f"{shipped.name}: set backend.tokenizer")
        file = shipped
    try:
        return PromptTokenizer(engine.load_tokenizer(file)), file
    except engine.ModelLoadError as e:
        raise BackendError(f"backend.tokenizer {str(file)!r}: {e.problem}") from None
