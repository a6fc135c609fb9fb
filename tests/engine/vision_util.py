"""Helpers of the vision tests: images, prompts made by mistral-common, the transformers
reference (Llava for Pixtral 12B's layout, Mistral3 for Mistral Small 3.1's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

import engine


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels (so that two images of one size differ everywhere)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def image_prompt(model: engine.Model, images: Sequence[Image.Image],
                 text: str = "What is in these images?") -> tuple[list[int], list[np.ndarray]]:
    """One user message: the images, each followed by a line of text; mistral-common's tokens
    and preprocessed pixels (C, H, W)."""
    content: list[ImageChunk | TextChunk] = []
    for i, image in enumerate(images):
        content += [ImageChunk(image=image), TextChunk(text=f"Image {i + 1}.")]
    content.append(TextChunk(text=text))
    encoded = model.tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=content)]))
    return list(encoded.tokens), list(encoded.images)


def hf_model(folder: Path) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = (transformers.Mistral3ForConditionalGeneration if config.model_type == "mistral3"
           else transformers.LlavaForConditionalGeneration)
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def hf_pixels(pixels: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Images of different sizes as transformers takes them: zero-padded to the largest, and
    their sizes."""
    if not pixels:
        return {}
    height = max(p.shape[1] for p in pixels)
    width = max(p.shape[2] for p in pixels)
    batch = torch.zeros(len(pixels), 3, height, width)
    for i, p in enumerate(pixels):
        batch[i, :, : p.shape[1], : p.shape[2]] = torch.from_numpy(p)
    return {"pixel_values": batch,
            "image_sizes": torch.tensor([[p.shape[1], p.shape[2]] for p in pixels])}


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int],
              pixels: Sequence[np.ndarray], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their log-probs (from the raw logits)."""
    out = model.generate(
        input_ids=torch.tensor([prompt]), **hf_pixels(pixels), max_new_tokens=n,
        min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item()
                for s, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs
