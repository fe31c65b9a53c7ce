"""svdnas: compress pre-trained CNNs by low-rank approximation found with neural architecture search.

Importing it has no side effects: no CUDA initialisation, no downloads, no thread settings.
"""

from importlib.metadata import PackageNotFoundError, version

from svdnas.cost.counting import count_params, layer_cost, model_macs
from svdnas.data.datasets import DataBundle, load_data
from svdnas.errors import BudgetError, DataError, NonFiniteError, SpecError, SvdnasError, WeightsError, WriteError
from svdnas.lowrank.decompose import decompose
from svdnas.lowrank.modules import LowRankBlock, LowRankBranch
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.space import count_space, enumerate_space
from svdnas.lowrank.spec import LowRankSpec
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import CompressResult, compress
from svdnas.pipeline.config import CompressConfig
from svdnas.pipeline.finetune import finetune
from svdnas.runs.directory import RunDir, load_model, load_run
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import PRESETS, select_targets
from svdnas.surgery.trace import trace_layers

try:
    __version__ = version("svdnas")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def load(directory: str, base_model=None, allow_code: bool = False):
    """Rebuild the compressed model saved in a run directory (no unpickling). See :func:`load_run`."""
    model, _ = load_run(directory, base_model=base_model, allow_code=allow_code)
    return model


__all__ = [
    "PRESETS",
    "BudgetError",
    "CompressConfig",
    "CompressResult",
    "DataBundle",
    "DataError",
    "LowRankBlock",
    "LowRankBranch",
    "LowRankSpec",
    "NonFiniteError",
    "Plan",
    "RunDir",
    "SpecError",
    "SvdnasError",
    "WeightsError",
    "WriteError",
    "apply_plan",
    "compress",
    "count_params",
    "count_space",
    "decompose",
    "enumerate_space",
    "finetune",
    "layer_cost",
    "load",
    "load_data",
    "load_model",
    "load_run",
    "model_macs",
    "run_baseline",
    "select_targets",
    "trace_layers",
]
