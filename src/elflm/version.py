"""The elflm version (read by pyproject.toml and recorded in the files elflm writes)."""

__version__ = "0.1.0"
