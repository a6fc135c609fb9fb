"""LocalBackend: prefix caches and the compiled decode step follow the prompt budgets."""

from __future__ import annotations

import engine
from lsp_server.backend import REWIND, GenerationRequest, LocalBackend, context_tokens
from lsp_server.settings import CacheSettings, CompletionSettings
from tests.conftest import CheckpointFactory

SMALL = CompletionSettings(prefix_tokens=100, suffix_tokens=50, max_tokens=16)
LARGE = CompletionSettings(prefix_tokens=600, suffix_tokens=50, max_tokens=16)


def test_context_tokens_round_the_budgets_up_to_256() -> None:
    assert context_tokens(SMALL) == 256  # 100 + 50 + 16 + 16 special tokens
    assert context_tokens(LARGE) == 768
    assert context_tokens(CompletionSettings()) == 2304  # the defaults: 1536 + 512 + 128 + 16


def test_new_budgets_resize_the_caches_and_rebuild_the_decode_step(
        make_checkpoint: CheckpointFactory) -> None:
    model = engine.load(make_checkpoint("native", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        hidden_dim=64))
    backend = LocalBackend.create(model, SMALL, CacheSettings(budget_mib=64), compile=False)
    backend.compile(SMALL, eager=True)
    assert backend.prefix_cache is not None and backend.prefix_cache.max_seq_len == 256
    assert model.decoder is not None and model.decoder.max_seq_len == 256
    backend.configure_cache(LARGE, CacheSettings(budget_mib=64))
    assert backend.prefix_cache.max_seq_len == 768
    assert model.decoder.max_seq_len == 768 and model.decoder.rewind == REWIND
    assert not model.decoder.compiled
    # The requests' caches have the decoder's geometry: decoding takes the compiled path.
    assert model.decoder.accepts(backend.prefix_cache.new_cache())
    backend.configure_cache(LARGE, CacheSettings(enabled=False))
    assert backend.prefix_cache is None


def test_documents_and_adapters_get_their_own_caches(make_checkpoint: CheckpointFactory) -> None:
    model = engine.load(make_checkpoint("native", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        hidden_dim=64))
    backend = LocalBackend.create(model, SMALL, CacheSettings(budget_mib=64), compile=False)
    sampling = engine.SamplingParams(max_tokens=2)
    for uri in ("file:///a.py", "file:///b.py"):
        list(backend.stream(GenerationRequest([1, 5, 6, 7], sampling, uri),
                            engine.CancellationToken()))
    assert backend.prefix_cache is not None
    assert backend.prefix_cache.cached_keys() == ["file:///a.py", "file:///b.py"]
    backend.forget("file:///a.py")
    assert backend.prefix_cache.cached_keys() == ["file:///b.py"]
