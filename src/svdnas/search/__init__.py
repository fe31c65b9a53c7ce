"""SVD-NAS search: candidates pruned by a FLOPs grid, super blocks, logits learned under a budget."""

from svdnas.search.candidates import LayerCandidates, fraction_grid, grid_candidates
from svdnas.search.loop import SearchConfig, SearchHistory, search
from svdnas.search.select import select_within_budget
from svdnas.search.supernet import MixedLayer, build_supernet, window_dtype

__all__ = [
    "LayerCandidates",
    "MixedLayer",
    "SearchConfig",
    "SearchHistory",
    "build_supernet",
    "fraction_grid",
    "grid_candidates",
    "search",
    "select_within_budget",
    "window_dtype",
]
