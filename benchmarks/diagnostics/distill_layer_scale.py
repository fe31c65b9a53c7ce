"""How large the distillation's per-layer term is for a compressed model: over one batch of training
images, each compressed layer's MSE against the original's output and the mean square of that
output, the sum of the MSEs (the paper's term) and of the relative MSEs (svdnas's default). Shows
why the paper's plain sum suits one model's learning rate and wrecks another's.

    .venv/bin/python -m benchmarks.diagnostics.distill_layer_scale runs/mbv2-r0.3 zoo:mobilenetv2
"""

from __future__ import annotations

from pathlib import Path

import torch

import svdnas
from benchmarks.common import parser, setup
from svdnas.data.datasets import load_data
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.recovery.distill import _Outputs, layer_mse


def main() -> None:
    p = parser(__doc__, model=None, threads=None, seed=None)
    p.add_argument("run", type=Path, help="a run directory written by compress or baseline")
    p.add_argument("model", help="the original model's spec")
    p.add_argument("--images", type=int, default=64, help="the first N training images (one batch)")
    p.add_argument("--top", type=int, default=5, help="layers to list, largest MSE first")
    args = p.parse_args()
    setup(args)
    student = svdnas.load(str(args.run))
    teacher, _ = build_model(args.model)
    layers = [n for n, specs in Plan.from_json((args.run / "plan.json").read_text()).layers.items() if specs]
    train = load_data(args.data).train
    x = torch.stack([train[i][0] for i in range(args.images)])
    student.eval(), teacher.eval()
    s_out, t_out = _Outputs(student, layers), _Outputs(teacher, layers)
    with torch.no_grad():
        student(x), teacher(x)
    rows = [(n, *(float(layer_mse(s_out.out[n], t_out.out[n], kind)) for kind in ("plain", "relative")), float(t_out.out[n].pow(2).mean()))
            for n in layers]
    print(f"{args.run}: {len(layers)} compressed layers, {args.images} training images")
    print(f"sum of plain MSEs (the paper's term): {sum(r[1] for r in rows):.3f}")
    print(f"sum of relative MSEs (svdnas's default): {sum(r[2] for r in rows):.3f}")
    print(f"original outputs' mean square: median {sorted(r[3] for r in rows)[len(rows) // 2]:.3f}, largest {max(r[3] for r in rows):.3f}")
    for name, mse, rel, ms in sorted(rows, key=lambda r: -r[1])[: args.top]:
        print(f"  {name}: MSE {mse:.3f}, original mean square {ms:.3f}, relative {rel:.3f}")


if __name__ == "__main__":
    main()
