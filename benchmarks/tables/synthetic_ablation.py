"""The paper's ablation of synthetic recovery, at the scale this machine allows: how many
synthetic images, and the per-layer loss averaged over channels or not.

    .venv/bin/python -m benchmarks.tables.synthetic_ablation --run runs/recovery-resnet18/post \
        --synthetic runs/recovery-resnet18/synthetic.safetensors --counts 128 256 512

One compressed run directory (post-training) is recovered by synthetic distillation (per-layer
MSE, ``svdnas.recovery.recover``) several times, each from the same starting weights with the same
epochs and seed:
  * with the first N training images of --synthetic for each N of --counts (the paper: 1k, 5k, 25k);
  * with --counts' middle N images made without the channel averaging (generated here, with the
    settings --synthetic was made with, unless --synthetic-plain names such a file).
Validation (agreement with the original) uses the same held-out synthetic images for every row;
accuracy is top-1 on the test split. Writes benchmarks/results/synthetic_ablation/<model>.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import first_test_images, parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.lowrank.plan import Plan
from svdnas.models.build import build_model
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import SyntheticSplits, recover
from svdnas.recovery.synthetic import SynthConfig, generate, load_synthetic, save_synthetic
from svdnas.runs.directory import load_run


def main() -> None:
    p = parser(__doc__, model=None, device=True, out="JSON to write (default benchmarks/results/synthetic_ablation/<model>.json)")
    p.add_argument("--run", required=True, help="a post-training run directory")
    p.add_argument("--synthetic", required=True, help="synthetic images made with the channel averaging (svdnas synth)")
    p.add_argument("--synthetic-plain", default=None, help="the same made without it (default: made here)")
    p.add_argument("--counts", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--val", type=int, default=64, help="held-out synthetic images for the schedule (the last of --synthetic)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: synthetic's; 0.001 before 2026-11-26)")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--parallel", type=int, default=1, help="batches optimised at once when the plain images are made here")
    args = p.parse_args()
    setup(args)
    run = Path(args.run)
    arch = json.loads((run / "architecture.json").read_text())
    plan = Plan.from_dict(arch["plan"])
    student0, _ = load_run(run)
    teacher, info = build_model(arch["base"])
    teacher.eval()
    device = torch.device(args.device)
    student0, teacher = student0.to(device), teacher.to(device)
    data = load_data(args.data)
    data = first_test_images(data, args.test_images)
    synth = load_synthetic(args.synthetic)
    images = synth.images
    if max(args.counts) + args.val > len(images):
        raise SystemExit(f"{args.synthetic} holds {len(images)} images: not enough for {max(args.counts)} + {args.val}")
    val = images[len(images) - args.val :]
    config = FinetuneConfig(mode="synthetic", epochs=args.epochs, lr=args.lr)
    made = SynthConfig(**{k: v for k, v in synth.meta["config"].items() if k in {f.name for f in dataclasses.fields(SynthConfig)}})
    middle = sorted(args.counts)[len(args.counts) // 2]
    plain_path = Path(args.synthetic_plain) if args.synthetic_plain else Path(args.synthetic).with_name("synthetic-plain.safetensors")
    t0 = time.perf_counter()
    if not plain_path.with_suffix(".json").is_file() and not plain_path.is_file():
        plain_conf = dataclasses.replace(made, channel_mean=False, num=middle, parallel=args.parallel)
        work = plain_path.with_name(plain_path.stem + ".partial")  # a stopped generation resumes from here
        save_synthetic(plain_path, generate(teacher, tuple(info.input_shape), plain_conf, args.seed, device, workdir=work))
    plain = load_synthetic(plain_path).images[:middle]
    plain_seconds = time.perf_counter() - t0

    before = evaluate(student0, data.test, device)["top1"]
    original = evaluate(teacher, data.test, device)["top1"]
    rows = []
    cases = [(f"{n} images, channel mean", images[:n]) for n in args.counts] + [(f"{middle} images, no channel mean", plain)]
    for label, train in cases:
        student = copy.deepcopy(student0)
        t1 = time.perf_counter()
        rec = recover(teacher, student, plan, "synthetic", config, data, SyntheticSplits(train, val, val[:1], synth.meta), device, args.seed)
        after = evaluate(student, data.test, device)["top1"]
        rows.append({"case": label, "images": len(train), "top1_before": before, "top1_after": after, "drop_after_pp": original - after,
                     "recovered_share": (after - before) / (original - before) if original > before else None,
                     "epochs": len(rec["history"]["epoch"]), "seconds": time.perf_counter() - t1})
        print(f"{label:32s} top-1 {before:6.2f} -> {after:6.2f} (drop {original - after:5.2f}pp, {rows[-1]['seconds']:.0f}s)", flush=True)
    print(f"\noriginal top-1 {original:.2f}, post-training {before:.2f}, on {len(data.test)} test images; "
          f"{args.epochs} epochs; synthetic images: {made.iterations} iterations each")
    out = write_json(args.out or result_path("synthetic_ablation", f"{short_name(arch['base'])}.json"), {
        "run": str(run), "base": arch["base"], "original_top1": original, "post_training_top1": before, "rows": rows,
        "synth_config": dataclasses.asdict(made), "plain_generation_seconds": plain_seconds, "test_images": len(data.test),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **stamp(args.threads),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
