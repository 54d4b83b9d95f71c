"""normsearch: search which normalization layer each layer of a CNN should use."""

__version__ = "0.1.0"
