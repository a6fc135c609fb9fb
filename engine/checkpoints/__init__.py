"""Checkpoint folders and tokenizers: reading, writing, downloading, tiny random copies."""
