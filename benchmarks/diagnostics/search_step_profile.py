"""Where the time of one `mixed` search step goes: torch.profiler over a few steps of the
super model, the operators grouped into the convolutions (forward and backward) and the building
of the mixed weights (batched matmuls of the rank windows; scaling, adding and folding).

    .venv/bin/python -m benchmarks.diagnostics.search_step_profile --model module:benchmarks/bench_models.py:resnet18_full_fmnist --max-groups 1 --threads 1

Same model, grid, batch and candidates as benchmarks/tables/search_step_cost.py. Prints the profiler's table and
the share of each group in the self CPU time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import parser, setup
from benchmarks.tables.search_step_cost import logits_only, supernet_for
from svdnas.models.build import build_model
from svdnas.pipeline.config import CompressConfig

GROUPS = {
    "convolutions": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::convolution", "aten::_convolution"),
    "weight build: batched matmuls": ("aten::bmm",),
    "weight build: scale, add, fold, cast": ("aten::mul", "aten::add", "aten::add_", "aten::mv", "aten::copy_"),
}


def main() -> None:
    p = parser(__doc__, data=None, seed=None, threads=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--max-groups", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="precision of the rank windows")
    p.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28], help="C H W, for module: models")
    args = p.parse_args()
    setup(args, manual_seed=0)
    model, info = build_model(args.model)
    shape = info.input_shape or tuple(args.input_shape)
    net, n, _ = supernet_for(model, shape, info.default_filter, CompressConfig(reduction=args.reduction).fractions(), args.max_groups, "mixed", args.dtype)
    opt = logits_only(net)
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model}, batch {args.batch}, {n} candidates, {args.steps} steps, {args.threads} threads: share of self CPU time")
    for group, names in GROUPS.items():
        share = sum(e.self_cpu_time_total for e in events if e.key in names) / total
        print(f"  {group:32s} {100 * share:5.1f}%")


if __name__ == "__main__":
    main()
