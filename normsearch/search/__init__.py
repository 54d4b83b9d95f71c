"""Search backends and the study they write.

A backend is one module with a :class:`Backend` subclass registered under a name
(:func:`register_backend`); :func:`list_backends` gives the names the configuration accepts.
Every trial of every backend is written through a :class:`TrialRecorder`, the study's only writer.
"""

from normsearch.search.base import Backend
from normsearch.search.recorder import TrialRecorder
from normsearch.search.registry import get_backend, list_backends, register_backend

__all__ = ["Backend", "TrialRecorder", "get_backend", "list_backends", "register_backend"]
