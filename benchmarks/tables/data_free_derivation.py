"""Output-aware factors with no real image: the derivation's statistics from synthetic images.

    .venv/bin/python -m benchmarks.tables.data_free_derivation --model zoo:resnet18 --reduction 0.6

One set of synthetic images is made from the model's BatchNorm statistics (``--synth-images`` of
``--synth-iterations`` steps, as ``svdnas synth`` makes them), then ``compress --mode data-free``
searches and derives on them with each ``--derivations`` kind; the drop read is the compressed
model's top-1 on the real test split *before* any distillation (``report.recovery.before``: the
data-free run's post-training figure; its one epoch of distillation is not what is measured). Beside
them, the same kinds in ``post-training`` on real search and calibration images: how far synthetic
statistics fall from real ones. Writes benchmarks/results/data_free_derivation/<model>.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.recovery.distill import FinetuneConfig
from svdnas.recovery.synthetic import SynthConfig, generate, save_synthetic


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/data_free_derivation/<model>.json)")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--derivations", nargs="+", default=["weight", "prefix"])
    p.add_argument("--synth-images", type=int, default=1384, help="synthetic images (default 1384, compress's own)")
    p.add_argument("--synth-iterations", type=int, default=100)
    p.add_argument("--no-real", action="store_true", help="leave out the rows on real images")
    p.add_argument("--synthetic", default=None, help="a synthetic-image file to reuse where it exists (made with the same --synth-images and "
                                                     "--synth-iterations: not checked), else to write "
                                                     "(default: made in a temporary folder)")
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    data = load_data(args.data)
    reference = evaluate(model, data.test)
    t0 = time.perf_counter()
    synth = SynthConfig(num=args.synth_images, iterations=args.synth_iterations)
    path = Path(args.synthetic) if args.synthetic else Path(tempfile.mkdtemp()) / "synthetic.safetensors"
    reused = path.is_file()
    if not reused:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_synthetic(path, generate(model, info.input_shape, synth, seed=args.seed))
    synth_seconds = None if reused else time.perf_counter() - t0
    print(f"{args.synth_images} synthetic images of {args.synth_iterations} iterations: "
          + (f"read from {path}" if reused else f"made in {synth_seconds:.0f} s"), flush=True)
    rows = []
    runs = [("data-free", d) for d in args.derivations] + ([] if args.no_real else [("post-training", d) for d in args.derivations])
    for mode, derivation in runs:
        config = CompressConfig(reduction=args.reduction, derivation=derivation, mode=mode,
                                **({"synthetic_path": str(path), "synth": synth, "finetune": FinetuneConfig(epochs=1)} if mode == "data-free" else {}))
        rep = compress(model, data, config, input_shape=info.input_shape, filter_fn=info.default_filter, seed=args.seed,
                       reference=reference).report
        top1 = rep["recovery"]["before"]["top1"] if mode == "data-free" else rep["top1"]["compressed"]
        row = {"mode": mode, "derivation": derivation, "flops_reduction": rep["flops"]["reduction"], "top1": top1,
               "drop_pp": reference["top1"] - top1, "seconds": rep["seconds"]}
        rows.append(row)
        print(f"{mode} {derivation}: FLOPs -{100 * row['flops_reduction']:.2f}%, top-1 {top1:.2f}, drop {row['drop_pp']:.2f} pp", flush=True)
    print(f"\n{args.model} at R = {args.reduction}, original top-1 {reference['top1']:.2f}; search and statistics on "
          f"{args.synth_images} synthetic images ({args.synth_iterations} iterations) or on real training images")
    print(markdown_table(["images", "derivation", "FLOPs reduction", "top-1 before distillation", "drop (pp)"],
                         [["synthetic" if r["mode"] == "data-free" else "real", r["derivation"], f"{100 * r['flops_reduction']:.2f}%",
                           f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}"] for r in rows]))
    out = write_json(args.out or result_path("data_free_derivation", f"{short_name(args.model)}.json"),
                     {"model": args.model, "reduction": args.reduction, "original_top1": reference["top1"], "synth_seconds": synth_seconds, "synthetic_file": str(path) if reused else None,
                      "synth_images": args.synth_images, "synth_iterations": args.synth_iterations, "rows": rows, **stamp(args.threads)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
