"""Does the prefix fit follow its calibration images rather than the data? One fixed plan (BALF's at
--reduction, or a plan.json) derived four ways and evaluated post-training on the whole test split:
whitened factors, the prefix fit alone, the prefix fit checked layer by layer on held-out images (each
layer keeps the fitted factors or the whitened ones, whichever errs less there), and that model checked
as a whole against the whitened one (the nearer the original by mean KL on the held-out images kept:
the default).

    .venv/bin/python -m benchmarks.diagnostics.prefix_held_out --model zoo:efficientnet_b0 --reduction 0.4

The calibration images are the first 512 of compress's 1,000 search images and the held-out images
its 256 proxy images (both drawn with --seed as compress draws them). Per layer, the JSON keeps the
relative output error of both kinds of factors on the calibration images (the fit's own) and on
the held-out images. Writes benchmarks/results/prefix_held_out/<model>_<R>.json.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, model_and_data, parser, result_path, setup, short_name, stamp, write_json
from benchmarks.tables.post_training_comparison import log_softmax, nearness
from svdnas.baselines.methods import plan_and_notes, split_specs
from svdnas.cost.counting import model_macs
from svdnas.data.datasets import search_subset
from svdnas.data.evaluate import batches, evaluate
from svdnas.lowrank.derivation import calibrate
from svdnas.lowrank.plan import Plan
from svdnas.lowrank.whiten import PREFIX_RIDGE
from svdnas.search.allocation import log_probs, mean_kl
from svdnas.surgery.prefix import fit_on_prefix
from svdnas.surgery.swap import apply_plan
from svdnas.surgery.targets import select_targets
from svdnas.surgery.trace import example_input, trace_layers


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/prefix_held_out/<model>_<R>.json)")
    p.add_argument("--reduction", type=float, default=0.4, help="BALF's plan at this FLOPs reduction (default 0.4)")
    p.add_argument("--plan", default=None, help="a plan.json to derive instead of BALF's plan")
    p.add_argument("--search-images", type=int, default=1000)
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--held-out-images", type=int, default=256)
    p.add_argument("--ridge", type=float, default=PREFIX_RIDGE,
                   help=f"the prefix fit's pull towards the original weight (default {PREFIX_RIDGE:g}, compress's; 0: plain least squares)")
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args)
    model.eval()
    infos = trace_layers(model, example_input(model, info.input_shape))
    targets = select_targets(model, infos, info.default_filter)[0]
    order = [n for n in infos if n in targets]
    search, drawn = search_subset(data.train, args.search_images, args.seed)
    calibration = [x for x, _ in batches(torch.utils.data.Subset(search, range(args.calibration_images)), 128)]
    held_out = [x for x, _ in batches(search_subset(data.train, args.held_out_images, args.seed + 1, exclude=drawn)[0], 128)]
    if args.plan:
        loaded = json.loads(Path(args.plan).read_text())
        plan = Plan.from_dict(loaded.get("plan", loaded))
        whitened = calibrate(model, "whitened", plan.compressed(), calibration, "cpu")
    else:
        whitened = calibrate(model, "whitened", split_specs(targets, model, "kxk"), calibration, "cpu")
        plan, _ = plan_and_notes("balf", model, infos, targets, args.reduction, model_macs(model, info.input_shape), "kxk", "flops", whitened)
    original = evaluate(model, data.test)["top1"]
    reference = log_softmax(model, data.test)
    rows, layers = [], {}

    def row(label: str, build) -> None:
        t0 = time.perf_counter()
        compressed = build()
        seconds = time.perf_counter() - t0
        top1 = evaluate(compressed.eval(), data.test)["top1"]
        rows.append({"derivation": label, "top1": top1, "drop_pp": original - top1, "seconds": seconds,
                     **nearness(reference, compressed, data.test)})
        print(f"{label:40s} drop {original - top1:6.2f} pp, agreement {rows[-1]['agreement']:.2f}%, mean KL {rows[-1]['mean_kl']:.2e}, largest {rows[-1]['max_kl']:.3g} "
              f"({seconds:.0f} s)", flush=True)

    models = {}

    def keep(key: str, build):
        def built() -> torch.nn.Module:
            models[key] = build()
            return models[key]
        return built

    row("whitened", keep("whitened", lambda: apply_plan(copy.deepcopy(model), plan, derivation=whitened)))
    fits = {}

    def fitted(key: str, spare: list) -> torch.nn.Module:
        fits[key] = fit_on_prefix(model, plan, order, calibration, "cpu", whitened, held_out=spare, refit_iters=4, ridge=args.ridge)
        return fits[key].model

    row("prefix fit, no check", lambda: fitted("calibration", []))
    row("prefix fit, checked on held-out images", keep("gated", lambda: fitted("held_out", held_out)))
    spare = torch.utils.data.TensorDataset(torch.cat(held_out), torch.zeros(sum(len(x) for x in held_out), dtype=torch.long))
    held_out_reference = log_probs(model, spare, "cpu")
    on_held_out = {k: mean_kl(held_out_reference, m.eval(), spare, "cpu") for k, m in models.items()}
    chosen = min(("gated", "whitened"), key=lambda k: (on_held_out[k], k != "gated"))
    row(f"both checks: kept the {'prefix fit' if chosen == 'gated' else 'whitened factors'}", lambda: models[chosen])
    for name in fits["held_out"].errors:
        layers[name] = {"spec": str(plan.layers[name][0]), "calibration": fits["calibration"].errors[name],
                        "held_out": fits["held_out"].errors[name]}
    kept = sorted(n for n, e in fits["held_out"].errors.items() if e["kept"] == "derived")
    print(f"\n{len(kept)} of {len(layers)} layers kept the whitened factors: {', '.join(kept)}\n")
    print(markdown_table(["derivation", "top-1 drop (pp)", "agreement with the original (%)", "mean KL", "largest KL"],
                         [[r["derivation"], f"{r['drop_pp']:.2f}", f"{r['agreement']:.2f}", f"{r['mean_kl']:.2e}", f"{r['max_kl']:.3g}"]
                          for r in rows]))
    label = (Path(args.plan).name.removesuffix(".json").removesuffix(".plan") if args.plan else f"balf_{args.reduction:g}") + (
        f"_ridge{args.ridge:g}" if args.ridge != PREFIX_RIDGE else "")
    out = args.out or result_path("prefix_held_out", f"{short_name(args.model)}_{label}.json")
    write_json(out, {"meta": {"model": args.model, "plan": args.plan or f"balf at {args.reduction}", "original_top1": original,
                              "test_images": len(data.test), "calibration_images": args.calibration_images,
                              "held_out_images": args.held_out_images, "ridge": args.ridge, "seed": args.seed, **stamp(args.threads)},
                     "rows": rows, "kept_whitened": kept, "held_out_mean_kl": on_held_out, "layers": layers})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
