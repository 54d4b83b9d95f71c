"""ENAS (Pham et al., 2018) over per-layer normalizer choices: an LSTM controller samples a child
configuration, the shared weights of a supernet train it, REINFORCE updates the controller; the best
children are then retrained from scratch as ordinary trials of the study.

- :mod:`~normsearch.search.enas.space`: the decisions the controller makes (:class:`EnasSpace`);
- :mod:`~normsearch.search.enas.controller`: the LSTM policy and its REINFORCE trainer;
- :mod:`~normsearch.search.enas.supernet`: the shared weights (every option of every slot);
- :mod:`~normsearch.search.enas.loop`: the alternating supernet/controller epochs;
- :mod:`~normsearch.search.enas.backend`: the registered ``enas`` backend (loop + retraining);
- :mod:`~normsearch.search.enas.plots`: the controller's history figure.
"""

from normsearch.search.enas.space import EnasSpace

__all__ = ["EnasSpace"]
