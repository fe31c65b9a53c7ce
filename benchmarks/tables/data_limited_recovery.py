"""Data-limited recovery (the paper's Table 1 synthetic rows, Table 2 and S1.3 analogue): one compressed model,
recovered with synthetic images, with a few labelled images, and a fully data-free run, side by side.

    .venv/bin/python -m benchmarks.tables.data_limited_recovery --model zoo:resnet18 --reduction 0.6

Every step is a `svdnas` command (printed before it runs), so each row can be reproduced by hand:
  1. synth: synthetic images from the model's BatchNorm statistics (made once, shared by 3 and 5);
  2. compress, post-training (the starting point);
  3. finetune --mode synthetic (per-layer MSE on the synthetic images);
  4. finetune --mode few-shot (MSE + KL at T=6 + CE, alpha 0.95, on --shots labelled images);
  5. compress --mode data-free (search on the synthetic images with the original's soft labels,
     then synthetic recovery; the real test split is read only to report accuracy).
Steps whose run directory already holds a report are not run again (the benchmark resumes).
Writes benchmarks/results/data_limited_recovery/<model>.json (or --json) and beside it <stem>_synthetic_vs_real.png,
synthetic images beside real ones.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import parser, result_path, short_name, stamp, write_json


def run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def figure(synthetic: Path, data_spec: str, out: Path, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from svdnas.data.datasets import load_data
    from svdnas.recovery.synthetic import load_synthetic

    fake = load_synthetic(synthetic).images[:n]
    real = load_data(data_spec).test.tensors[0][:n]  # type: ignore[union-attr]
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3))
    for row, (label, imgs) in enumerate((("real", real), ("synthetic", fake))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(imgs[i, 0].numpy(), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label)
    fig.suptitle("Fashion-MNIST test images (top) and synthetic images from BatchNorm statistics (bottom)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__, seed=None)
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--synth-images", type=int, default=1384, help="all synthetic images (learning + val + test)")
    p.add_argument("--synth-iterations", type=int, default=500)
    p.add_argument("--synth-val", type=int, default=128)
    p.add_argument("--synth-test", type=int, default=256)
    p.add_argument("--shots", type=int, default=1000)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--finetune-lr", type=float, default=None, help="default: the mode's (0.001 before 2026-11-26)")
    p.add_argument("--out", default=None, help="folder of the run directories (default runs/recovery-<model>)")
    p.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/data_limited_recovery/<model>.json)")
    args = p.parse_args()
    name = short_name(args.model)
    out = Path(args.out or f"runs/recovery-{name}")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    svdnas = [sys.executable, "-m", "svdnas"]
    common = ["--seed", "0", "--device", "cpu", "--quiet"]
    ft = ["--finetune-epochs", str(args.finetune_epochs)] if args.finetune_epochs else []
    ft += ["--finetune-lr", str(args.finetune_lr)] if args.finetune_lr else []
    synth_file = out / "synthetic.safetensors"
    split = ["--synth-val", str(args.synth_val), "--synth-test", str(args.synth_test)]
    steps = {
        "synth": (synth_file.with_suffix(".json"), [*svdnas, "synth", args.model, "--num", str(args.synth_images), "--out", str(synth_file),
                                                    "--synth-iterations", str(args.synth_iterations), *common]),
        "post-training": (out / "post" / "report.json", [*svdnas, "compress", args.model, "--data", args.data, "--reduction", str(args.reduction),
                                                         "--out", str(out / "post"), "--overwrite", *common]),
        "synthetic": (out / "synthetic" / "report.json", [*svdnas, "finetune", str(out / "post"), "--data", args.data, "--mode", "synthetic",
                                                          "--synthetic", str(synth_file), *split, "--out", str(out / "synthetic"), "--overwrite", *ft, *common]),
        "few-shot": (out / "few-shot" / "report.json", [*svdnas, "finetune", str(out / "post"), "--data", args.data, "--mode", "few-shot",
                                                        "--shots", str(args.shots), "--out", str(out / "few-shot"), "--overwrite", *ft, *common]),
        "data-free": (out / "data-free" / "report.json", [*svdnas, "compress", args.model, "--data", args.data, "--mode", "data-free",
                                                          "--reduction", str(args.reduction), "--synthetic", str(synth_file), *split,
                                                          "--out", str(out / "data-free"), "--overwrite", *ft, *common]),
    }
    wall = {}
    for step, (done, cmd) in steps.items():
        if done.is_file():
            print(f"# {step}: {done} exists, not run again", flush=True)
            continue
        wall[step] = run(cmd, env)

    synth_meta = json.loads(synth_file.with_suffix(".json").read_text())
    rows = []
    post = json.loads((out / "post" / "report.json").read_text())
    for mode in ("post-training", "synthetic", "few-shot", "data-free"):
        r = json.loads((out / ("post" if mode == "post-training" else mode) / "report.json").read_text())
        rec = r.get("recovery") or {}
        rows.append({
            "mode": mode, "flops_reduction": r["flops"]["reduction"], "top1_original": r["top1"]["original"],
            "top1_before_recovery": rec.get("before", {}).get("top1", r["top1"]["compressed"]),
            "top1": r["top1"]["compressed"], "drop_pp": r["top1"]["drop_pp"],
            "fidelity": (r.get("fidelity") or {}).get("top1_agreement"),
            "finetune_epochs": len(rec.get("history", {}).get("epoch", [])) if rec else 0,
            "seconds": r["seconds"], "wall_seconds": wall.get(mode),
        })
    print(f"\n{args.model}, R={args.reduction}, original top-1 {post['top1']['original']:.2f}%; "
          f"{synth_meta['num']} synthetic images x {synth_meta['config']['iterations']} iterations in {synth_meta['seconds']:.0f}s")
    print(f"{'mode':14s} {'FLOPs -%':>8s} {'top-1 before':>12s} {'top-1 after':>11s} {'drop pp':>8s} {'fidelity':>8s} {'ft epochs':>9s} {'ft s':>7s}")
    for row in rows:
        fid = f"{row['fidelity']:.2f}" if row["fidelity"] is not None else "-"
        print(f"{row['mode']:14s} {100 * row['flops_reduction']:8.2f} {row['top1_before_recovery']:12.2f} {row['top1']:11.2f} "
              f"{row['drop_pp']:8.2f} {fid:>8s} {row['finetune_epochs']:9d} {row['seconds'].get('finetune', 0):7.0f}")
    post_drop = rows[0]["drop_pp"]
    synth_drop = rows[1]["drop_pp"]
    print(f"synthetic recovery removes {100 * (post_drop - synth_drop) / post_drop:.1f}% of the post-training drop")
    path = Path(args.json or result_path("data_limited_recovery", f"{name}.json"))
    fig = path.with_name(f"{path.stem}_synthetic_vs_real.png")  # the plot beside the JSON
    fig.parent.mkdir(parents=True, exist_ok=True)
    figure(synth_file, args.data, fig)
    result = {
        "benchmark": "recovery", "model": args.model, "reduction": args.reduction, **stamp(args.threads), "torch_threads": args.threads,
        "synthetic": {"images": synth_meta["num"], "config": synth_meta["config"], "seconds": synth_meta["seconds"]},
        "rows": rows,
    }
    write_json(path, result)
    print(f"wrote {path} and {fig}")


if __name__ == "__main__":
    main()
