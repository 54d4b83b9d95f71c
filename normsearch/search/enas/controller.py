"""ENAS-style LSTM controller policy over a list of discrete decisions (trained by
:class:`normsearch.search.enas.reinforce.ReinforceTrainer`).

The controller knows only a sequence of labelled decisions (``Decision(name, num_choices)``),
never the CNN: a search backend maps each decision to a normalization slot and turns the
sampled indices into a model specification.

Reference: Pham, Guan, Zoph, Le, Dean, *Efficient Neural Architecture Search via Parameter
Sharing*, ICML 2018 (ENAS), Sec. 2.1-2.2 (controller and its REINFORCE update) and the
authors' public implementation (macro search: LSTM size 64, one layer, tanh constant 1.5,
entropy weight 1e-4, baseline decay 0.99). Luo et al., *Differentiable Learning-to-Normalize
via Switchable Normalization*, ICLR 2019, App. G, ran the same controller. NNI's
``ReinforceController`` (microsoft/nni) inspired the "list of fields" interface.

Readings taken where sources differ:

* ``entropy`` is the analytic entropy ``-sum_k p_k log p_k`` of each step's distribution,
  summed over steps. The ENAS and NNI code add only the sampled term ``-p_a log p_a``; the
  analytic value is the exact quantity the bonus is meant to reward.
* The baseline is updated with each reward *before* that reward's advantage is computed, as in
  the ENAS and NNI code; its first value is the first reward (the ENAS code starts it at 0).
* Parameters are initialised uniformly in [-0.1, 0.1] (ENAS, Sec. 3, training details).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Decision", "ControllerConfig", "LSTMController", "max_probability"]


@dataclass(frozen=True)
class Decision:
    """One categorical decision the controller makes.

    Attributes:
        name: unique label (for example a normalization slot's ``named_modules()`` label).
        num_choices: number of options; the controller returns an index in ``[0, num_choices)``.
    """

    name: str
    num_choices: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Decision.name must be a non-empty str, got {self.name!r}")
        if isinstance(self.num_choices, bool) or not isinstance(self.num_choices, int):
            raise TypeError(
                f"Decision {self.name!r}: num_choices must be an int, got {self.num_choices!r}"
            )
        if self.num_choices < 1:
            raise ValueError(f"Decision {self.name!r}: num_choices must be >= 1, got {self.num_choices}")


@dataclass(frozen=True)
class ControllerConfig:
    """Hyper-parameters of the controller and of its REINFORCE trainer.

    Defaults follow the ENAS authors' macro-search script, except ``lr`` (3.5e-4, the ENAS
    paper's and NNI's value; the macro script uses 1e-3). The ENAS paper's CIFAR-10 text uses a
    tanh constant of 2.5 and a temperature of 5.0 instead.

    Attributes:
        hidden_size: LSTM hidden units and embedding size (64).
        num_layers: stacked LSTM cells (1).
        tanh_constant: ``c`` in ``logits = c * tanh(logits / temperature)``; ``None`` disables
            the squashing. With ``c`` and ``K`` choices the largest reachable probability is
            ``e^c / (e^c + (K - 1) e^-c)`` (0.909 for c=1.5, K=3).
        temperature: divides the logits before the tanh; ``None`` means no division.
        entropy_weight: weight of the (detached) policy entropy added to the reward (1e-4).
        baseline_decay: ``d`` in ``baseline = d * baseline + (1 - d) * reward`` (0.99).
        lr: Adam learning rate of the controller (3.5e-4).
        grad_clip: max global gradient norm before each Adam step; ``None`` disables clipping.
    """

    hidden_size: int = 64
    num_layers: int = 1
    tanh_constant: float | None = 1.5
    temperature: float | None = None
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.99
    lr: float = 3.5e-4
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ControllerConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("tanh_constant", "temperature", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ControllerConfig.{name} must be > 0 or None, got {value!r}")
        if not self.entropy_weight >= 0:
            raise ValueError(
                f"ControllerConfig.entropy_weight must be >= 0, got {self.entropy_weight!r}"
            )
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(
                f"ControllerConfig.baseline_decay must be in [0, 1), got {self.baseline_decay!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"ControllerConfig.lr must be > 0, got {self.lr!r}")


class LSTMController(nn.Module):
    """Autoregressive LSTM policy: one LSTM step per decision, in the order given.

    Step ``t`` feeds the previous step's input (a learned start vector ``g_emb`` at ``t = 0``,
    otherwise the embedding of decision ``t-1``'s chosen index) through the stacked LSTM cells,
    maps the top hidden state to decision ``t``'s logits with that decision's linear head,
    squashes them (``ControllerConfig.tanh_constant``/``temperature``) and samples an index.
    Heads and embedding tables are ``nn.ModuleList`` entries in decision order (labels may
    contain dots, which ``nn.ModuleDict`` rejects); ``head(name)``/``embedding(name)`` look one
    up by label.

    Args:
        decisions: the decisions, in sampling order; names must be unique.
        cfg: hyper-parameters (``ControllerConfig()`` by default).

    Raises:
        ValueError: if ``decisions`` is empty or has duplicate names.
        TypeError: if an entry is not a ``Decision``.
    """

    def __init__(self, decisions: Sequence[Decision], cfg: ControllerConfig | None = None) -> None:
        super().__init__()
        decisions = tuple(decisions)
        if not decisions:
            raise ValueError("LSTMController needs at least one Decision")
        for d in decisions:
            if not isinstance(d, Decision):
                raise TypeError(f"LSTMController: expected Decision entries, got {type(d).__name__}")
        names = [d.name for d in decisions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"LSTMController: duplicate decision names {duplicates}")
        self.cfg = cfg if cfg is not None else ControllerConfig()
        self.decisions = decisions
        self._index = {d.name: i for i, d in enumerate(decisions)}
        size = self.cfg.hidden_size
        self.g_emb = nn.Parameter(torch.empty(1, size))
        self.cells = nn.ModuleList(
            nn.LSTMCell(size, size, bias=False) for _ in range(self.cfg.num_layers)
        )
        self.heads = nn.ModuleList(nn.Linear(size, d.num_choices, bias=False) for d in decisions)
        self.embeddings = nn.ModuleList(nn.Embedding(d.num_choices, size) for d in decisions)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter uniformly in [-0.1, 0.1] (ENAS, Sec. 3, training details)."""
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    @property
    def names(self) -> tuple[str, ...]:
        """Decision labels in sampling order."""
        return tuple(d.name for d in self.decisions)

    def head(self, name: str) -> nn.Linear:
        """The linear head (hidden -> logits) of decision ``name``."""
        return self.heads[self._position(name)]

    def embedding(self, name: str) -> nn.Embedding:
        """The embedding table that feeds decision ``name``'s choice to the next step."""
        return self.embeddings[self._position(name)]

    def _position(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"unknown decision {name!r}; known: {list(self._index)}")
        return self._index[name]

    def _logits(self, step: int, h: Tensor) -> Tensor:
        logits = self.heads[step](h)
        if self.cfg.temperature is not None:
            logits = logits / self.cfg.temperature
        if self.cfg.tanh_constant is not None:
            logits = self.cfg.tanh_constant * torch.tanh(logits)
        return logits

    def _rollout(
        self,
        batch_size: int,
        mode: str,
        forced: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Run all decision steps for ``batch_size`` independent sequences.

        Args:
            batch_size: number of sequences B run side by side.
            mode: ``"sample"`` (multinomial), ``"greedy"`` (argmax) or ``"forced"`` (teacher
                forcing with ``forced``).
            forced: (B, D) int64 actions for ``"forced"``.
            generator: random source for ``"sample"``; must live on the parameters' device.

        Returns:
            actions (B, D) int64, log_prob (B,) summed over steps, entropy (B,) summed over
            steps, and each step's probabilities, a list of D tensors of shape (B, K_t).
        """
        weight = self.g_emb
        zeros = weight.new_zeros(batch_size, self.cfg.hidden_size)
        h = [zeros] * self.cfg.num_layers
        c = [zeros] * self.cfg.num_layers
        x = weight.expand(batch_size, -1)
        actions, log_probs, entropies, probs = [], [], [], []
        for t in range(len(self.decisions)):
            inp = x
            for i, cell in enumerate(self.cells):
                h[i], c[i] = cell(inp, (h[i], c[i]))
                inp = h[i]
            log_p = F.log_softmax(self._logits(t, h[-1]), dim=-1)
            p = log_p.exp()
            if mode == "sample":
                a = torch.multinomial(p.detach(), 1, generator=generator).squeeze(1)
            elif mode == "greedy":
                a = p.detach().argmax(dim=-1)
            else:
                a = forced[:, t]
            actions.append(a)
            log_probs.append(log_p.gather(1, a.unsqueeze(1)).squeeze(1))
            entropies.append(-(p * log_p).sum(dim=-1))
            probs.append(p)
            x = self.embeddings[t](a)
        log_prob = torch.stack(log_probs, 1).sum(1)
        entropy = torch.stack(entropies, 1).sum(1)
        return torch.stack(actions, 1), log_prob, entropy, probs

    def _to_dict(self, row: Tensor) -> dict[str, int]:
        return {name: int(a) for name, a in zip(self.names, row.tolist())}

    def sample_batch(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[list[dict[str, int]], Tensor, Tensor]:
        """Sample ``batch_size`` independent decision sequences in one batched rollout.

        Args:
            batch_size: number of sequences B (>= 1).
            generator: optional ``torch.Generator`` on the parameters' device, for
                reproducible draws.

        Returns:
            A list of B ``{name: index}`` dicts, log-probabilities (B,) and entropies (B,),
            each summed over decisions and differentiable w.r.t. the controller's parameters.

        Raises:
            ValueError: if ``batch_size`` < 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        actions, log_prob, entropy, _ = self._rollout(batch_size, "sample", generator=generator)
        return [self._to_dict(row) for row in actions.cpu()], log_prob, entropy

    def sample(self, generator: torch.Generator | None = None) -> tuple[dict[str, int], Tensor, Tensor]:
        """Sample one decision sequence.

        Args:
            generator: optional ``torch.Generator`` on the parameters' device.

        Returns:
            ``(actions, log_prob, entropy)``: ``{name: index}``, and two scalar tensors, the
            summed log-probability of the sampled indices and the summed analytic entropy of
            each step's distribution.
        """
        actions, log_prob, entropy = self.sample_batch(1, generator)
        return actions[0], log_prob[0], entropy[0]

    def log_prob(self, actions: Mapping[str, int]) -> Tensor:
        """Log-probability (scalar, differentiable) of ``actions`` under teacher forcing.

        Raises:
            ValueError: if ``actions`` does not name every decision exactly once, or an index
                is out of range.
            TypeError: if an index is not an int.
        """
        missing = [n for n in self.names if n not in actions]
        extra = [n for n in actions if n not in self._index]
        if missing or extra:
            raise ValueError(f"actions must name every decision: missing {missing}, unknown {extra}")
        row = []
        for d in self.decisions:
            a = actions[d.name]
            if isinstance(a, bool) or not isinstance(a, int):
                raise TypeError(f"action for {d.name!r} must be an int, got {a!r}")
            if not 0 <= a < d.num_choices:
                raise ValueError(f"action for {d.name!r} must be in [0, {d.num_choices}), got {a}")
            row.append(a)
        forced = torch.tensor([row], dtype=torch.long, device=self.g_emb.device)
        return self._rollout(1, "forced", forced=forced)[1][0]

    @torch.no_grad()
    def argmax(self) -> dict[str, int]:
        """The greedy decision sequence: at each step the most probable index given the
        greedy choices before it."""
        return self._to_dict(self._rollout(1, "greedy")[0][0].cpu())

    @torch.no_grad()
    def probabilities(self) -> dict[str, list[float]]:
        """Each step's choice distribution along the greedy path.

        Entry ``name`` is ``p(decision_t = k | decisions_<t = their argmax)`` for every ``k``:
        the *conditional* distribution at step ``t`` when all earlier decisions take their
        greedy value (the same path as ``argmax()``). It equals the true marginal only when the
        policy does not condition on earlier choices; it is cheap (one rollout) and suited to
        plotting per-slot choice probabilities over training.
        """
        probs = self._rollout(1, "greedy")[3]
        return {name: p[0].tolist() for name, p in zip(self.names, probs)}

    def extra_repr(self) -> str:
        return f"num_decisions={len(self.decisions)}, {self.cfg}"


def max_probability(num_choices: int, tanh_constant: float) -> float:
    """Largest probability a ``num_choices``-way softmax reaches with logits in [-c, c]."""
    top = math.exp(tanh_constant)
    return top / (top + (num_choices - 1) * math.exp(-tanh_constant))
