"""What ``compress`` does: the configuration of the whole job, validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass

from svdnas.cost.table import LatencyConfig
from svdnas.errors import SpecError
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import RECOVERY_MODES
from svdnas.recovery.synthetic import SynthConfig
from svdnas.search import SearchConfig, fraction_grid

OBJECTIVES = ("flops", "params", "latency")


MODES = ("post-training", *RECOVERY_MODES)


@dataclass
class CompressConfig:
    """What ``compress`` does.

    Attributes:
        reduction: share of the original cost to remove (0 < R < 1); the result meets R - 0.01.
        beta: the paper's fixed trade-off instead of a reduction target.
        objective: ``flops``, ``params`` or ``latency`` (measured on the run's device, see
            :mod:`svdnas.latency_table`).
        latency: how the latency table measures (batch, repeats, cache file); None for the defaults.
        filter: layer preset or None for the model's default.
        grid: (start, stop, step) of the candidate grid, as fractions of each layer's cost kept;
            None centres a window on the target (for latency, reaching down to 5%).
        max_groups: largest group count of a candidate (None, the default: every divisor of the
            channels, the paper's space).
        families: families (split and grouping) kept per layer by the output-error proxy (0: all).
        proxy_drop: the one-layer accuracy proxy's threshold: a candidate whose layer, compressed
            alone, loses more than this many points of top-1 on the proxy images is removed (0: off).
            Doubled (with a warning) while what is left cannot meet the budget.
        search_images: labelled training images the logits learn on.
        proxy_images: further training images, apart from the search images, for the proxy.
        branches: 1, or 2 for the residual extension (a second search over the first's residual).
        search_loss: ``ce`` on the labels (the paper), or ``kd``: cross-entropy against the original
            model's softmax on the same images (its soft labels).
        search: the search loop's settings (its ``target``/``beta`` are filled in from above).
        mode: ``post-training`` (no recovery), ``synthetic``, ``few-shot``, ``full`` or ``data-free``
            (search on synthetic images with the original model's soft labels, then synthetic recovery).
        finetune: the recovery's settings (None: the paper's for the mode).
        synth: how synthetic images are made (synthetic and data-free modes).
        synthetic_path: reuse images written by ``svdnas synth`` instead of making new ones.
        synth_val, synth_test: synthetic images held out for the recovery's schedule and for the
            fidelity figure (top-1 agreement with the original).
    """

    reduction: float | None = None
    beta: float | None = None
    objective: str = "flops"
    latency: LatencyConfig | None = None
    filter: str | None = None
    grid: tuple[float, float, float] | None = None
    max_groups: int | None = None
    families: int = 4
    proxy_drop: float = 5.0
    search_images: int = 1000
    proxy_images: int = 256
    branches: int = 1
    search_loss: str = "ce"
    search: SearchConfig | None = None
    mode: str = "post-training"
    finetune: FinetuneConfig | None = None
    synth: SynthConfig | None = None
    synthetic_path: str | None = None
    synth_val: int = 128
    synth_test: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.synth_val < 1 or self.synth_test < 1:
            raise SpecError("synthetic validation and fidelity image counts must be positive")
        if (self.reduction is None) == (self.beta is None):
            raise SpecError("give exactly one of --reduction and --beta")
        if self.reduction is not None and not 0 < self.reduction < 1:
            raise SpecError(f"--reduction must be in (0, 1), got {self.reduction}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.search_loss not in ("ce", "kd"):
            raise SpecError(f"--search-loss must be ce or kd, got {self.search_loss!r}")
        if self.branches not in (1, 2):
            raise SpecError(f"--branches must be 1 or 2, got {self.branches}")
        if self.search_images < 1:
            raise SpecError("--search-images must be positive")
        if self.proxy_images < 1:
            raise SpecError("--proxy-images must be positive")
        if not 0 <= self.proxy_drop <= 100:
            raise SpecError(f"--proxy-drop must be in [0, 100] points of top-1, got {self.proxy_drop}")

    def uses_proxy(self) -> bool:
        return self.families > 0 or self.proxy_drop > 0

    def fractions(self) -> list[float]:
        if self.grid is not None:
            start, stop, step = self.grid
            if not 0 < start <= stop < 1 or step <= 0:
                raise SpecError(f"grid must satisfy 0 < start <= stop < 1 and step > 0, got {self.grid}")
            return fraction_grid(start, stop, step)
        kept = 1.0 - (self.reduction if self.reduction is not None else 0.5)
        # a low-rank block's latency falls more slowly than its FLOPs (two layers' fixed costs), so the
        # latency objective needs candidates far below the target's share of FLOPs
        low = 0.05 if self.objective == "latency" else max(0.05, round(kept - 0.25, 2))
        return fraction_grid(low, min(0.95, round(kept + 0.35, 2)))
