import contextlib
import gzip
import io
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from svdnas.data.datasets import load_data


@dataclass
class CliResult:
    """What a run of the command line left: its exit code and everything it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: object, env: dict[str, str] | None = None) -> CliResult:
    """``svdnas ARGS`` run in this process by ``svdnas.cli.main``, as a shell would see it: stdout and
    stderr are captured (not terminals, so no progress bars), usage errors give their exit code, and
    the log lines the command line sets up land on the captured stderr. Other exceptions propagate:
    in a test a traceback is a failure. ``env`` is set for the run only."""
    from svdnas.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    out, err = io.StringIO(), io.StringIO()
    root.handlers = []  # so main's logging.basicConfig installs its handler, on the captured stderr
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: usage errors, --help, --version
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers, root.level = handlers, level
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliResult(0 if code is None else code, out.getvalue(), err.getvalue())  # None: as sys.exit(main()) reads it


def run_cli_process(*args: object, timeout: float = 600, **kw):
    """``python -m svdnas ARGS`` in a fresh interpreter with this worktree's sources first on the
    path: for the few end-to-end tests that need a process of their own (killed, resource-limited,
    or the real entry point)."""
    import subprocess

    src = str(Path(__file__).parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p), **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "svdnas", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False, **kw)


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    codes = {torch.uint8: 0x08}
    header = bytes([0, 0, codes[tensor.dtype], tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.contiguous().numpy().tobytes())


@pytest.fixture(autouse=True)
def any_rank(monkeypatch):
    """The pipeline's default rank multiple follows this machine's CPU (ONNX Runtime's channel
    block); the suite pins it to 1, the paper's grid, so that its plans do not depend on the CPU
    it runs on. Tests of the multiple ask for one (``rank_multiple=``) or patch it back."""
    monkeypatch.setattr("svdnas.pipeline.stages.channel_block", lambda device="cpu": 1)


@pytest.fixture(autouse=True)
def untimed_candidates(monkeypatch):
    """By default ``compress`` times every candidate and offers only those faster than their layer;
    the suite turns that off, so that its plans do not depend on this machine's timings (and its
    runs stay quick). Tests of it set ``svdnas.pipeline.stages.offer_only_faster`` back to
    :func:`svdnas.search.latency_costs.offer_only_faster`."""
    monkeypatch.setattr("svdnas.pipeline.stages.offer_only_faster", lambda *args, **kwargs: None)


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """The suite's latency tables and remembered evaluations go to a folder of its own, not the user's."""
    saved = os.environ.get("SVDNAS_CACHE")
    os.environ["SVDNAS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("SVDNAS_CACHE", None)
    else:
        os.environ["SVDNAS_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped data set (IDX files) whose label is readable from the image: class c
    lights up row block c, so a tiny model can learn it."""
    root = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 * c : 2 * c + 3, :] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    return root


class TinyNet(nn.Module):
    """A small CNN with the layer kinds svdnas meets in practice."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: left alone
            nn.Conv2d(16, 24, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny() -> nn.Module:
    return tiny_net().eval()


@pytest.fixture(scope="session")
def trained_tiny(tiny_fmnist):
    """TinyNet trained for a few seconds on the learnable tiny data set."""
    torch.manual_seed(0)
    data = load_data(f"fmnist:{tiny_fmnist}")
    x, y = data.train.tensors
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


@pytest.fixture
def tiny_module(trained_tiny, tmp_path):
    """The trained TinyNet as a module: spec and a weights file, for the command line."""
    from pathlib import Path

    model, _ = trained_tiny
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    factory = tmp_path / "factory.py"
    root = Path(__file__).parents[1]
    factory.write_text(f"import sys\nsys.path.insert(0, {str(root)!r})\nfrom tests.conftest import TinyNet\n\ndef make():\n    return TinyNet()\n")
    return f"module:{factory}:make", weights
