"""When ``train.compile: auto`` compiles a fit: only when the compile time will be paid back.

``torch.compile`` costs a fixed time per model (graph capture and Inductor code generation of the
training and evaluation graphs) and saves a fraction of each step's *arithmetic*. Measured on CPU
(``scripts/bench_compile.py``, 1 thread, idle 2-core machine unless noted):

* ResNet-20, batch 128, CIFAR shape (loaded machine): compiles in 38-66 s, saves 16-22 % of a
  ~400 ms step, pays back after 420-1040 steps, i.e. 2e12-5e12 planned forward multiply-adds.
* LeNet, batch 2, Fashion-MNIST shape (the issue-22 space; ``--model lenet --image 1x28x28
  --batch-size 2``): compiles in 14-30 s; a 2-3 ms step is bound by per-operator overhead, not
  arithmetic, and compiling saves -12 % (GroupNorm: slower) to 37 % (ModeNorm): pay-back after
  17k steps at best, 91k for BatchNorm, never for GroupNorm. A 4000-step trial took 9-19 s eager
  and 24-42 s compiled.

So ``auto`` asks for both: at least :data:`COMPILE_MIN_STEPS` planned steps (enough steps to
amortize any compile) *and* at least :data:`COMPILE_MIN_MACS` planned forward multiply-adds
(epochs x steps x batch x the model's multiply-adds per image, counted by
:func:`forward_macs` with PyTorch's own ``FlopCounterMode``; enough arithmetic for a 20 %
saving to repay ~60 s). Both are properties of the config and the model, never of a timing, so the
decision (and with it the trial's floating-point results) is the same on every run. The CUDA
thresholds are estimates (no GPU measurement yet): compile time is similar there and the
arithmetic is cheap, so only the step count is asked for.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["COMPILE_MIN_MACS", "COMPILE_MIN_STEPS", "compiles_well", "forward_macs", "should_compile"]

#: ``compile: auto`` compiles a fit of at least this many planned training steps (epochs x steps
#: per epoch), per device type.
COMPILE_MIN_STEPS = {"cpu": 2000, "cuda": 5000}
#: ... and of at least this many planned forward multiply-adds (epochs x steps x batch size x
#: :func:`forward_macs` per image), per device type: ResNet-20 at batch 128 on CIFAR-shaped
#: images reaches it at ~2000 steps (about twice its measured pay-back), LeNet at batch 2 never
#: within a realistic trial.
COMPILE_MIN_MACS = {"cpu": 1e13, "cuda": 0.0}


def compiles_well(model: nn.Module) -> bool:
    """False if any module of ``model`` sets ``compiles_well = False`` (a layer whose data-dependent
    Python control flow breaks ``torch.compile``'s graph, e.g. MixtureNorm2d: in ResNet-20 its
    graph breaks exhaust dynamo's recompile limit and the compiled step is ~1.35x *slower* than
    eager, ``scripts/bench_compile.py``); ``compile: auto`` then stays eager."""
    return all(getattr(m, "compiles_well", True) for m in model.modules())


def forward_macs(model: nn.Module, image: torch.Tensor) -> float:
    """Multiply-adds of one forward pass of ``model`` on one image (convolutions, matrix products).

    Runs the forward once in eval mode without gradients, under ``torch.utils.flop_counter``
    (which counts 2 FLOPs per multiply-add), and restores the training flag and the CPU random
    state; eval mode leaves running statistics untouched.

    Args:
        model: the network.
        image: one input image, ``(C, H, W)`` or ``(1, C, H, W)``, on the model's device.

    Returns:
        Multiply-adds per image (a float; 0 for a model without convolutions or linear layers).
    """
    x = image if image.dim() == 4 else image.unsqueeze(0)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
            model(x[:1])
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2


def should_compile(model: nn.Module, image: torch.Tensor, *, planned_steps: int, batch_size: int,
                   device_type: str) -> bool:
    """The ``compile: auto`` decision for a fit of ``planned_steps`` steps of ``batch_size`` images.

    Args:
        model: the network (on its device).
        image: one training input ``(C, H, W)`` or ``(1, C, H, W)`` (its shape sets the arithmetic).
        planned_steps: epochs x steps per epoch.
        batch_size: images per training step.
        device_type: ``"cpu"``, ``"cuda"``, ...; a type without thresholds never compiles.

    Returns:
        True when both thresholds are met and the model :func:`compiles_well`; the model is only
        run (to count its multiply-adds) when the step threshold and ``compiles_well`` pass, and a
        model whose counting forward raises is left eager (the error shows in training, if real).
    """
    if planned_steps < COMPILE_MIN_STEPS.get(device_type, math.inf) or not compiles_well(model):
        return False
    min_macs = COMPILE_MIN_MACS.get(device_type, math.inf)
    if min_macs <= 0:
        return True
    try:
        macs = forward_macs(model, image)
    except Exception:  # noqa: BLE001 - a model the counter cannot run is trained eagerly, not failed
        return False
    return planned_steps * batch_size * macs >= min_macs
