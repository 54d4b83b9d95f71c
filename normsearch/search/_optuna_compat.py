"""The few things normsearch needs from Optuna beyond its documented user API, in one place.

Everything else talks to Optuna through ``Study.ask/tell/enqueue_trial/set_user_attr`` and the
``Trial`` objects ``ask()`` returns (``report``, ``should_prune``, ``set_user_attr``). What is left
here, each pinned by ``tests/search/test_optuna_compat.py`` to the Optuna version it was written
against (:data:`TESTED_WITH`):

- :func:`trial_of`: a live ``Trial`` handle for a trial number asked by *another* process or
  another recorder (Ray's driver-side searcher is pickled; a resumed run fails a dead worker's
  trial). ``optuna.trial.Trial(study, trial_id)`` is how ``Study.ask`` builds one, but Optuna
  documents the constructor as internal.
- :class:`Heartbeat`: ``RDBStorage.record_heartbeat`` for trials this process runs outside
  ``Study.optimize`` (the storage's heartbeat API is documented for ``optimize`` only), so
  :func:`ask` can fail a crashed worker's trials from another process.
- :func:`ask`: ``Study.ask`` after ``optuna.storages.fail_stale_trials`` (experimental), with
  the warnings both give outside ``Study.optimize`` silenced.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import optuna

__all__ = ["TESTED_WITH", "Heartbeat", "ask", "heartbeat_interval", "trial_of"]

#: Optuna versions (major, minor) these shims were checked against.
TESTED_WITH = ((4, 0), (5, 1))


def _storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage  # noqa: SLF001  (no public accessor in Optuna 4-5)


def trial_of(study: optuna.Study, number: int) -> optuna.Trial:
    """A ``Trial`` handle for trial ``number`` of ``study`` (any process may have asked it).

    Raises:
        KeyError: the study has no trial ``number``.
    """
    storage = _storage(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def heartbeat_interval(study: optuna.Study) -> Optional[int]:
    """The storage's heartbeat interval in seconds, ``None`` when heartbeats are off (or unsupported)."""
    storage = _storage(study)
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


class Heartbeat:
    """Daemon thread recording a storage heartbeat for each registered trial every ``interval`` s."""

    def __init__(self, study: optuna.Study, interval: float):
        self.storage, self.interval = _storage(study), interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="normsearch-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial: optuna.Trial) -> None:
        """Beat for ``trial`` now and every ``interval`` s until :meth:`discard`."""
        self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001  (Trial.number is not the storage id)
        with self._lock:
            self.trial_ids.add(trial._trial_id)  # noqa: SLF001

    def discard(self, trial: optuna.Trial) -> None:
        with self._lock:
            self.trial_ids.discard(trial._trial_id)  # noqa: SLF001

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` after failing RUNNING trials whose heartbeat stopped (as ``Study.optimize``
    does before each trial), without Optuna's warnings that heartbeats and ``fail_stale_trials``
    are meant for ``Study.optimize`` (the :class:`Heartbeat` here sends them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        optuna.storages.fail_stale_trials(study)
        return study.ask()
