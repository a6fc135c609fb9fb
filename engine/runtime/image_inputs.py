"""A request's images, made ready for the prefill: pixels, checks, content keys, embeddings.

The prompt already holds each image's tokens, as mistral-common's `encode_chat_completion` emits
them: per row of patches, one `[IMG]` per patch then `[IMG_BREAK]`, the last one replaced by
`[IMG_END]`. The images' pixels come from the same mistral-common `ImageEncoder` (the tokenizer's;
never our own resize or normalisation), which also gives the tokens each image should have: the
prompt's image blocks are checked against them, so a prompt and its images cannot disagree
silently.

Then, once per request and before the prefill, the vision tower encodes every image whose
`[IMG]` positions are still to be computed (all of them; those a prefix cache already holds are
skipped) in one call, and `override(begin, end)` gives the embeddings that replace the token
embeddings of the `[IMG]` positions of each prefill chunk.

`cache_tokens` is what a prefix cache compares: the prompt with each `[IMG]` replaced by
(image content hash, patch index). Two screenshots of the same size give the same token ids but
different hashes, so a cached prefix stops at the first patch of the first image that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from mistral_common.protocol.instruct.chunk import ImageChunk
from PIL import Image

from ..arch.transformer import EmbeddingOverride
from ..errors import GenerationError, ImageError
from ..images import DEFAULT_LIMITS, ImageLimits, check_image

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.image import ImageEncoder

    from ..model import Model


@dataclass
class _Image:
    pixels: torch.Tensor  # (C, H, W), float32, as mistral-common made it
    tokens: list[int]  # its [IMG]/[IMG_BREAK]/[IMG_END] tokens
    key: bytes  # hash of the pixels
    start: int  # index of its first [IMG] in the row's `positions`
    count: int  # its [IMG] tokens


@dataclass
class _Row:
    positions: torch.Tensor  # (n,) prompt positions of the [IMG] tokens, ascending
    images: list[_Image]
    features: torch.Tensor | None = None  # (n, dim) once encoded
    position_list: list[int] = field(default_factory=list)


def _image_encoder(model: Model) -> ImageEncoder:
    encoder = getattr(model.tokenizer.instruct_tokenizer, "image_encoder", None)
    if encoder is None or not model.has_vision:
        raise GenerationError("this model has no vision encoder: images are not supported")
    return encoder  # type: ignore[no-any-return]


def _image_blocks(prompt: Sequence[int], img: int, brk: int, end: int) -> list[list[int]]:
    """The prompt's image blocks: runs of image tokens, each closed by `[IMG_END]`."""
    blocks: list[list[int]] = []
    current: list[int] = []
    for t in prompt:
        if t in (img, brk, end):
            current.append(t)
            if t == end:
                blocks.append(current)
                current = []
        elif current:
            blocks.append(current)  # unterminated: compared (and refused) below
            current = []
    if current:
        blocks.append(current)
    return blocks


def _grid(tokens: Sequence[int], img: int) -> str:
    rows = max(1, len(tokens) - sum(t == img for t in tokens))
    return f"{sum(t == img for t in tokens) // rows}x{rows} patches"


class RequestImages:
    """The images of a batch of prompts (one list per prompt, in the order of their tokens)."""

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]],
                 images: Sequence[Sequence[Image.Image]] | None,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.model = model
        if images is not None and len(images) != len(prompts):
            raise GenerationError(f"images must hold one list per prompt: {len(prompts)} "
                                  f"prompts, {len(images)} lists")
        if not model.has_vision:
            if images is not None and any(images):
                raise GenerationError("this model has no vision encoder: images are not "
                                      "supported")
            self.rows: list[_Row] = []
            return
        encoder = _image_encoder(model)
        ids = encoder.special_ids
        self.rows = []
        for i, prompt in enumerate(prompts):
            row_images = list(images[i]) if images is not None else []
            if len(row_images) > limits.max_images_per_conversation:
                raise ImageError(f"prompt {i} has {len(row_images)} images; at most "
                                 f"{limits.max_images_per_conversation} per conversation")
            encoded = [self._encode(encoder, image, i, j, limits)
                       for j, image in enumerate(row_images)]
            positions = [p for p, t in enumerate(prompt) if t == ids.img]
            want = sum(image.count for image in encoded)
            if len(positions) != want:
                raise GenerationError(
                    f"prompt {i} has {len(positions)} [IMG] tokens but its {len(encoded)} "
                    f"image(s) make {want} patches: encode the prompt and the images together "
                    "(mistral-common's encode_chat_completion)")
            blocks = _image_blocks(prompt, ids.img, ids.img_break, ids.img_end)
            for j, image in enumerate(encoded):
                if j >= len(blocks) or blocks[j] != image.tokens:
                    got = _grid(blocks[j], ids.img) if j < len(blocks) else "nothing"
                    raise GenerationError(
                        f"image {j} of prompt {i} is {_grid(image.tokens, ids.img)}, but its "
                        f"place in the prompt holds tokens for {got}: pass the images in the "
                        "order of their tokens")
            start = 0
            for image in encoded:
                image.start = start
                start += image.count
            self.rows.append(_Row(torch.tensor(positions, dtype=torch.long), encoded,
                                  position_list=positions))

    @staticmethod
    def _encode(encoder: ImageEncoder, image: object, prompt: int, index: int,
                limits: ImageLimits) -> _Image:
        if not isinstance(image, Image.Image):
            raise ImageError(f"image {index} of prompt {prompt} is a {type(image).__name__}, "
                             "not a PIL image")
        try:
            check_image(image, limits)
            encoding = encoder(ImageChunk(image=image))
        except ImageError as e:
            raise ImageError(f"image {index} of prompt {prompt}: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:  # a lazily opened file that is corrupt
            raise ImageError(f"image {index} of prompt {prompt} cannot be decoded: {e}") from None
        pixels = torch.from_numpy(encoding.image)
        key = hashlib.blake2b(encoding.image.tobytes(), digest_size=16,
                              person=str(tuple(pixels.shape)).encode()[:16]).digest()
        return _Image(pixels, list(encoding.tokens), key, 0,
                      sum(t == encoder.special_ids.img for t in encoding.tokens))

    def __bool__(self) -> bool:
        return any(row.images for row in self.rows)

    @property
    def count(self) -> int:
        return sum(len(row.images) for row in self.rows)

    def first_position(self, row: int) -> int | None:
        """The prompt position of row `row`'s first `[IMG]` token, None without images."""
        positions = self.rows[row].position_list if self.rows else []
        return positions[0] if positions else None

    def encode(self, starts: Sequence[int]) -> int:
        """Run the vision tower, once, on every image with an `[IMG]` at or after its row's
        `starts` (earlier positions come from a prefix cache). Returns the images encoded."""
        todo: list[tuple[_Row, _Image]] = []
        for row, start in zip(self.rows, starts, strict=True):
            for image in row.images:
                if row.position_list[image.start + image.count - 1] >= start:
                    todo.append((row, image))
        if not todo:
            return 0
        device, dtype = self.model.device, self.model.dtype
        features = self.model.encode_images([image.pixels for _, image in todo])
        for row in self.rows:
            if row.images:
                row.features = torch.zeros(len(row.position_list), self.model.config.dim,
                                           device=device, dtype=dtype)
        for (row, image), f in zip(todo, features, strict=True):
            assert row.features is not None
            row.features[image.start:image.start + image.count] = f
        return len(todo)

    def override(self, begin: int, end: int) -> EmbeddingOverride | None:
        """The embeddings of the `[IMG]` positions in [begin, end) of every row, for a prefill
        chunk whose row b holds prompt positions begin..end-1; None when there are none."""
        if not self:
            return None
        masks, values = [], []
        for row in self.rows:
            mask = torch.zeros(end - begin, dtype=torch.bool)
            if row.images and row.features is not None:
                inside = (row.positions >= begin) & (row.positions < end)
                mask[row.positions[inside] - begin] = True
                values.append(row.features[inside.to(row.features.device)])
            masks.append(mask)
        if not values or not any(v.shape[0] for v in values):
            return None
        device = self.model.device
        return EmbeddingOverride(torch.stack(masks).to(device), torch.cat(values))

    def has_images_in(self, begin: int, end: int) -> bool:
        """Whether any row has an `[IMG]` position in [begin, end)."""
        return any(row.images and any(begin <= p < end for p in row.position_list)
                   for row in self.rows)

    def cache_tokens(self, row: int, prompt: Sequence[int]) -> list[Hashable]:
        """The prompt as a prefix cache compares it: each `[IMG]` becomes (content hash,
        patch index), so equal token ids with other pixels never match."""
        out: list[Hashable] = list(prompt)
        if not self.rows:
            return out
        r = self.rows[row]
        for image in r.images:
            for j in range(image.count):
                out[r.position_list[image.start + j]] = (image.key, j)
        return out
