"""Checkpoints from the Hugging Face Hub: pick the files a model needs, download them, find them.

A Mistral repository often holds the weights twice, as `consolidated.safetensors` (native) and
as `model-0000N-of-0000M.safetensors` (Hugging Face). We list the repository first and fetch
one layout only, never pickles (`.bin`, `.pt`): half the bytes of a blanket `*.safetensors`
pattern, at the cost of one more request.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import platformdirs
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import EngineError

log = logging.getLogger(__name__)

TOKENIZER_PATTERNS = ("tekken.json", "tokenizer.model*")
NATIVE_PATTERNS = ("params.json", "consolidated*.safetensors")
HF_PATTERNS = ("config.json", "model*.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class DownloadError(EngineError):
    """A checkpoint cannot be fetched; the message says why in one line."""


def models_dir() -> Path:
    """Where `download` puts models by default (e.g. ~/.local/share/tramontane/models)."""
    return Path(platformdirs.user_data_dir("tramontane")) / "models"


def default_target(repo_id: str) -> Path:
    return models_dir() / repo_id.rstrip("/").split("/")[-1]


def resolve_model(spec: str | Path) -> Path:
    """A model argument as a folder: a path if it exists, else a model `download` fetched.

    `mistralai/Codestral-22B-v0.1` and `Codestral-22B-v0.1` both find
    `models_dir()/Codestral-22B-v0.1`. Anything else comes back as given, so the loader's error
    names what the user typed.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if text.count("/") <= 1 and not text.startswith((".", "/", "~")):
        candidate = default_target(text)
        if candidate.is_dir():
            return candidate
    return path


def _top_level(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if len(PurePosixPath(f).parts) == 1)


def _matching(files: list[str], patterns: Iterable[str]) -> list[str]:
    return [f for f in files if any(fnmatch(f, p) for p in patterns)]


def choose_files(repo_id: str, files: Iterable[str], layout: str = "auto") -> list[str]:
    """The files of a repository listing to download: one weight layout plus the tokenizer.

    `layout` is "native", "hf" or "auto" (native when the repository has it: it needs no
    renaming and ships Mistral's own tokenizer file).
    """
    if layout not in ("auto", "native", "hf"):
        raise ValueError(f"layout must be 'auto', 'native' or 'hf', got {layout!r}")
    top = _top_level(files)
    native = _matching(top, NATIVE_PATTERNS)
    hf = _matching(top, HF_PATTERNS)
    has_native = "params.json" in native and any(f.endswith(".safetensors") for f in native)
    has_hf = "config.json" in hf and any(f.endswith(".safetensors") for f in hf)
    if layout == "native" and not has_native:
        raise DownloadError(f"{repo_id} has no native checkpoint (params.json and "
                            "consolidated*.safetensors)")
    if layout == "hf" and not has_hf:
        raise DownloadError(f"{repo_id} has no Hugging Face checkpoint (config.json and "
                            "model*.safetensors)")
    if not (has_native or has_hf):
        if any(f.endswith(PICKLE_SUFFIXES) for f in top):
            raise DownloadError(f"{repo_id} has only pickle weights (.bin/.pt), which tramontane "
                                "refuses to load (they can run arbitrary code)")
        raise DownloadError(f"{repo_id} has no safetensors checkpoint (params.json or "
                            "config.json next to *.safetensors)")
    chosen = native if (layout == "native" or (layout == "auto" and has_native)) else hf
    tokenizers = _matching(top, TOKENIZER_PATTERNS)
    if not tokenizers:
        log.warning("%s has no Mistral tokenizer file (tekken.json or tokenizer.model*): copy "
                    "the one published with the model into the folder before using it", repo_id)
    return sorted(set(chosen) | set(tokenizers))


def _transfer_errors() -> tuple[type[Exception], ...]:
    """Errors of the layers below huggingface_hub that reach us unwrapped.

    `HfApi.model_info` lets the HTTP client's transport errors through: requests for
    huggingface_hub 0.x, httpx for 1.x, httpx2 for 2.x. Recent versions fetch through hf_xet and
    raise `XetDownloadError`. We name whichever exist rather than catching every exception, so
    a bug still shows its traceback.
    """
    found: list[type[Exception]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException"),
                         ("huggingface_hub.errors", "XetDownloadError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _explain(repo_id: str, revision: str | None, folder: Path, error: Exception) -> str:
    """One line for a failed download (the Hub's own messages span several lines)."""
    if isinstance(error, GatedRepoError):
        return (f"{repo_id} is gated: accept its conditions on its Hugging Face page, then log in "
                "(`hf auth login`) or set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return f"{repo_id} not found on the Hugging Face Hub (or private: log in or set HF_TOKEN)"
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE is set)"
    if isinstance(error, HFValidationError):
        return f"{repo_id!r} is not a valid repository id ({_one_line(error)})"
    if isinstance(error, HfHubHTTPError):
        return f"cannot download {repo_id}: {_one_line(error)}"
    if isinstance(error, (LocalEntryNotFoundError, *_transfer_errors())):
        return (f"cannot download {repo_id}: the Hugging Face Hub is unreachable "
                f"({_one_line(error)}); check the network connection, proxy or HF_ENDPOINT")
    return f"cannot download {repo_id} into {folder}: {_one_line(error)}"


def download(repo_id: str, revision: str | None = None, target: str | Path | None = None,
             layout: str = "auto") -> Path:
    """Download a checkpoint's weights and tokenizer into `target` and return the folder.

    `target` defaults to `default_target(repo_id)`. huggingface_hub shows progress bars on
    stderr, resumes interrupted downloads and skips files already in the folder. Its request
    timeouts apply (10 s by default; HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT): an
    unreachable Hub fails at once, a silent network after the timeout.
    """
    folder = Path(target).expanduser() if target is not None else default_target(repo_id)
    # The Hub's errors are OSError subclasses (so are disk errors), an invalid id is a
    # ValueError subclass; anything else is a bug and keeps its traceback.
    expected: tuple[type[Exception], ...] = (OSError, HFValidationError, *_transfer_errors())
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = choose_files(repo_id, (s.rfilename for s in info.siblings or ()), layout)
        log.info("downloading %s from %s into %s", ", ".join(files), repo_id, folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Pin the commit just listed, so the files fetched are the files chosen.
        path = snapshot_download(repo_id, revision=info.sha or revision, local_dir=folder,
                                 allow_patterns=files)
    except expected as e:
        raise DownloadError(_explain(repo_id, revision, folder, e)) from None
    return Path(path)
