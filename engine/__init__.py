"""Tramontane's inference engine: Mistral models in plain PyTorch. Tokens in, tokens out.

No LSP, no asyncio: callers run it on a thread and stop it with a `CancellationToken`.

Layout: `arch/` holds the architectures (configs, layers, caches, adapters), `checkpoints/` reads
and writes checkpoint folders and tokenizers, `runtime/` runs models (phases, generation loop,
compiled step, prefix cache, sampling), `model.py` ties a loaded network to its tokenizer.
"""

from .arch.config import TransformerConfig
from .cancel import CancellationToken
from .checkpoints.tokenizer import TextStream, encode_fim, find_tokenizer_file, load_tokenizer
from .errors import EngineError, GenerationError, ImageError, ModelLoadError
from .images import (
    ImageLimits,
    check_image,
    check_image_counts,
    image_from_data_uri,
    read_image,
    read_image_file,
)
from .model import Model, load
from .runtime.compiled import compile_decode_step, enable_fast_decode
from .runtime.generation import EndEvent, FinishReason, Stream, TokenEvent, generate, stream
from .runtime.prefix_cache import PrefixCache
from .runtime.sampling import SamplingParams

__all__ = [
    "CancellationToken",
    "EndEvent",
    "EngineError",
    "FinishReason",
    "GenerationError",
    "ImageError",
    "ImageLimits",
    "Model",
    "ModelLoadError",
    "PrefixCache",
    "SamplingParams",
    "Stream",
    "TextStream",
    "TokenEvent",
    "TransformerConfig",
    "check_image",
    "check_image_counts",
    "compile_decode_step",
    "enable_fast_decode",
    "encode_fim",
    "find_tokenizer_file",
    "generate",
    "image_from_data_uri",
    "load",
    "load_tokenizer",
    "read_image",
    "read_image_file",
    "stream",
]
