"""Backends: what runs the model for the server (`base.py`: the interface; `local.py`: the
in-process engine; `http.py` and the wire formats: remote servers)."""
