"""Tramontane's language server: editor context -> FIM prompts -> the engine -> completions."""

__version__ = "0.1.0"
