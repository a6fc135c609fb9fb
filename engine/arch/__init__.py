"""The architectures: configs, layers, caches and adapters, one family per module."""
