"""svdnas and the baselines after the same recovery (the paper's Tables 2 and 3 analogue).

    .venv/bin/python -m benchmarks.tables.methods_after_recovery --model zoo:resnet18 --reduction 0.6 --mode few-shot

Every method compresses the same model to the same FLOPs budget post-training, then each
compressed model is fine-tuned by the same distillation (``svdnas.recovery.recover``, the settings
of ``--mode``: few-shot is MSE + KL at T=6 + CE, alpha 0.95, on --shots labelled training images;
full is CE on the whole training split), with the same epochs, seed and validation images. The
table gives top-1 before and after on the same test images. Writes
benchmarks/results/methods_after_recovery/<mode>_<model>.json after every method (a rerun resumes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from benchmarks.common import model_and_data, parser, result_path, setup, short_name, stamp
from svdnas.data.evaluate import evaluate
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.recover import recover

METHODS = ["svdnas", "lrs2", "energy-kx1", "uniform-1x1", "alds", "fgroup"]


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/methods_after_recovery/<mode>_<model>.json)")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--mode", choices=("few-shot", "full"), default="few-shot")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--shots", type=int, default=1000)
    p.add_argument("--augment", action="store_true", help="flip and shift the training images (svdnas finetune --augment)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the mode's)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the mode's; 0.001 before 2026-11-26)")
    p.add_argument("--test-images", type=int, default=None)
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args, args.test_images)
    fconf = FinetuneConfig(mode=args.mode, shots=args.shots, augment=args.augment, lr=args.lr)
    if args.epochs is not None:
        fconf.epochs = args.epochs
    fconf.__post_init__()
    out = Path(args.out or result_path("methods_after_recovery", f"{args.mode}_{short_name(args.model)}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "reduction": args.reduction, "mode": args.mode, "finetune": dataclasses.asdict(fconf),
            "test_images": len(data.test), "seed": args.seed, **stamp(args.threads)}
    rows: list[dict] = []
    if out.is_file():
        old = json.loads(out.read_text())
        if all(old["meta"].get(k) == meta[k] for k in ("model", "reduction", "mode", "finetune", "test_images", "seed")):
            rows = old["rows"]
    reference = evaluate(model, data.test)
    for method in args.methods:
        if any(r["method"] == method for r in rows):
            continue
        t0 = time.perf_counter()
        if method == "svdnas":
            res = compress(model, data, CompressConfig(reduction=args.reduction), input_shape=info.input_shape,
                           filter_fn=info.default_filter, seed=args.seed, reference=reference)
            compressed, plan, rep = res.model, res.plan, res.report
        else:
            base, _, split = method.partition("-")
            compressed, plan, rep = run_baseline(base, model, data, args.reduction, info.input_shape, info.default_filter, split or "kx1",
                                                 seed=args.seed, reference=reference)
        t1 = time.perf_counter()
        rec = recover(model, compressed, plan, args.mode, fconf, data, None, "cpu", args.seed)
        after = evaluate(compressed, data.test)
        rows.append({
            "method": method, "flops_reduction": rep["flops"]["reduction"], "original_top1": reference["top1"],
            "top1_before": rep["top1"]["compressed"], "top1_after": after["top1"], "drop_after_pp": reference["top1"] - after["top1"],
            "epochs": len(rec["history"]["epoch"]), "compress_seconds": t1 - t0, "finetune_seconds": time.perf_counter() - t1,
        })
        r = rows[-1]
        print(f"{method:12s} FLOPs -{100 * r['flops_reduction']:5.1f}%  top-1 {r['top1_before']:6.2f} -> {r['top1_after']:6.2f} "
              f"(drop {r['drop_after_pp']:5.2f}pp, {r['epochs']} epochs, {r['finetune_seconds']:.0f}s)", flush=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\n{args.model} at R={args.reduction}, {args.mode} recovery; original top-1 {reference['top1']:.2f} on {len(data.test)} test images")
    print(f"{'method':12s} {'FLOPs -%':>8s} {'before':>7s} {'after':>7s} {'drop pp':>8s}")
    for r in sorted(rows, key=lambda r: r["drop_after_pp"]):
        print(f"{r['method']:12s} {100 * r['flops_reduction']:8.2f} {r['top1_before']:7.2f} {r['top1_after']:7.2f} {r['drop_after_pp']:8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
