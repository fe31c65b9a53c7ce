"""What ``compress`` does: the configuration of the whole job, validated where it is made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from svdnas.cost.table import LatencyConfig
from svdnas.cost.timer import RUNTIMES
from svdnas.errors import SpecError
from svdnas.lowrank.calibration import PATCHES_PER_COLUMN
from svdnas.lowrank.derivation import KINDS as DERIVATIONS
from svdnas.options import Config, option
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import RECOVERY_MODES
from svdnas.recovery.synthetic import SynthConfig
from svdnas.search import SearchConfig, fraction_grid

OBJECTIVES = ("flops", "params", "latency")
MODES = ("post-training", *RECOVERY_MODES)
SEARCH_LOSSES = ("ce", "kd")


def parse_grid(value: str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """``--grid START:STOP[:STEP]`` (or a list of two or three numbers) as (start, stop, step); step defaults to 0.05."""
    if value is None:
        return None
    try:
        parts = tuple(float(x) for x in (value.split(":") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) not in (2, 3):
        raise SpecError(f"--grid must be START:STOP[:STEP], got {value!r}")
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else 0.05)


def parse_max_groups(value: int | str | None) -> int | None:
    """``--max-groups N``, where 0 (like None) means no limit."""
    if value is None or int(value) == 0:
        return None
    return int(value)


@dataclass
class CompressConfig(Config):
    """What ``compress`` does.

    Attributes:
        reduction: share of the original cost to remove (0 < R < 1); the result meets R - 0.01.
        beta: the paper's fixed trade-off instead of a reduction target.
        objective: ``flops``, ``params`` or ``latency`` (measured on the run's device, see
            :mod:`svdnas.latency_table`).
        latency: how the latency table measures (batch, repeats, cache file): the latency
            objective's table, and the one that times the candidates under every objective; None
            for the defaults.
        filter: layer preset or None for the model's default.
        grid: (start, stop, step) of the candidate grid, as fractions of each layer's cost kept;
            None centres a window on the target (for latency, reaching down to 5%).
        max_groups: largest group count of a candidate (None, the default: every divisor of the
            channels, the paper's space).
        rank_multiple: ranks rounded to multiples of it, and only candidates whose convolutions keep
            whole channel blocks (None, the default: :func:`svdnas.cost.timer.channel_block` of the
            device, where ONNX Runtime's CPU kernels compute; 1: the paper's grid, any rank).
        offer_slower: also offer candidates that the latency table measures no faster than their
            original layer. By default they are not offered under any objective (first branch):
            under ``flops`` and ``params`` each candidate left by the output-error proxy is timed
            (in the table of ``runtime``, with ``latency``'s settings and cache) for this alone.
        families: families (split and grouping) kept per layer by the output-error proxy (0: all).
        proxy_drop: the one-layer accuracy proxy's threshold: a candidate whose layer, compressed
            alone, loses more than this many points of top-1 on the proxy images is removed (0: off).
            Doubled (with a warning) while what is left cannot meet the budget. None: 5 with the
            ``weight`` derivation, off with the output-aware ones (whose candidates it almost never
            removed: none on ``zoo:resnet18`` at 40-70%, 1-2 of 600-800 on ``zoo:efficientnet_b0``,
            the same plans without it; ``benchmarks/RESULTS.md``).
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
        derivation: how every candidate's factors are derived: ``weight`` (the paper's truncated SVD
            of the unfolded weight), ``whitened`` or ``refit`` (fitted to the layer's output on
            calibration images), or ``prefix`` (whitened in the search; the plan's layers then fitted
            in order on the compressed prefix's inputs, biases corrected); see
            :mod:`svdnas.lowrank.derivation` and :mod:`svdnas.surgery.prefix`.
        keep_search_plan: keep the search's plan as it is. By default (output-aware derivations, a
            reduction on FLOPs or params, one branch) it is checked against two spectrum
            allocations' (each candidate's output error read from its family's whitened spectrum,
            the sum minimised within the budget; once as it is, once with each layer's errors
            weighted by its sensitivity) on the proxy images, and the one nearest the original
            model kept; see :mod:`svdnas.search.allocation`.
        calibration_images: search images (synthetic ones in ``data-free``) whose layer inputs make
            the output-aware derivations' statistics.
    """

    reduction: float | None = option(None, flag="--reduction", help="share of the original cost to remove, 0 < R < 1")
    beta: float | None = option(None, flag="--beta", help="the paper's fixed trade-off instead of --reduction")
    objective: str = option("flops", flag="--objective", choices=OBJECTIVES,
                            help="the cost to reduce (latency: measured on this machine's --device)")
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)
    runtime: str | None = option(None, flag="--runtime", choices=RUNTIMES,
                                 help="where latency is measured (the candidates' table too) and the report's leads from: "
                                      "onnxruntime (default when installed) or torch; with --objective latency the budget is met on the whole model "
                                      "measured there")
    filter: str | None = option(None, flag="--filter", help="target layers: all-but-first, convs, pointwise, linear, "
                                "convs+linear (default: the paper's for the model)")
    grid: tuple[float, float, float] | None = option(None, flag="--grid", parse=parse_grid, metavar="START:STOP[:STEP]",
                                                     help="kept-cost fractions per layer (default: around the target)")
    max_groups: int | None = option(None, flag="--max-groups", parse=parse_max_groups,
                                    help="largest group count of a candidate (default: no limit; 0 says the same)")
    rank_multiple: int | None = option(None, flag="--rank-multiple",
                                       help="ranks rounded to multiples of N, and only candidates whose convolutions keep whole "
                                            "channel blocks (default: ONNX Runtime's block on this CPU, 16 with AVX-512, 8 with "
                                            "AVX2; 1 on a GPU; 1: any rank, the paper's grid)")
    offer_slower: bool = option(False, flag="--offer-slower",
                                help="also offer candidates measured slower than their original layer (default: under every "
                                     "objective only candidates faster than the layer in the --runtime's latency table are offered)")
    families: int = option(4, flag="--families", help="families kept per layer by the output-error proxy (0: all)")
    proxy_drop: float | None = option(None, flag="--proxy-drop", metavar="PP",
                                      help="remove candidates whose layer alone loses more than PP points of top-1 on the proxy "
                                           "images (0: off; default 5 with --derivation weight, off with the output-aware ones)")
    search_images: int = option(1000, flag="--search-images", help="labelled training images the search learns on")
    proxy_images: int = option(256, flag="--proxy-images",
                               help="training images, apart from the search images, for both proxies (fewer: faster, coarser verdicts)")
    branches: int = option(1, flag="--branches", choices=(1, 2), help="2: the residual extension (a second search)")
    search_loss: str = option("ce", flag="--search-loss", choices=SEARCH_LOSSES,
                              help="ce: labels (the paper); kd: the original model's soft labels")
    search: SearchConfig = field(default_factory=lambda: SearchConfig(target=0.5))
    mode: str = option("post-training", flag="--mode", choices=MODES, help="recovery after the search")
    finetune: FinetuneConfig | None = None
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(num=1384))
    synthetic_path: str | None = option(None, flag="--synthetic",
                                        help="reuse synthetic images written by `svdnas synth` (a .safetensors file)")
    synth_val: int = option(128, flag="--synth-val", help="synthetic images held out to steer the schedule")
    synth_test: int = option(256, flag="--synth-test", help="synthetic images held out for the fidelity figure")
    derivation: str = option("prefix", flag="--derivation", choices=DERIVATIONS,
                             help="how each candidate's factors are derived: weight (the paper's SVD of the weight), "
                                  "whitened or refit (fitted to the layer's output on calibration images), "
                                  "prefix (whitened, then each layer refitted on the compressed layers before it)")
    keep_search_plan: bool = option(False, flag="--keep-search-plan",
                                    help="keep the search's plan as it is (default: it is checked on the proxy images against the plans "
                                         "that minimise the spectrum-read output errors within the budget, plain and weighted by each "
                                         "layer's sensitivity, and the best kept)")
    calibration_images: int = option(512, flag="--calibration-images",
                                     help="search images (synthetic in data-free) whose layer inputs make the output-aware statistics")
    calibration_patches: int = option(PATCHES_PER_COLUMN, flag="--calibration-patches",
                                      help="input patches per column each output-aware moment sums at least: where the calibration "
                                           "images give more (a large early feature map), only every k-th is summed (0: every patch)")

    def __post_init__(self) -> None:
        if self.derivation not in DERIVATIONS:
            raise SpecError(f"--derivation must be one of {', '.join(DERIVATIONS)}, got {self.derivation!r}")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise SpecError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.calibration_images < 1:
            raise SpecError("--calibration-images must be positive")
        if self.calibration_patches < 0:
            raise SpecError(f"--calibration-patches must be 0 (every patch) or positive, got {self.calibration_patches}")
        if self.mode not in MODES:
            raise SpecError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_synthetic_splits(self.synth_val, self.synth_test)
        if self.reduction is not None and self.beta is not None:
            raise SpecError("give --reduction or --beta, not both (exactly one of them)")
        if self.reduction is None and self.beta is None:
            raise SpecError("give --reduction R (share of the cost to remove) or --beta X (exactly one of them)")
        if self.reduction is not None and not 0 < self.reduction < 1:
            raise SpecError(f"--reduction must be in (0, 1), got {self.reduction}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.search_loss not in SEARCH_LOSSES:
            raise SpecError(f"--search-loss must be ce or kd, got {self.search_loss!r}")
        if self.branches not in (1, 2):
            raise SpecError(f"--branches must be 1 or 2, got {self.branches}")
        if self.families < 0:
            raise SpecError(f"--families must be 0 (all) or positive, got {self.families}")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise SpecError(f"--rank-multiple must be positive, got {self.rank_multiple}")
        if self.max_groups is not None and self.max_groups < 1:
            raise SpecError(f"--max-groups must be positive (0: no limit), got {self.max_groups}")
        if self.search_images < 1:
            raise SpecError("--search-images must be positive")
        if self.proxy_images < 1:
            raise SpecError("--proxy-images must be positive")
        if self.proxy_drop is None:
            self.proxy_drop = 5.0 if self.derivation == "weight" else 0.0
        if not 0 <= self.proxy_drop <= 100:
            raise SpecError(f"--proxy-drop must be in [0, 100] points of top-1, got {self.proxy_drop}")
        if self.grid is not None:
            self.fractions()  # checks the grid

    def uses_proxy(self) -> bool:
        return self.families > 0 or self.proxy_drop > 0

    def fractions(self) -> list[float]:
        if self.grid is not None:
            start, stop, step = self.grid
            if not 0 < start <= stop < 1 or step <= 0:
                raise SpecError(f"--grid must satisfy 0 < start <= stop < 1 and step > 0, got {self.grid}")
            return fraction_grid(start, stop, step)
        kept = 1.0 - (self.reduction if self.reduction is not None else 0.5)
        # a low-rank block's latency falls more slowly than its FLOPs (two layers' fixed costs), so the
        # latency objective needs candidates far below the target's share of FLOPs
        low = 0.05 if self.objective == "latency" else max(0.05, round(kept - 0.25, 2))
        return fraction_grid(low, min(0.95, round(kept + 0.35, 2)))


def check_synthetic_splits(synth_val: int, synth_test: int) -> None:
    """The held-out synthetic image counts (compress and finetune both take them)."""
    for flag, n in (("--synth-val", synth_val), ("--synth-test", synth_test)):
        if n < 1:
            raise SpecError(f"{flag} must be positive, got {n}")
