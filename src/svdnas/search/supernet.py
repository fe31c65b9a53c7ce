"""Super blocks: a target layer mixing its candidates and the original by Gumbel-softmax over logits.

Every candidate of a layer is a low-rank approximation whose output is the original layer's
operation applied with a reconstructed dense weight. The output of a mixture is therefore the
layer applied once with the mixed weight ``w0 * W + sum_c w_c * A_c``, so the default ``mixed``
sampling costs one forward and backward pass of the original layer plus building that weight.
Candidates of one family share one SVD: ``sum_c w_c A_c = sum_k m_k u_k s_k v_k^T`` with ``m_k``
the total weight of the family's candidates of rank >= k. Triplets below the family's smallest
candidate rank all carry the family's total weight and are summed into one dense matrix ahead of
time; only the window between the smallest and the largest candidate rank is multiplied each step.

``two`` sampling is the official release's scheme: two candidates drawn from softmax(theta), each
run as a full-size layer with its reconstructed weight, mixed by Gumbel-softmax over their logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdnas import functional as LF
from svdnas.search.candidates import LayerCandidates


class _FamilyMix(nn.Module):
    def __init__(self, residual: Tensor, family, ranks: list[int], indices: list[int]) -> None:
        super().__init__()
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        ranks = [ranks[i] for i in order]
        self.family = family
        self.register_buffer("indices", torch.tensor([indices[i] for i in order]), persistent=False)
        u, sv, vh = LF.svd(residual, *family)
        r_min, r_max = ranks[0], ranks[-1]
        self.r_min, self.r_max = r_min, r_max
        self.register_buffer("base", LF.reconstruct(LF.SVDFactors(u, sv, vh), r_min, residual.shape, family), persistent=False)
        # the top r_max triplets: the window r_min..r_max is mixed each step, all of them make dense candidates
        self.register_buffer("u", u[:, :, :r_max].contiguous(), persistent=False)
        self.register_buffer("s", sv[:, :r_max].contiguous(), persistent=False)
        self.register_buffer("vh", vh[:, :r_max].contiguous(), persistent=False)
        # triplet k (0-based, in the window) belongs to every candidate of rank > r_min + k;
        # slot j of the reverse cumulative sum holds the weight of candidates j.. (ascending rank)
        slot = [next(j for j, r in enumerate(ranks) if r > r_min + k) for k in range(r_max - r_min)]
        self.register_buffer("slot", torch.tensor(slot, dtype=torch.long), persistent=False)
        self.shape = tuple(residual.shape)
        self.ranks = ranks

    def mixed(self, weights: Tensor) -> Tensor:
        w = weights[self.indices]
        tail = w.flip(0).cumsum(0).flip(0)  # tail[j] = total weight of candidates j..end
        out = tail[0] * self.base
        if self.slot.numel():
            lo, hi = self.r_min, self.r_max
            m = tail[self.slot] * self.s[:, lo:hi]  # (g, window)
            mats = (self.u[:, :, lo:hi] * m[:, None, :]) @ self.vh[:, lo:hi]
            out = out + LF.fold(mats, self.shape, *self.family)
        return out

    def dense(self, rank: int) -> Tensor:
        return LF.reconstruct(LF.SVDFactors(self.u, self.s, self.vh), rank, self.shape, self.family)


class MixedLayer(nn.Module):
    """A super block over ``candidates`` of ``layer`` (nn.Conv2d with groups=1, or nn.Linear).

    Attributes:
        theta: learnable logits, index 0 for the original layer.
        temperature: Gumbel-softmax temperature, set by the search loop.
        sampling: ``mixed`` (all candidates in one weight) or ``two`` (the release's scheme).
        last_weights: the candidate weights of the latest forward (for the expected cost).
    """

    def __init__(self, layer: nn.Module, candidates: LayerCandidates, sampling: str = "mixed") -> None:
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
        # fixed earlier branches: candidates approximate what they left
        prefix = LF.branches_weight(weight, candidates.prefix)
        self.register_buffer("prefix", prefix, persistent=False)
        # index 0: the original layer, or the branches it stands for in a second search
        self.register_buffer("weight", LF.branches_weight(weight, candidates.base) if candidates.base else weight, persistent=False)
        self.has_prefix = bool(candidates.prefix)
        groups: dict = {}
        for i, spec in enumerate(candidates.specs, start=1):
            groups.setdefault(spec.family(), ([], []))
            groups[spec.family()][0].append(spec.rank)
            groups[spec.family()][1].append(i)
        self.families = nn.ModuleList(_FamilyMix(weight - prefix, fam, r, idx) for fam, (r, idx) in groups.items())
        self.last_weights: Tensor | None = None
        self._sampled: Tensor | None = None

    def _apply_weight(self, x: Tensor, w: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w[:, :, 0, 0], self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)  # type: ignore[union-attr]

    def mixed_weight(self, weights: Tensor) -> Tensor:
        """``w0 * W + sum_c w_c * (prefix + A_c)`` for candidate weights ``weights``."""
        out = weights[0] * self.weight
        if self.has_prefix:
            out = out + (1 - weights[0]) * self.prefix
        for fam in self.families:
            out = out + fam.mixed(weights)
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
            w = F.gumbel_softmax(self.theta, tau=self.temperature, hard=False)
            self.last_weights = w
            return self._apply_weight(x, self.mixed_weight(w))
        with torch.no_grad():
            probs = F.softmax(self.theta.detach(), 0)
            picked = torch.multinomial(probs, min(2, len(probs)), replacement=False)
        self._sampled = picked
        gates = F.gumbel_softmax(self.theta[picked], tau=self.temperature, hard=False)
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
    model: nn.Module, candidates: dict[str, LayerCandidates], sampling: str = "mixed"
) -> tuple[nn.Module, dict[str, MixedLayer]]:
    """A copy of ``model`` whose layers named in ``candidates`` are super blocks (the original is untouched)."""
    import copy

    from svdnas.surgery import set_submodule

    net = copy.deepcopy(model)
    layers: dict[str, MixedLayer] = {}
    for name, cands in candidates.items():
        layers[name] = MixedLayer(net.get_submodule(name), cands, sampling)
        set_submodule(net, name, layers[name])
    return net, layers
