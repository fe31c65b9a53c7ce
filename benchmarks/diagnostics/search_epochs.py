"""How the searched plan's accuracy depends on the search's length: one search of ``compress``'s
default settings run for --epochs epochs without its stopping rule, the plan its logits select after
every epoch derived as compress derives it and evaluated post-training on the test split.

    .venv/bin/python -m benchmarks.diagnostics.search_epochs --reduction 0.6

Each distinct plan is evaluated once. The table also says, for each --patience, at which epoch the
stopping rule (plan unchanged for that many epochs, budget multiplier settled) would have stopped.
Writes benchmarks/results/search_epochs/<model>_<reduction>[_<tag>].json.
"""

from __future__ import annotations

import time

from benchmarks.common import (
    first_test_images,
    markdown_table,
    model_and_data,
    parser,
    result_path,
    setup,
    short_name,
    stamp,
    write_json,
)
from svdnas.data.evaluate import evaluate
from svdnas.lowrank.plan import Plan
from svdnas.pipeline import stages
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig
from svdnas.search.loop import SearchHistory, settled


def stop_epoch(history: dict, patience: int, tolerance: float) -> int:
    """The epoch after which the stopping rule would have ended this search (the last if never)."""
    for k in range(1, len(history["selection"]) + 1):
        part = SearchHistory(multiplier=history["multiplier"][:k], selection=history["selection"][:k])
        if settled(part, patience, tolerance):
            return k
    return len(history["selection"])


def main() -> None:
    p = parser(__doc__, out="JSON to write")
    p.add_argument("--reduction", type=float, default=0.6)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--search-images", type=int, default=1000)
    p.add_argument("--final-temperature", type=float, default=None, help="the schedule's end temperature (default compress's)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--tag", default="", help="a suffix of the JSON's name")
    p.add_argument("--at", default="1,2,3,4,6,8,12,16,20", help="the epochs whose plans are evaluated (default 1,2,3,4,6,8,12,16,20)")
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args)
    sconf = SearchConfig(target=0.5, epochs=args.epochs, patience=0)
    if args.final_temperature is not None:
        sconf.final_temperature = args.final_temperature
    config = CompressConfig(reduction=args.reduction, search=sconf, search_images=args.search_images)
    t0 = time.perf_counter()
    job = stages.prepare(model, data, None, info.default_filter or "all-but-first", "cpu", args.seed)
    candidates = stages.make_candidates(job, config)
    images = stages.search_images(job, config)
    calibration = stages.calibration_set(images.search, config.calibration_images)
    derivation = stages.calibrate(job, config.derivation, {n: c.specs for n, c in candidates.items()}, calibration,
                                  config.calibration_patches)
    pruned = stages.prune(job, config, candidates, images.proxy, derivation)
    searched = stages.search_plan(job, config, pruned, images)
    history = searched.history
    names = list(history["choice"])
    print(f"search of {args.epochs} epochs: {time.perf_counter() - t0:.1f} s; stages {dict(job.seconds)}", flush=True)
    at = {int(e) for e in args.at.split(",")}
    test = first_test_images(data, args.test_images)
    original = evaluate(job.model, test.test)["top1"]
    seen: dict[tuple, dict] = {}
    rows = []
    for epoch, selection in enumerate(history["selection"], start=1):
        key = tuple(selection)
        changed = sum(a != b for a, b in zip(selection, history["selection"][epoch - 2])) if epoch > 1 else None
        row = {"epoch": epoch, "changed_layers": changed, "multiplier": history["multiplier"][epoch - 1],
               "expected_cost_ratio": history["expected_cost_ratio"][epoch - 1]}
        if key not in seen and epoch in at:
            t1 = time.perf_counter()
            plan = Plan({n: [] for n in job.targets})
            for n, c in zip(names, selection):
                cands = pruned.candidates[n]
                plan.layers[n] = cands.base if c == 0 else [*cands.prefix, cands.specs[c - 1]]
            compressed = stages.derive_model(job, plan, derivation, calibration)
            top1 = evaluate(compressed, test.test)["top1"]
            cost = sum(pruned.costs[n][c] for n, c in zip(names, selection)) + pruned.fixed
            seen[key] = {"top1": top1, "drop_pp": original - top1, "cost_ratio": cost / pruned.total,
                         "derive_evaluate_seconds": time.perf_counter() - t1}
        row |= seen.get(key, {})
        rows.append(row)
        drop = f"drop {row['drop_pp']:.2f} pp" if "drop_pp" in row else "not evaluated"
        print(f"epoch {epoch:2d}: {changed if changed is not None else '-'} layers changed, {drop}, multiplier {row['multiplier']:.3f}", flush=True)
    stops = {str(k): stop_epoch(history, k, sconf.settle) for k in (2, 3, 4, 5)}
    name = f"{short_name(info.spec)}_{args.reduction:g}{'_' + args.tag if args.tag else ''}.json"
    out = write_json(args.out or result_path("search_epochs", name), {
        "meta": {"model": info.spec, "data": args.data, "reduction": args.reduction, "epochs": args.epochs,
                 "search_images": args.search_images, "final_temperature": sconf.final_temperature, "settle": sconf.settle,
                 "original_top1": original, "test_images": len(test.test), **stamp(args.threads)},
        "rows": rows, "stop_epoch_by_patience": stops, "seconds": dict(job.seconds)})
    print()
    print(markdown_table(["epoch", "layers changed", "multiplier", "drop (pp)"],
                         [[r["epoch"], "-" if r["changed_layers"] is None else r["changed_layers"], f"{r['multiplier']:.3f}",
                           f"{r['drop_pp']:.2f}" if "drop_pp" in r else ""] for r in rows]))
    print("stopping rule would stop after epoch:", stops)
    print(out)


if __name__ == "__main__":
    main()
