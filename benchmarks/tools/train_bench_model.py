"""Train the benchmarks' model of another definition than the zoo's (``bench_models.VGG``) on
Fashion-MNIST and write its weights to the cache, where ``module:benchmarks/bench_models.py:vgg_fmnist_trained``
reads them:

    .venv/bin/python -m benchmarks.tools.train_bench_model --epochs 3

Adam, batch 128, a cosine learning rate from --lr, random crops of 2 pixels and flips; seeded, so a
rerun on the same machine writes the same weights. Writes the weights and
benchmarks/results/train_bench_model/vgg_fmnist.json (test top-1, seconds, command).
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.bench_models import VGG_WEIGHTS, vgg_fmnist
from benchmarks.common import parser, result_path, setup, stamp, write_json
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate


def main() -> None:
    p = parser(__doc__, model=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    setup(args, manual_seed=args.seed)
    data = load_data(args.data)
    x, y = data.train.tensors
    model = vgg_fmnist()
    opt = torch.optim.Adam(model.parameters(), args.lr)
    steps = args.epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            xb = nn.functional.pad(x[idx], (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
            xb = xb[:, :, dy : dy + 28, dx : dx + 28]
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(3)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        top1 = evaluate(model.eval(), data.test)["top1"]
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test top-1 {top1:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    VGG_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, VGG_WEIGHTS)
    write_json(result_path("train_bench_model", "vgg_fmnist.json"),
               {"test_top1": top1, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                "seconds": time.perf_counter() - t0, "weights": str(VGG_WEIGHTS), **stamp(args.threads)})
    print(f"wrote {VGG_WEIGHTS}")


if __name__ == "__main__":
    main()
