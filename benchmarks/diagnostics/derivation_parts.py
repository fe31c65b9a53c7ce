"""What each part of the output-aware derivation gives, on one fixed plan: the plan of a run directory
(families and ranks as its search chose them) derived again in every way, each evaluated post-training
on the whole test split.

    .venv/bin/python -m benchmarks.diagnostics.derivation_parts --run runs/demo

Rows: the weight's SVD (the paper's), whitened, whitened with bias correction, refit (exact output
error where the second layer holds kernel dims), prefix without and with bias correction (each layer
fitted on the inputs the compressed layers before it give it), and prefix with the exact refit (alternating
least squares on the true error where the pooled fit approximates it). The calibration images are the first
--calibration-images of the search images compress draws with --seed; the moments sum every patch unless
--calibration-patches is given (compress's default is 256). Writes
benchmarks/results/derivation_parts/<model>_<run>.json.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, model_and_data, parser, result_path, setup, short_name, stamp
from svdnas.data.datasets import search_subset
from svdnas.data.evaluate import batches, evaluate
from svdnas.lowrank.calibration import sampling
from svdnas.lowrank.derivation import calibrate
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import derive
from svdnas.surgery.prefix import fit_on_prefix
from svdnas.surgery.swap import apply_plan, set_submodule
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers

PARTS = ("weight", "whitened", "whitened+bias", "refit", "refit+bias", "prefix", "prefix+bias", "prefix+bias+refit")


def derived(model, plan: Plan, part: str, images: list[torch.Tensor], order: list[str], refit_iters: int = 4,
            patches_per_column: int = 0) -> torch.nn.Module:
    if part == "weight":
        return apply_plan(copy.deepcopy(model), plan)
    if part.startswith("prefix"):
        return fit_on_prefix(model, plan, order, images, "cpu", bias_correction="+bias" in part,
                             refit_iters=refit_iters if part.endswith("+refit") else 0, patches_per_column=patches_per_column or None).model
    kind = part.removesuffix("+bias")
    derivation = calibrate(model, kind, plan.compressed(), images, "cpu", sampling=sampling(sum(len(x) for x in images), patches_per_column))
    out = copy.deepcopy(model)
    for name, specs in plan.compressed().items():
        layer = model.get_submodule(name)
        block = derive(layer, specs, kind, derivation.stats[name], bias_correction=part.endswith("+bias"), refit_iters=refit_iters)
        set_submodule(out, name, block.to(dtype=layer.weight.dtype))
    return out


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/derivation_parts/<model>_<run>.json)")
    p.add_argument("--run", required=True, help="a run directory whose plan.json is derived again, or a plan.json (or this "
                                                "script's own JSON, which holds the plan it derived)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--search-images", type=int, default=1000, help="compress's --search-images (the calibration images are their first ones)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--refit-iters", type=int, default=4, help="alternating steps of the refits (default 4)")
    p.add_argument("--calibration-patches", type=int, default=0,
                   help="patches per column each moment sums at least, as compress's option (default 0 here: every patch)")
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args)
    model.eval()
    source = Path(args.run) / "plan.json" if Path(args.run).is_dir() else Path(args.run)
    loaded = json.loads(source.read_text())
    plan = Plan.from_dict(loaded.get("plan", loaded))
    infos = trace_layers(model, example_input(model, info.input_shape))
    order = [n for n in infos if n in plan.layers]  # forward order
    assert set(select_targets(model, infos, info.default_filter)[0]) >= set(plan.compressed())
    search, _ = search_subset(data.train, args.search_images, args.seed)
    calibration = torch.utils.data.Subset(search, range(min(args.calibration_images, len(search))))
    images = [x for x, _ in batches(calibration, 128)]
    original = evaluate(model, data.test)["top1"]
    rows = []
    for part in args.parts:
        t0 = time.perf_counter()
        compressed = derived(model, plan, part, images, order, args.refit_iters, args.calibration_patches)
        seconds = time.perf_counter() - t0
        top1 = evaluate(compressed, data.test)["top1"]
        rows.append({"part": part, "top1": top1, "drop_pp": original - top1, "derive_seconds": seconds})
        print(f"{part:14s} top-1 {top1:6.2f}  drop {original - top1:6.2f}pp  ({seconds:.1f}s to derive)", flush=True)
    out = Path(args.out or result_path("derivation_parts", f"{short_name(info.spec)}_{Path(args.run).stem}.json"))
    meta = {"model": info.spec, "data": args.data, "run": str(args.run), "calibration_images": len(calibration), "refit_iters": args.refit_iters,
            "calibration_patches": args.calibration_patches,
            "original_top1": original, "test_images": len(data.test), **stamp(args.threads)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "plan": plan.to_dict(), "rows": rows}, indent=1) + "\n")
    print()
    print(f"`{info.spec}`, the plan of {args.run}, original top-1 {original:.2f}, {meta['date']} ({meta['machine']})")
    print(markdown_table(["derivation", "top-1", "drop (pp)", "derive (s)"],
                         [[r["part"], f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}", f"{r['derive_seconds']:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
