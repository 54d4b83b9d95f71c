"""REINFORCE for the ENAS controller (Pham et al., ICML 2018, Sec. 2.2): an exponential-moving-
average baseline and an entropy bonus; see :mod:`normsearch.search.enas.controller` for the policy
and the readings taken where the ENAS and NNI code differ.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from normsearch.search.enas.controller import ControllerConfig, LSTMController

__all__ = ["ReinforceTrainer"]


class ReinforceTrainer:
    """REINFORCE with an exponential-moving-average baseline and an entropy bonus (ENAS Sec. 2.2).

    For each sample ``i`` (in order): ``R_i = reward_i + entropy_weight * entropy_i`` (entropy
    detached), ``b <- d * b + (1 - d) * R_i`` (the first ``R`` initialises ``b``),
    ``A_i = R_i - b``; then one Adam step on ``mean_i(-log_prob_i * A_i)``.

    Args:
        controller: the policy to train.
        cfg: hyper-parameters; ``controller.cfg`` by default.
    """

    def __init__(self, controller: LSTMController, cfg: ControllerConfig | None = None) -> None:
        if not isinstance(controller, LSTMController):
            raise TypeError(f"ReinforceTrainer needs an LSTMController, got {type(controller).__name__}")
        self.controller = controller
        self.cfg = cfg if cfg is not None else controller.cfg
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=self.cfg.lr)
        self.baseline: float | None = None
        self.num_updates = 0

    def update(self, log_prob: Tensor, entropy: Tensor, reward: Any) -> dict[str, float]:
        """One policy-gradient step from B >= 1 samples (gradients averaged over the batch).

        Args:
            log_prob: () or (B,) summed log-probabilities from ``sample``/``sample_batch``.
            entropy: same shape, the samples' entropies (detached here).
            reward: a number, or a sequence/tensor of B numbers (for example validation
                accuracies in [0, 1]).

        Returns:
            Floats: ``loss``; batch means of ``reward`` (with the entropy bonus), ``entropy`` and
            ``advantage``; ``baseline`` after the update.

        Raises:
            ValueError: if the shapes disagree, ``log_prob`` has no autograd graph or a reward is
                not finite.
        """
        log_prob = log_prob.reshape(-1)
        entropy = entropy.detach().reshape(-1).to(log_prob.dtype)
        rewards = torch.as_tensor(reward, dtype=log_prob.dtype).reshape(-1).cpu()
        if not (log_prob.numel() == entropy.numel() == rewards.numel() >= 1):
            raise ValueError(
                f"log_prob, entropy and reward must hold the same number (>= 1) of samples, got "
                f"{log_prob.numel()}, {entropy.numel()}, {rewards.numel()}"
            )
        if not log_prob.requires_grad:
            raise ValueError("log_prob carries no autograd graph (was it sampled under torch.no_grad()?)")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
        shaped = rewards + self.cfg.entropy_weight * entropy.cpu()
        decay = self.cfg.baseline_decay
        advantages = []
        for r in shaped.tolist():
            self.baseline = r if self.baseline is None else decay * self.baseline + (1 - decay) * r
            advantages.append(r - self.baseline)
        adv = torch.tensor(advantages, dtype=log_prob.dtype, device=log_prob.device)
        loss = -(log_prob * adv).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.controller.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.num_updates += 1
        return {
            "loss": float(loss.detach()),
            "reward": float(shaped.mean()),
            "baseline": float(self.baseline),
            "entropy": float(entropy.mean()),
            "advantage": float(adv.mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        """Controller weights, Adam state, baseline and update count (for resuming a run)."""
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (the controller must have the same decisions).

        Raises:
            ValueError: if a key is missing.
        """
        missing = [k for k in ("controller", "optimizer", "baseline", "num_updates") if k not in state]
        if missing:
            raise ValueError(f"ReinforceTrainer state is missing {missing}")
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        baseline = state["baseline"]
        self.baseline = None if baseline is None else float(baseline)
        self.num_updates = int(state["num_updates"])
