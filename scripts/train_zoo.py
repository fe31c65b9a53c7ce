"""Train the zoo's Fashion-MNIST models; writes src/svdnas/zoo/weights/NAME.safetensors and a log.

Run from the repository root with the project's environment:
    .venv/bin/python scripts/train_zoo.py resnet18 mobilenetv2 efficientnet_b0
EfficientNet-B0 then trained 3 more epochs from its first weights (see its log):
    cp src/svdnas/zoo/weights/efficientnet_b0.safetensors /tmp/effb0-first.safetensors
    .venv/bin/python scripts/train_zoo.py efficientnet_b0 --init /tmp/effb0-first.safetensors --epochs 3 --lr 2e-3
and 4 more from those (copied to /tmp/effb0-second.safetensors the same way):
    .venv/bin/python scripts/train_zoo.py efficientnet_b0 --init /tmp/effb0-second.safetensors --epochs 4 --lr 1e-3
and 2 more from those (copied to /tmp/effb0-9071.safetensors):
    .venv/bin/python scripts/train_zoo.py efficientnet_b0 --init /tmp/effb0-9071.safetensors --epochs 2 --lr 5e-4 --seed 1

Never run by CI. Each model trains in well under an hour on 2 CPU cores (see the logs in
src/svdnas/zoo/weights/*.log for the measured times and accuracies).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from svdnas.data.datasets import load_fmnist
from svdnas.zoo.registry import WEIGHTS_DIR, create_model

# epochs, optimiser, peak learning rate, weight decay
RECIPES = {
    "resnet18": (4, "sgd", 0.1, 5e-4),
    "mobilenetv2": (4, "adamw", 4e-3, 1e-2),
    "efficientnet_b0": (3, "adamw", 4e-3, 1e-2),
}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return 100.0 * correct / len(x)


def train(name: str, batch: int, seed: int, log: Path, init: Path | None = None, epochs: int | None = None, lr: float | None = None) -> None:
    torch.manual_seed(seed)
    data = load_fmnist()
    xtr, ytr = data.train.tensors  # type: ignore[attr-defined]
    xte, yte = data.test.tensors  # type: ignore[attr-defined]
    default_epochs, opt_name, default_lr, wd = RECIPES[name]
    epochs, lr = epochs or default_epochs, lr or default_lr
    model = create_model(name)
    if init is not None:  # continue from earlier weights with a fresh one-cycle schedule
        model.load_state_dict(load_file(str(init)))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * (len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    with log.open("a" if init is not None else "w") as f:

        def say(msg: str) -> None:
            line = f"[{time.perf_counter() - start:7.1f}s] {msg}"
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()

        start_from = f", starting from {init.name}" if init is not None else ""
        say(f"{name}: {epochs} epochs, batch {batch}, {opt_name} lr {lr} wd {wd}, seed {seed}, threads {torch.get_num_threads()}{start_from}")
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(xtr))
            running = 0.0
            for step in range(len(xtr) // batch):
                idx = perm[step * batch : (step + 1) * batch]
                xb = xtr[idx]
                flip = torch.rand(len(idx)) < 0.5  # horizontal flip, the only augmentation
                xb[flip] = xb[flip].flip(-1)
                loss = crit(model(xb), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += loss.item()
                if step % 100 == 99:
                    say(f"epoch {epoch + 1} step {step + 1} loss {running / 100:.4f}")
                    running = 0.0
            say(f"epoch {epoch + 1} done, test top-1 {evaluate(model, xte, yte):.2f}")
        acc = evaluate(model, xte, yte)
        out = WEIGHTS_DIR / f"{name}.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out), metadata={"top1": f"{acc:.2f}", "recipe": json.dumps([epochs, opt_name, lr, wd]), "continued": str(init is not None)})
        say(f"final test top-1 {acc:.2f}, wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", choices=sorted(RECIPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, default=None, help="continue from these weights (one model only)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    if args.init is not None and len(args.models) != 1:
        p.error("--init takes one model")
    for name in args.models:
        train(name, args.batch, args.seed, WEIGHTS_DIR / f"{name}.log", args.init, args.epochs, args.lr)


if __name__ == "__main__":
    main()
