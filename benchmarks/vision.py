"""Vision encoder time for one screenshot: mistral-common's preprocessing, then our tower, against
transformers' PixtralVisionModel with the same random weights.

Two towers: the tiny one of `make-tiny --arch pixtral` (dim 64, 2 layers), and one of Pixtral
12B's size (dim 1024, 24 layers, 16 heads, hidden 4096, 16-pixel patches: ~300M parameters),
random weights. A 1024x768 screenshot is 64x48 = 3072 patches.

    .venv/bin/python benchmarks/vision.py [--width 1024 --height 768] [--dtypes float32 bfloat16]
        [--towers tiny pixtral-12b] [--no-transformers]

transformers' eager attention materialises the (N, N) scores: in bfloat16 on the CPU that is
~20x slower than SDPA here, so a Pixtral-sized bfloat16 comparison takes many minutes
(`--no-transformers` times ours only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import transformers
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
from PIL import Image

from engine.arch.config import VisionConfig
from engine.arch.vision import VisionTower
from engine.checkpoints.dense import native_to_hf_rotary

TOWERS = {
    "tiny": VisionConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, patch_size=16,
                         image_size=1024),
    "pixtral-12b": VisionConfig(dim=1024, n_layers=24, n_heads=16, hidden_dim=4096,
                                patch_size=16, image_size=1024),
}
_HF_NAMES = {"attention.wq": "attention.q_proj", "attention.wk": "attention.k_proj",
             "attention.wv": "attention.v_proj", "attention.wo": "attention.o_proj",
             "feed_forward.w1": "feed_forward.gate_proj",
             "feed_forward.w2": "feed_forward.down_proj", "feed_forward.w3": "feed_forward.up_proj"}


def screenshot(width: int, height: int) -> Image.Image:
    """Flat UI colours with some noise: what a screenshot compresses like."""
    rng = np.random.default_rng(0)
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    pixels[: height // 10] = (40, 44, 52)
    pixels[height // 3: height // 2, width // 8: width // 2] = rng.integers(0, 256, (
        height // 2 - height // 3, width // 2 - width // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(tower: VisionTower) -> transformers.PixtralVisionModel:
    c = tower.config
    config = transformers.PixtralVisionConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, patch_size=c.patch_size, image_size=c.image_size,
        hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": c.rope_theta})
    model = transformers.PixtralVisionModel(config).eval()
    state = {}
    for name, w in tower.encoder.state_dict().items():
        for ours, theirs in _HF_NAMES.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = native_to_hf_rotary(w, c.n_heads, c.head_dim)
        state[name] = w
    model.load_state_dict(state, strict=True)
    return model


def best_of(n: int, fn: object) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    parser.add_argument("--no-transformers", dest="reference", action="store_false",
                        help="time our encoder only")
    args = parser.parse_args()
    image = screenshot(args.width, args.height)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"a {args.width}x{args.height} screenshot")
    for name in args.towers:
        config = TOWERS[name]
        encoder = ImageEncoder(ImageConfig(config.patch_size, config.image_size),
                               SpecialImageIDs(img=10, img_break=12, img_end=13))
        prep = best_of(3, lambda: encoder(ImageChunk(image=image)))  # noqa: B023
        pixels = torch.from_numpy(encoder(ImageChunk(image=image)).image)
        torch.manual_seed(0)
        tower = VisionTower(config, out_dim=config.dim).eval().requires_grad_(False)
        params = sum(p.numel() for p in tower.encoder.parameters())
        print(f"\n{name}: {params / 1e6:.1f}M encoder parameters, {pixels.shape[1]}x"
              f"{pixels.shape[2]} pixels -> {tower.tokens_per_image(*pixels.shape[1:])} "
              f"patches; mistral-common preprocessing {prep * 1000:.0f} ms")
        hf = reference(tower) if args.reference else None
        runs = 1 if config.n_layers > 4 else 5
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            tower.to(dtype)
            with torch.inference_mode():
                tower.encoder([pixels])  # warm-up
                ours = best_of(runs, lambda: tower.encoder([pixels]))  # noqa: B023
                if hf is None:
                    print(f"  {dtype_name:>8}: ours {ours:7.2f} s")
                    continue
                hf.to(dtype)
                hf(pixels[None].to(dtype))
                theirs = best_of(runs, lambda: hf(pixels[None].to(dtype)))  # noqa: B023
            print(f"  {dtype_name:>8}: ours {ours:7.2f} s, transformers (eager) {theirs:7.2f} s, "
                  f"ratio {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
