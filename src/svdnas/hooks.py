"""Forward hooks, and a model's evaluation mode (and frozen parameters), that live exactly as long as a
``with`` block: registered (set) on entry, removed (put back) on exit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Register each ``(module, fn)`` as a forward hook (``pre``: a forward pre-hook) for the block's duration.

    The hooks are removed however the block ends, so an error in a forward pass leaves no hook behind.
    """
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block's duration; on exit every module is put back in the mode
    it had (``model.train(was)`` would set one mode for all of them)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with no parameter asking for gradients for the block's duration; on exit
    each module's mode and each parameter's ``requires_grad`` are put back."""
    grads = [p.requires_grad for p in model.parameters()]
    with evaluation_mode(model):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            yield model
        finally:
            for p, g in zip(model.parameters(), grads):
                p.requires_grad_(g)
