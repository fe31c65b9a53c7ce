"""Super blocks: a target layer mixing its candidates and the original by Gumbel-softmax over logits.

Every candidate of a layer is a low-rank approximation whose output is the original layer's
operation applied with a reconstructed dense weight. The output of a mixture is therefore the
layer applied once with the mixed weight ``w0 * W + sum_c w_c * A_c``, so the default ``mixed``
sampling costs one forward and backward pass of the original layer plus building that weight.
Candidates of one family share one SVD: ``sum_c w_c A_c = sum_k m_k u_k s_k v_k^T`` with ``m_k``
the total weight of the family's candidates of rank >= k. Triplets below the family's smallest
candidate rank all carry the family's total weight and are summed into one dense matrix ahead of
time; only the window between the smallest and the largest candidate rank is multiplied each step.
The dense terms (the original weight, earlier branches, each family's part below its window) are
mixed by one matrix-vector product over their stack. The window's product is the one matrix
multiplication of a step; by default it runs in bfloat16 (float32 accumulation) where the device
multiplies bfloat16 natively, which halves its time on a CPU with AVX512-BF16 and moves the mixed
weight by a few 1e-3 of its norm; every candidate's own weight, and the selected plan's, stay exact.

``two`` sampling is the official release's scheme: two candidates drawn from softmax(theta), each
run as a full-size layer with its reconstructed weight, mixed by Gumbel-softmax over their logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdnas.lowrank import functional as LF
from svdnas.lowrank.derivation import Derivation
from svdnas.search.candidates import LayerCandidates
from svdnas.surgery.swap import set_submodule

WINDOW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WINDOW_DTYPE_NAMES = ("auto", *WINDOW_DTYPES)  # what --search-dtype takes


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (where it does not, bfloat16 is
    emulated and slower than float32): a CUDA device that supports it, or a CPU with AVX512-BF16 or
    AMX (read from /proc/cpuinfo; False where that is not available)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def window_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the rank-window products for ``name`` (auto, float32, bfloat16) on ``device``:
    auto is bfloat16 where the device multiplies it natively, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if name not in WINDOW_DTYPES:
        raise ValueError(f"window dtype must be auto, float32 or bfloat16, got {name!r}")
    return WINDOW_DTYPES[name]


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Softmax of ``(logits + Gumbel noise) / tau``, the noise drawn from ``generator``."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(0)


class _FamilyMix(nn.Module):
    """The candidates of one family (split and grouping) of a layer, sharing one SVD.

    ``dtype`` is the precision of the rank window's product, the one matrix product of a step
    (bfloat16 halves its time where the hardware multiplies bfloat16 natively); the dense part
    below the window and every candidate's own weight stay in the layer's precision. ``None``: no
    window (the two-sample scheme only needs the candidates' own weights).
    """

    def __init__(self, factors: LF.SVDFactors, shape, family, ranks: list[int], indices: list[int], dtype: torch.dtype | None) -> None:
        super().__init__()
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        ranks = [ranks[i] for i in order]
        self.family = family
        self.register_buffer("indices", torch.tensor([indices[i] for i in order]), persistent=False)
        u, sv, vh = factors
        r_min, r_max = ranks[0], ranks[-1]
        self.r_min, self.r_max = r_min, r_max
        # the top r_max triplets make the dense candidates; the window r_min..r_max is mixed each step
        self.register_buffer("u", u[:, :, :r_max].contiguous(), persistent=False)
        self.register_buffer("s", sv[:, :r_max].contiguous(), persistent=False)
        self.register_buffer("vh", vh[:, :r_max].contiguous(), persistent=False)
        window = dtype is not None
        self.register_buffer("us_window", (u[:, :, r_min:r_max] * sv[:, None, r_min:r_max]).to(dtype) if window else None, persistent=False)
        self.register_buffer("vh_window", vh[:, r_min:r_max].to(dtype) if window else None, persistent=False)
        # triplet k (0-based, in the window) belongs to every candidate of rank > r_min + k;
        # slot j of the reverse cumulative sum holds the weight of candidates j.. (ascending rank)
        slot = [next(j for j, r in enumerate(ranks) if r > r_min + k) for k in range(r_max - r_min)]
        self.register_buffer("slot", torch.tensor(slot, dtype=torch.long), persistent=False)
        self.shape = tuple(shape)
        self.ranks = ranks

    def tails(self, weights: Tensor) -> Tensor:
        """``tails[j]``: the total weight of the family's candidates j.. (ascending rank)."""
        return weights[self.indices].flip(0).cumsum(0).flip(0)

    def window(self, tails: Tensor) -> Tensor | None:
        """The window's part of the mixed weight (a permuted view, in the window's dtype)."""
        if not self.slot.numel():
            return None
        m = tails[self.slot].to(self.us_window.dtype)  # one weight per triplet, every group
        return LF.fold((self.us_window * m) @ self.vh_window, self.shape, *self.family)

    def dense(self, rank: int) -> Tensor:
        return LF.reconstruct(LF.SVDFactors(self.u, self.s, self.vh), rank, self.shape, self.family)


class MixedLayer(nn.Module):
    """A super block over ``candidates`` of ``layer`` (nn.Conv2d with groups=1, or nn.Linear).

    Attributes:
        theta: learnable logits, index 0 for the original layer.
        temperature: Gumbel-softmax temperature, set by the search loop.
        sampling: ``mixed`` (all candidates in one weight) or ``two`` (the release's scheme).
        last_weights: the candidate weights of the latest forward (for the expected cost).
        window_dtype: precision of the rank windows' products in ``mixed`` sampling.
    """

    def __init__(
        self, layer: nn.Module, candidates: LayerCandidates, sampling: str = "mixed", window_dtype: torch.dtype = torch.float32,
        derivation: Derivation | None = None, name: str = "",
    ) -> None:
        super().__init__()
        if sampling not in ("mixed", "two"):
            raise ValueError(f"sampling must be 'mixed' or 'two', got {sampling!r}")
        self.layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.candidates = candidates
        self.sampling = sampling
        self.temperature = 5.0
        self.theta = nn.Parameter(torch.zeros(len(candidates)))
        weight = layer.weight.detach()
        if isinstance(layer, nn.Linear):
            weight = weight[:, :, None, None]
        derivation = derivation or Derivation()
        # fixed earlier branches: candidates approximate what they left
        prefix = derivation.dense(name, layer, candidates.prefix)
        self.has_prefix = bool(candidates.prefix)
        groups: dict = {}
        for i, spec in enumerate(candidates.specs, start=1):
            groups.setdefault(spec.family(), ([], []))
            groups[spec.family()][0].append(spec.rank)
            groups[spec.family()][1].append(i)
        self.window_dtype = window_dtype
        mixing = sampling == "mixed"
        self.families = nn.ModuleList(
            _FamilyMix(derivation.factors(name, weight - prefix, fam), weight.shape, fam, r, idx, window_dtype if mixing else None)
            for fam, (r, idx) in groups.items()
        )
        # the dense terms of the mixed weight, one row each, mixed by one matrix-vector product:
        # index 0 (the original layer, or the branches it stands for in a second search), the
        # earlier branches (when there are any), each family's part below its rank window
        rows = [derivation.dense(name, layer, candidates.base) if candidates.base else weight]
        if mixing:
            rows += [prefix] if self.has_prefix else []
            rows += [fam.dense(fam.r_min) for fam in self.families]
        self.register_buffer("stack", torch.stack(rows).reshape(len(rows), -1), persistent=False)
        self.register_buffer("prefix", prefix, persistent=False)
        self.weight_shape = tuple(weight.shape)
        self.last_weights: Tensor | None = None
        self._sampled: Tensor | None = None
        self.generator: torch.Generator | None = None  # the search's noise (None: the global generator)

    @property
    def weight(self) -> Tensor:
        """Index 0's dense weight."""
        return self.stack[0].view(self.weight_shape)

    def _apply_weight(self, x: Tensor, w: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w[:, :, 0, 0], self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)  # type: ignore[union-attr]

    def mixed_weight(self, weights: Tensor) -> Tensor:
        """``w0 * W + sum_c w_c * (prefix + A_c)`` for candidate weights ``weights``."""
        if self.sampling != "mixed":
            raise RuntimeError("a two-sample super block holds no mixed weight (it runs its candidates' own weights)")
        tails = [fam.tails(weights) for fam in self.families]
        coef = [weights[:1]] + ([weights[1:].sum(0, keepdim=True)] if self.has_prefix else []) + [t[:1] for t in tails]
        out = (torch.cat(coef) @ self.stack).view(self.weight_shape)
        for fam, t in zip(self.families, tails):
            part = fam.window(t)
            if part is not None:
                out = out.add_(part)  # the matrix-vector product does not keep its output for backward: in place is safe
        return out

    def candidate_weight(self, index: int) -> Tensor:
        """Dense weight of candidate ``index`` (0: the original)."""
        if index == 0:
            return self.weight
        spec = self.candidates.specs[index - 1]
        fam = next(f for f in self.families if f.family == spec.family())
        return self.prefix + fam.dense(spec.rank)

    def forward(self, x: Tensor) -> Tensor:
        if self.sampling == "mixed":
            w = gumbel_softmax(self.theta, self.temperature, self.generator)
            self.last_weights = w
            return self._apply_weight(x, self.mixed_weight(w))
        with torch.no_grad():
            probs = F.softmax(self.theta.detach(), 0)
            picked = torch.multinomial(probs, min(2, len(probs)), replacement=False, generator=self.generator)
        self._sampled = picked
        gates = gumbel_softmax(self.theta[picked], self.temperature, self.generator)
        self.last_weights = F.softmax(self.theta, 0)
        out = 0
        for g, idx in zip(gates, picked.tolist()):
            out = out + g * self._apply_weight(x, self.candidate_weight(idx))
        return out

    @torch.no_grad()
    def rescale_sampled(self, before: Tensor) -> None:
        """Two-sample mode: shift the sampled logits so the unsampled keep their probabilities."""
        if self._sampled is None:
            return
        idx = self._sampled
        old = torch.logsumexp(before[idx], 0)
        new = torch.logsumexp(self.theta[idx], 0)
        self.theta[idx] -= new - old


def build_supernet(
    model: nn.Module, candidates: dict[str, LayerCandidates], sampling: str = "mixed", window_dtype: torch.dtype = torch.float32,
    derivation: Derivation | None = None,
) -> tuple[nn.Module, dict[str, MixedLayer]]:
    """A copy of ``model`` whose layers named in ``candidates`` are super blocks (the original is untouched)."""
    import copy


    net = copy.deepcopy(model)
    layers: dict[str, MixedLayer] = {}
    for name, cands in candidates.items():
        layers[name] = MixedLayer(net.get_submodule(name), cands, sampling, window_dtype, derivation, name)
        set_submodule(net, name, layers[name])
    return net, layers
