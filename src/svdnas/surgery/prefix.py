"""A plan's layers fitted in forward order on the inputs the already-compressed prefix gives them.

Each layer's factors are derived so that the low-rank block, fed the compressed model's inputs,
reproduces the *original* layer on the original model's inputs (the asymmetric fit of
:func:`~svdnas.lowrank.whiten.derive_prefix`), and its bias is shifted by the change of its output's
mean. Layer ``n`` is fitted once layers ``0..n-1`` are in place, so the errors of the earlier layers
are compensated instead of compounded.

Each calibration batch makes one forward pass through each model, not one per layer: every batch's
pass runs in a thread of its own that pauses at each layer of the plan (:class:`Lockstep`) until that
layer is fitted, one pass of each model moving at a time, the two side by side; the compressed model's
pauses at the layer's input, the original's after running the layer, with its input and output. A model
whose passes do not meet the layers in the plan's order, once each, is fitted with a pass per layer
instead (:func:`layer_inputs`).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdnas.errors import SpecError
from svdnas.hooks import evaluation_mode, forward_hooks
from svdnas.lowrank.calibration import CrossMoments, needed_families, sampling, working_precision
from svdnas.lowrank.derivation import Derivation
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import PREFIX_RIDGE, derive_prefix
from svdnas.surgery.swap import set_submodule

log = logging.getLogger(__name__)


_OPENMP = "OpenMP" in torch.__config__.parallel_info().split("parallel backend:")[-1]


class _Reached(Exception):
    """Raised by a pre-hook to end a forward pass once the layer of interest has its input."""


@torch.no_grad()
def layer_inputs(model: nn.Module, name: str, batches: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """The input of layer ``name`` for each batch; each forward pass stops at that layer."""
    got: list[Tensor] = []

    def grab(_module, args):
        got.append(args[0].detach())
        raise _Reached

    with forward_hooks([(model.get_submodule(name), grab)], pre=True):
        for x in batches:
            before = len(got)
            try:
                model(x.to(device))
            except _Reached:
                pass
            if len(got) == before:
                raise SpecError(f"layer {name} was not called in a forward pass; it cannot be fitted on its inputs")
    return got


class _OutOfOrder(Exception):
    """The forward passes met the plan's layers in another order than the plan's, or one twice."""


class _Stop(Exception):
    """Raised in a paused pass to end it when the fit is over or failed."""


class _Gate(nn.Module):
    """Stands in for a layer during the fit: hands its input to the :class:`Lockstep`, waits, then runs
    ``inner``; or, for a lockstep that hands on outputs too, runs ``inner`` first and hands both."""

    def __init__(self, inner: nn.Module, name: str, lockstep: Lockstep) -> None:
        super().__init__()
        self.inner, self.name = inner, name
        self._lockstep = [lockstep]  # a list, so that it is not registered as a child module

    def forward(self, x: Tensor, *rest) -> Tensor:
        lockstep = self._lockstep[0]
        if lockstep.outputs:
            y = self.inner(x, *rest)
            lockstep.arrive(self.name, (x.detach(), y.detach()))
            return y
        lockstep.arrive(self.name, x.detach())
        return self.inner(x, *rest)


class Lockstep:
    """Forward passes of ``model`` over ``batches``, each in a thread that pauses at every layer of
    ``names`` (replaced in ``model`` by gates until :meth:`close`); :func:`step_together` lets each
    pass on, one at a time (that of several models side by side), to the next layer and returns what
    each one brought to it. :meth:`set_layer` replaces the module a gate runs, before the passes are
    let on past it.

    Each pass computes with ``threads`` intra-op threads (OpenMP builds; elsewhere torch's own
    setting): a thread's OpenMP team keeps spinning a while after each stretch of work, and with a
    team of every core per pass those spinning threads took the cores from the fit's own products;
    :func:`step_together` runs two models' passes side by side instead, on half the cores each.

    With ``outputs`` each pass brings (input, output) of the layer instead of its input alone: the
    pass computes the layer before it pauses, on its own thread, while the other model's pass runs.
    The output is handed on to the rest of the model only once the pass is let on, after the fit of
    that layer, so an in-place operation after the layer cannot change what the fit reads.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], batches: Sequence[Tensor], device: torch.device | str,
                 threads: int = 1, *, outputs: bool = False) -> None:
        self.model, self.device, self.batches, self.outputs = model, device, list(batches), outputs
        self.gates = {}
        for name in names:
            gate = _Gate(model.get_submodule(name), name, self)
            set_submodule(model, name, gate)
            self.gates[name] = gate
        self.messages: queue.Queue = queue.Queue()
        self.go = [threading.Semaphore(0) for _ in self.batches]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.batches))]
        self.local = threading.local()
        self.stopping = False
        self.pass_threads = max(1, threads)
        self.threads_before = torch.get_num_threads()

    def set_layer(self, name: str, module: nn.Module) -> None:
        self.gates[name].inner = module

    def _run(self, i: int) -> None:
        self.local.index = i
        self.go[i].acquire()
        try:
            if _OPENMP:  # a thread's own count; the native pool's is the process's, and set once
                torch.set_num_threads(self.pass_threads)
            if self.stopping:
                raise _Stop
            with torch.no_grad():
                self.model(self.batches[i].to(self.device))
            self.messages.put((i, None, None))
        except _Stop:
            self.messages.put((i, "stopped", None))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            self.messages.put((i, e, None))

    def arrive(self, name: str, brought: Tensor | tuple[Tensor, Tensor]) -> None:
        i = self.local.index
        self.messages.put((i, name, brought))
        self.go[i].acquire()
        if self.stopping:
            raise _Stop

    def _release(self, i: int) -> None:
        """Let pass ``i`` on to the next layer (starting it the first time)."""
        if self.threads[i].ident is None:
            self.threads[i].start()
        self.go[i].release()

    def _collect(self, name: str) -> Tensor | tuple[Tensor, Tensor]:
        """What a released pass brought to the next layer, which must be ``name``: its input (and output)."""
        _, what, x = self.messages.get()
        if isinstance(what, BaseException):
            raise what
        if what != name:
            raise _OutOfOrder(f"the forward pass met {what or 'the end'} where layer {name} was expected")
        return x

    def close(self) -> None:
        """End the paused passes (they raise inside the model), put the layers back in place of the
        gates, and the intra-op threads new threads start with back to what they were."""
        self.stopping = True
        waiting = [i for i, t in enumerate(self.threads) if t.is_alive()]
        for i in waiting:
            self.go[i].release()
        for i in waiting:
            self.threads[i].join()
        for name, gate in self.gates.items():
            set_submodule(self.model, name, gate.inner)
        if _OPENMP:  # the count that threads started later begin with (this thread's own is unchanged)
            torch.set_num_threads(self.threads_before)


def step_together(locksteps: Sequence[Lockstep], name: str) -> list[list[Tensor | tuple[Tensor, Tensor]]]:
    """Each pass of each :class:`Lockstep` (over the same number of batches) let on to the next layer
    of the plan, which must be ``name``, batch ``i``'s passes of every model at once (each computes on
    a thread of its own); per lockstep, what its passes brought there (inputs, or (input, output) pairs)."""
    got: list[list[Tensor | tuple[Tensor, Tensor]]] = [[] for _ in locksteps]
    for i in range(len(locksteps[0].batches)):
        for lockstep in locksteps:
            lockstep._release(i)
        for brought, lockstep in zip(got, locksteps):
            brought.append(lockstep._collect(name))
    return got


def _relative_error(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """sum ||o - r||^2 / sum ||r||^2, the squares in float32 or float64 (a half-precision square
    overflows), their sums in float64."""
    num = sum(float((working_precision(o) - working_precision(r)).pow(2).sum(dtype=torch.float64)) for r, o in zip(reference, outputs))
    den = sum(float(working_precision(r).pow(2).sum(dtype=torch.float64)) for r in reference)
    return num / den if den > 0 else 0.0


@dataclass
class PrefixFit:
    """The fitted model and, per layer, the relative output error (against the original layer on the
    original inputs) of the job's own factors (``derived``) and of the prefix-fitted ones (``fitted``),
    both on the compressed prefix's inputs: the held-out images' where there are any, and then which
    factors the layer ``kept``."""

    model: nn.Module
    errors: dict[str, dict[str, float | str]]
    images: int
    held_out: int = 0


@torch.no_grad()
def fit_on_prefix(
    original: nn.Module,
    plan: Plan,
    order: Sequence[str],
    batches: Sequence[Tensor],
    device: torch.device | str,
    derivation: Derivation | None = None,
    *,
    held_out: Sequence[Tensor] = (),
    bias_correction: bool = True,
    refit_iters: int = 0,
    damping: float = 1e-6,
    ridge: float = PREFIX_RIDGE,
    patches_per_column: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrefixFit:
    """``original`` (untouched) compressed by ``plan``, each layer fitted on the compressed prefix.

    Args:
        order: the plan's layers in forward order (a layer is fitted once those before it are in place).
        batches: calibration images, the same for both models.
        derivation: the factors the errors are compared against (the search's); None: the weight's SVD.
        held_out: images apart from ``batches``. With them each layer's two errors are measured on
            these instead, and the layer keeps whichever factors, fitted or the derivation's, err less:
            where a layer sees few samples for its input's dimension (a small feature map, many
            channels) the fit can follow its calibration images more than the data.
        bias_correction: shift each block's bias by the change of its output's mean (a layer with no
            bias gets one).
        refit_iters: alternating least-squares steps on the exact error for the families whose
            second layer holds kernel dimensions or whose first is grouped (0: the pooled fit only).
        ridge: each fit's pull towards the original weight (:func:`~svdnas.lowrank.whiten.prefix_target`).
        patches_per_column: each layer's statistics sum every step-th patch of ``batches``, the step
            leaving at least this many per column (:class:`~svdnas.lowrank.calibration.Sampling`);
            None: every patch.
    """
    derivation = derivation or Derivation()
    layers = [n for n in order if plan.layers.get(n)]
    fit = {"derivation": derivation, "held_out": len(held_out), "bias_correction": bias_correction, "refit_iters": refit_iters,
           "damping": damping, "ridge": ridge, "progress": progress}
    images, spare = sum(len(x) for x in batches), sum(len(x) for x in held_out)
    fit["sampling"] = sampling(images, patches_per_column)
    batches = list(batches) + list(held_out)
    with evaluation_mode(original):
        try:
            compressed, errors = _fit(original, plan, layers, batches, device, lockstep=True, **fit)
        except _OutOfOrder as e:
            log.info("prefix fit: %s; fitting with one forward pass per layer instead", e)
            compressed, errors = _fit(original, plan, layers, batches, device, lockstep=False, **fit)
    return PrefixFit(compressed, errors, images, spare)


@torch.no_grad()
def _fit(original, plan, layers, batches, device, *, lockstep, derivation, held_out, bias_correction, refit_iters, damping, ridge,
         sampling, progress):
    n_fit = len(batches) - held_out
    compressed = copy.deepcopy(original)
    if lockstep:
        half = max(1, torch.get_num_threads() // 2)  # the two models' passes run side by side
        streams = [Lockstep(copy.deepcopy(original), layers, batches, device, half, outputs=True),
                   Lockstep(compressed, layers, batches, device, half)]

        def inputs(name):
            pairs, x_comp = step_together(streams, name)
            return [x for x, _ in pairs], [y for _, y in pairs], x_comp

        def place(name, module):
            streams[1].set_layer(name, module)
    else:
        streams = []

        def inputs(name):
            x_orig = layer_inputs(original, name, batches, device)
            layer = original.get_submodule(name)
            return x_orig, [layer(x) for x in x_orig], layer_inputs(compressed, name, batches, device)

        def place(name, module):
            set_submodule(compressed, name, module)

    errors: dict[str, dict[str, float]] = {}
    try:
        for i, name in enumerate(layers):
            specs = plan.layers[name]
            layer = original.get_submodule(name)
            x_orig, reference, x_comp = inputs(name)  # reference: the original layer's outputs on x_orig
            stats = CrossMoments(layer, needed_families(specs), sampling=sampling)
            for xo, xc, yo in zip(x_orig[:n_fit], x_comp[:n_fit], reference[:n_fit]):
                stats.update(xo, xc, yo)
            if held_out:  # errors measured on the held-out images alone
                reference, x_comp = reference[n_fit:], x_comp[n_fit:]
            try:
                fitted = derive_prefix(layer, specs, stats, damping=damping, bias_correction=bias_correction, refit_iters=refit_iters,
                                       ridge=ridge)
            except SpecError as e:
                raise SpecError(f"layer {name}: {e}") from e
            fitted = fitted.to(dtype=layer.weight.dtype).eval()
            own = derivation.block(name, layer, specs).eval()
            errors[name] = {
                "derived": _relative_error(reference, [own(x) for x in x_comp]),
                "fitted": _relative_error(reference, [fitted(x) for x in x_comp]),
            }
            keep_own = held_out and errors[name]["derived"] < errors[name]["fitted"]
            errors[name]["kept"] = "derived" if keep_own else "fitted"
            log.debug("%s: relative output error %.4g -> %.4g, kept %s", name, errors[name]["derived"], errors[name]["fitted"],
                      errors[name]["kept"])
            place(name, own if keep_own else fitted)
            del x_orig, x_comp, reference
            if progress is not None:
                progress(i + 1, len(layers))
    finally:
        for stream in streams:
            stream.close()
    return compressed, errors


__all__ = ["PrefixFit", "fit_on_prefix", "layer_inputs"]
