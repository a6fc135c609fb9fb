"""`tramontane`: complete, chat and generate from the command line; make tiny checkpoints and
download real ones.

Generated text goes to stdout and nothing else does, so it can be piped; status lines,
warnings and errors go to stderr. Prompts are built only by mistral-common (`encode_fim`,
`encode_chat_completion`), the way the models were trained.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TextIO

import torch
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from .arch.quant import QUANT_MODES
from .checkpoints import hub, tiny
from .checkpoints.files import DTYPE_NAMES
from .checkpoints.tokenizer import encode_fim
from .errors import EngineError, GenerationError
from .images import check_image_counts, read_image_file
from .model import Model, load
from .runtime.generation import EndEvent, TokenEvent, stream
from .runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

PROG = "tramontane"
MODEL_ENV = "TRAMONTANE_MODEL"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
Message = SystemMessage | UserMessage | AssistantMessage


class CliError(EngineError):
    """A command cannot run as asked. `exit_code` 2 marks a usage error, as argparse's."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# Prompts (mistral-common only)


def _tokenizer_version(model: Model) -> str:
    raw = model.tokenizer.instruct_tokenizer.tokenizer
    return str(getattr(raw.version, "value", raw.version))


def fim_prompt(model: Model, prefix: str, suffix: str) -> list[int]:
    try:
        return encode_fim(model.tokenizer, prefix, suffix)
    except GenerationError as e:
        raise CliError(f"{model.path}: {e}") from None


def chat_prompt(model: Model, messages: Sequence[Message]) -> list[int]:
    request = ChatCompletionRequest(messages=list(messages))
    try:
        return list(model.tokenizer.encode_chat_completion(request).tokens)
    except MistralCommonException as e:
        raise CliError(f"cannot encode the conversation: {e}") from None


def text_prompt(model: Model, text: str) -> list[int]:
    return list(model.tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False))


# ---------------------------------------------------------------------------------------------
# Shared steps


# SamplingParams' field -> the flag that sets it: errors name what the user typed.
SAMPLING_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature",
                  "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, checked by `SamplingParams` (its messages start with the field's
    name, given here as the flag's). `--max-tokens 0` is refused: it would print nothing."""
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens must be at least 1, got {args.max_tokens}", EXIT_USAGE)
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        if field in SAMPLING_FLAGS:
            message = SAMPLING_FLAGS[field] + message[len(field):]
        raise CliError(message, EXIT_USAGE) from None


def load_model(args: argparse.Namespace) -> Model:
    spec = args.model or os.environ.get(MODEL_ENV)
    if not spec:
        raise CliError(f"no model given: pass MODEL or set {MODEL_ENV}", EXIT_USAGE)
    model = load(hub.resolve_model(spec), device=args.device, dtype=args.dtype,
                 quantize=args.quantize)
    log.info("%r", model)
    return model


def read_text(path: str) -> str:
    """A file's text, or stdin's for "-"."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read ({e})") from None


def write_stream(events: Iterator[TokenEvent | EndEvent],
                 out: TextIO) -> tuple[list[TokenEvent], EndEvent]:
    """Print each text delta as it comes; return the token events and the end event."""
    tokens: list[TokenEvent] = []
    for event in events:
        if event.text:
            out.write(event.text)
            out.flush()
        if isinstance(event, EndEvent):
            return tokens, event
        tokens.append(event)
    raise AssertionError("the stream ended without an EndEvent")


def stats_line(end: EndEvent) -> str:
    prefill = end.prompt_tokens / end.prefill_seconds if end.prefill_seconds > 0 else 0.0
    decode = end.generated_tokens / end.decode_seconds if end.decode_seconds > 0 else 0.0
    return (f"prefill {end.prompt_tokens} tokens in {end.prefill_seconds:.2f} s "
            f"({prefill:.1f} tok/s), decode {end.generated_tokens} tokens in "
            f"{end.decode_seconds:.2f} s ({decode:.1f} tok/s), finish: {end.reason}")


def run(model: Model, prompt: list[int], params: SamplingParams, args: argparse.Namespace) -> int:
    """Stream a completion to stdout, or print it as one JSON object with `--json`."""
    out = sys.stdout
    if args.json:
        tokens, end = write_stream(stream(prompt, model, params), io.StringIO())
        text = "".join(t.text for t in tokens) + end.text
        json.dump({"prompt_tokens": prompt, "tokens": [t.token for t in tokens],
                   "logprobs": [t.logprob for t in tokens], "text": text,
                   "finish_reason": end.reason}, out)
        out.write("\n")
    else:
        _, end = write_stream(stream(prompt, model, params), out)
        if out.isatty():
            out.write("\n")
    out.flush()
    if args.stats:
        print(stats_line(end), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_complete(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if args.prefix_file == "-" and args.suffix_file == "-":
        raise CliError("only one of --prefix-file and --suffix-file can read stdin", EXIT_USAGE)
    prefix = args.prefix if args.prefix is not None else read_text(args.prefix_file)
    suffix = args.suffix if args.suffix is not None else (
        read_text(args.suffix_file) if args.suffix_file else "")
    model = load_model(args)
    return run(model, fim_prompt(model, prefix, suffix), params, args)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    text = args.prompt if args.prompt is not None else read_text(args.prompt_file)
    model = load_model(args)
    return run(model, text_prompt(model, text), params, args)


def _read_line(prompt: str) -> str | None:
    """One line of input without its newline, None at end of input.

    The prompt is shown only to a person: on stdout with line editing when both ends are a
    terminal, on stderr when only stdin is (stdout then goes to a file or a pipe).
    """
    if sys.stdin.isatty() and sys.stdout.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (gives input() line editing and history)
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
    if sys.stdin.isatty():
        sys.stderr.write(prompt)
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def read_images(paths: Sequence[str]) -> list[Image.Image]:
    """The `--image` files, each checked against the engine's limits before it is decoded."""
    check_image_counts([len(paths)])
    return [read_image_file(path) for path in paths]


def user_message(text: str, images: Sequence[Image.Image]) -> UserMessage:
    if not images:
        return UserMessage(content=text)
    return UserMessage(content=[*(ImageChunk(image=image) for image in images),
                                TextChunk(text=text)])


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    images = read_images(args.image or [])
    model = load_model(args)
    if images and not model.has_vision:
        raise CliError(f"{model.path}: this model has no vision encoder; --image needs a vision "
                       "model (Pixtral 12B, Mistral Small 3.1)")
    system: list[Message] = [SystemMessage(content=args.system)] if args.system else []
    history: list[Message] = list(system)
    if sys.stdin.isatty():
        attached = f" ({len(images)} image(s) go with your first message)" if images else ""
        print(f"chatting with {model.path.name}{attached}: /reset starts over, /exit or Ctrl-D "
              "quits", file=sys.stderr)
    while (line := _read_line(">>> ")) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(system)
            continue
        if not command:
            continue
        first = len(history) == len(system)
        history.append(user_message(line, images if first else ()))
        try:
            tokens, end = write_stream(stream(chat_prompt(model, history), model, params,
                                              images=images), sys.stdout)
        except KeyboardInterrupt:
            history.pop()
            print("\n(interrupted: reply dropped)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        reply = model.tokenizer.decode([t.token for t in tokens])
        if reply:
            history.append(AssistantMessage(content=reply))
        else:  # mistral-common refuses an empty assistant message: forget the turn
            history.pop()
            print("(empty reply: turn dropped)", file=sys.stderr)
        if args.stats:
            print(stats_line(end), file=sys.stderr)
    return 0


SHAPE_OPTIONS = {  # option dest -> tiny_config keyword
    "dim": "dim", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "head_dim": "head_dim", "hidden_dim": "hidden_dim", "sliding_window": "sliding_window",
}


ARCH_NAMES = {"transformer": "dense transformer", "mamba": "Mamba2",
              "pixtral": "Pixtral (vision)"}


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    """Write the checkpoint; a folder that already holds exactly what these options write
    (the weights are seeded: `make demo` wrote it, say) is left as it is, like `mkdir -p`."""
    folder = Path(args.dir).expanduser()
    shape = {kw: getattr(args, dest) for dest, kw in SHAPE_OPTIONS.items()
             if getattr(args, dest) is not None}
    if args.patch_merge and args.arch != "pixtral":
        raise CliError("--patch-merge needs --arch pixtral", EXIT_USAGE)
    tokenizer = args.tokenizer or ("tekken" if args.arch == "pixtral" else "v3")
    if args.arch == "pixtral" and tokenizer != "tekken":
        raise CliError("--arch pixtral needs the tekken tokenizer (its [IMG] tokens)",
                       EXIT_USAGE)
    if args.arch == "mamba":  # a Mamba2 has no attention: only its width and depth apply
        wrong = [f"--{dest.replace('_', '-')}" for dest, kw in SHAPE_OPTIONS.items()
                 if kw in shape and kw not in ("dim", "n_layers")]
        if wrong:
            raise CliError(f"--arch mamba takes only --dim and --layers, not {', '.join(wrong)}",
                           EXIT_USAGE)

    def write(target: Path) -> Path:
        try:
            return tiny.make_tiny(target, layout=args.layout, tokenizer=tokenizer,
                                  seed=args.seed, dtype=DTYPE_NAMES[args.dtype], arch=args.arch,
                                  patch_merge=args.patch_merge, **shape)
        except ValueError as e:  # TransformerConfig's checks of the shape options
            raise CliError(f"invalid shape: {e}", EXIT_USAGE) from None

    what = (f"a tiny {ARCH_NAMES[args.arch]} checkpoint ({args.layout} layout, "
            f"{tokenizer} tokenizer)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        with tempfile.TemporaryDirectory() as tmp:
            same = folder.is_dir() and _same_files(write(Path(tmp) / "tiny"), folder)
        if not same:
            raise CliError(f"{folder}: exists and holds something else than {what}; choose a "
                           "new folder")
        print(f"{folder} already holds {what}: left as it is", file=sys.stderr)
        path = folder
    else:
        path = write(folder)
        print(f"wrote {what} to {path}", file=sys.stderr)
    print("warning: its weights are random: everything it generates is noise (it is for "
          "trying the tools and for tests)", file=sys.stderr)
    print(path)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    path = hub.download(args.repo_id, revision=args.revision, target=args.dir,
                        layout=args.layout)
    print(f"downloaded {args.repo_id} to {path}", file=sys.stderr)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# Arguments


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a PyTorch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available (no GPU, driver or CUDA build)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("MPS is not available on this machine")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _version() -> str:
    try:
        return version("tramontane")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (model loading, downloads) to stderr")
    return common


def _model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "model", nargs="?", metavar="MODEL",
        help=f"checkpoint folder (native Mistral or Hugging Face layout), or the name of a model "
             f"fetched with `{PROG} download`; default: ${MODEL_ENV}")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="PyTorch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), metavar="DTYPE",
                        help=f"weight dtype: {', '.join(sorted(DTYPE_NAMES))} "
                             "(default: the checkpoint's)")
    parser.add_argument("--quantize", choices=QUANT_MODES,
                        help="weight-only quantization of the linear layers (transformers): "
                             "int8 (per-channel scales) or int4 (groups of 32); quantized on "
                             "the first load, then read from the user's cache folder")
    return parser


def _sampling_parser(max_tokens: int, temperature: float) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                       help=f"stop after N tokens (default: {max_tokens})")
    group.add_argument("--temperature", type=float, default=temperature, metavar="T",
                       help=f"0 = greedy (default: {temperature})")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P",
                       help="nucleus sampling: keep the most likely tokens up to mass P "
                            "(default: 1.0, all)")
    group.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="keep the K most likely tokens (default: 0, all)")
    group.add_argument("--seed", type=int, metavar="S",
                       help="random seed, for reproducible sampling")
    group.add_argument("--stats", action="store_true",
                       help="print token counts and speeds to stderr at the end")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Local code completion and chat on Mistral models, in plain PyTorch.",
        epilog=f"Generated text goes to stdout, everything else to stderr. Try it without "
               f"downloading anything: `{PROG} make-tiny /tmp/tiny && {PROG} complete /tmp/tiny "
               f"--prefix 'def f(' --suffix 'return x'` (a tiny model with random weights: "
               f"its output is noise).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, model = _common_parser(), _model_parser()

    p = commands.add_parser(
        "complete", parents=[common, model, _sampling_parser(64, 0.0)],
        help="fill in the middle: complete the code between a prefix and a suffix",
        description="Fill in the middle: stream the code that goes between PREFIX and SUFFIX "
                    "to stdout. The prompt is mistral-common's FIM encoding, so the model needs "
                    "a v3 or newer tokenizer (Codestral).")
    prefix = p.add_mutually_exclusive_group(required=True)
    prefix.add_argument("--prefix", metavar="TEXT", help="the code before the cursor")
    prefix.add_argument("--prefix-file", metavar="PATH",
                        help="read the prefix from PATH (- = stdin)")
    suffix = p.add_mutually_exclusive_group()
    suffix.add_argument("--suffix", metavar="TEXT",
                        help="the code after the cursor (default: '')")
    suffix.add_argument("--suffix-file", metavar="PATH",
                        help="read the suffix from PATH (- = stdin)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (prompt and generated token ids, log-probs, "
                        "text, finish reason) instead of streaming text")
    p.set_defaults(func=cmd_complete)

    p = commands.add_parser(
        "chat", parents=[common, model, _sampling_parser(512, 0.7)],
        help="chat with an instruct model, one user message per line of stdin",
        description="Chat: each line read from stdin is a user message; the reply streams to "
                    "stdout, followed by a newline. Works interactively and with piped input. "
                    "Ends at end of input or /exit; /reset forgets the conversation. The whole "
                    "conversation is encoded by mistral-common at each turn.")
    p.add_argument("--system", metavar="TEXT", help="a system prompt")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="attach an image (PNG, JPEG, WEBP, GIF) to the first message; repeat for "
                        "several (at most 8); needs a vision model (Pixtral)")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser(
        "generate", parents=[common, model, _sampling_parser(64, 0.0)],
        help="continue a plain text prompt (no chat template)",
        description="Plain continuation: encode TEXT with BOS and no template, stream the "
                    "continuation to stdout.")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from PATH (- = stdin)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (prompt and generated token ids, log-probs, "
                        "text, finish reason) instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser(
        "make-tiny", parents=[common],
        help="write a tiny checkpoint with random weights, for trying the tools and tests",
        description="Write a tiny checkpoint with random weights and a real Mistral tokenizer. "
                    "Everything it generates is noise; it runs the whole pipeline in seconds "
                    "without downloading anything. Prints the folder on stdout.")
    p.add_argument("dir", metavar="DIR", help="the folder to create (must be new or empty)")
    p.add_argument("--layout", choices=("native", "hf"), default="native",
                   help="native Mistral (params.json + consolidated.safetensors) or Hugging Face "
                        "(config.json + model.safetensors) (default: native)")
    p.add_argument("--tokenizer", choices=list(tiny.TOKENIZERS),
                   help="which mistral-common tokenizer to ship (default: v3, tekken for "
                        "pixtral; FIM needs v3+)")
    p.add_argument("--arch", choices=tiny.ARCHS, default="transformer",
                   help="dense transformer, Mamba2 as Codestral Mamba, or Pixtral (a dense "
                        "decoder with a vision encoder: `chat --image` works on it) "
                        "(default: transformer)")
    p.add_argument("--patch-merge", action="store_true",
                   help="with --arch pixtral: a patch merger, as Mistral Small 3.1 (14-pixel "
                        "patches merged 2x2) instead of Pixtral 12B (16-pixel patches)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", metavar="DTYPE",
                   help=f"weight dtype: {', '.join(sorted(DTYPE_NAMES))} (default: float32)")
    shape = p.add_argument_group("shape (defaults: dim 64, 2 layers, 4 heads, 2 KV heads, "
                                 "hidden 128, full attention)")
    shape.add_argument("--dim", type=_positive_int, metavar="N", help="model width")
    shape.add_argument("--layers", type=_positive_int, metavar="N", help="number of layers")
    shape.add_argument("--heads", type=_positive_int, metavar="N", help="attention heads")
    shape.add_argument("--kv-heads", type=_positive_int, metavar="N", help="key/value heads")
    shape.add_argument("--head-dim", type=_positive_int, metavar="N",
                       help="per-head width (default: dim / heads)")
    shape.add_argument("--hidden-dim", type=_positive_int, metavar="N",
                       help="feed-forward width")
    shape.add_argument("--sliding-window", type=_positive_int, metavar="N",
                       help="attend to the last N positions only")
    p.set_defaults(func=cmd_make_tiny)

    p = commands.add_parser(
        "download", parents=[common],
        help="download a checkpoint from the Hugging Face Hub",
        description="Download a model's safetensors weights (one layout: native if the "
                    "repository has it), configuration and tokenizer from the Hugging Face Hub; "
                    "never pickles. Gated repositories (most of mistralai's) need "
                    "`hf auth login` or HF_TOKEN. Prints the folder on stdout.")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. mistralai/Codestral-22B-v0.1")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--dir", metavar="DIR",
                   help=f"destination folder (default: {hub.models_dir()}/<repository name>)")
    p.add_argument("--layout", choices=("auto", "native", "hf"), default="auto",
                   help="which weights to fetch when the repository has both (default: auto, "
                        "native first)")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except EngineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at devnull so Python's final flush does
        # not fail again, as the Python documentation recommends.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
