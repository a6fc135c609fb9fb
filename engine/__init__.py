"""Tramontane's inference engine: Mistral models in plain PyTorch. Tokens in, tokens out.

No LSP, no asyncio: callers run it on a thread and stop it with a `CancellationToken`.
"""

from .cancel import CancellationToken
from .config import TransformerConfig
from .errors import EngineError, GenerationError, ModelLoadError
from .generate import EndEvent, FinishReason, TokenEvent, generate, stream
from .loading import load
from .model import Model
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .tokenizer import TextStream, encode_fim

__all__ = [
    "CancellationToken",
    "EndEvent",
    "EngineError",
    "FinishReason",
    "GenerationError",
    "Model",
    "ModelLoadError",
    "PrefixCache",
    "SamplingParams",
    "TextStream",
    "TokenEvent",
    "TransformerConfig",
    "encode_fim",
    "generate",
    "load",
    "stream",
]
