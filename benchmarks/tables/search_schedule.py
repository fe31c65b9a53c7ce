"""The whole search, svdnas against the official release's schedule: wall time of every
search stage and the accuracy of the plan each reaches, at the same budget, in one process.

    .venv/bin/python -m benchmarks.tables.search_schedule --model zoo:resnet18

The release has no budget mode: its user picks ``beta`` and gets whatever reduction it gives. So:

1. ``release-b{beta}`` for each ``--release-betas``: the release's schedule re-created in this code
   base (its code is not on this machine): candidates on the 30-70% FLOPs grid, no proxy pruning,
   two sampled candidates per layer run as full-size convolutions, 100 epochs, logit lr 0.01,
   temperature from 5 times 0.965 per epoch, the paper's loss ``CE * (log F / log F0) ** beta``,
   the largest logit per layer (no repair), the paper's factors (``--derivation weight``), any rank
   on the grid and every candidate offered (``--rank-multiple 1 --offer-slower``: the release neither
   rounds ranks nor times candidates).
2. For the reduction each release row reached, svdnas at that ``--reduction``: ``default`` (as
   shipped), ``fast`` (``--fast-epochs`` epochs of the logits, everything else as shipped),
   ``fast-proxy-N`` for each ``--fast-proxy-images`` (the same with N proxy images instead of 256,
   ``--proxy-images N``) and ``fast-acc-proxy`` (with the one-layer accuracy proxy, ``--proxy-drop 5``,
   which the output-aware default leaves off; before 2026-12-04 the default had it on and this row,
   then ``fast-no-acc-proxy``, turned it off).

Every row searches the same 1,000 labelled training images and is evaluated on the same test
images. Search time = candidates + calibration statistics + proxies + super model build + learning
the logits + selection: construction, pruning and the search, as the release's row counts them; the
table also gives each row's time with the final derivation of the chosen plan's weights (svdnas's
prefix fit; the release derives them by a plain SVD, not timed) and the speed-up with it. The
evaluation is left out.
``--ours`` runs only the named rows of ours. The speed-up of a row of ours is the release row's search time over
its own; the JSON's ``as_good`` says whether its plan is at least as accurate and at least
as small as the release's.
"""

from __future__ import annotations

from benchmarks.common import first_test_images, parser, result_path, setup, short_name, stamp, write_json
from svdnas.data.datasets import load_data
from svdnas.data.evaluate import evaluate
from svdnas.models.build import build_model
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig

SEARCH_STAGES = ("candidates", "calibration", "proxy", "accuracy_proxy", "build", "search", "select")
DERIVATION_STAGES = ("prefix_fit",)  # after the search: the chosen plan's weights


def release_config(beta: float, epochs: int) -> CompressConfig:
    return CompressConfig(
        # groups up to 8, as in every earlier run of this benchmark (the default until 2026-11-26); the
        # release's LR-space: any rank on the grid, every candidate offered whatever its latency
        beta=beta, grid=(0.3, 0.7, 0.05), families=0, proxy_drop=0.0, max_groups=8, derivation="weight",
        rank_multiple=1, offer_slower=True,
        # every epoch: the release has no early stop (svdnas's --patience would end a beta search, whose
        # multiplier never moves, once its plan has held for two epochs)
        search=SearchConfig(epochs=epochs, lr=0.01, sampling="two", final_temperature=5.0 * 0.965**epochs, beta=beta, patience=0),
    )


def ours_configs(reduction: float, fast_epochs: int, fast_proxy_images: list[int]) -> dict[str, CompressConfig]:
    def fast(**kw) -> CompressConfig:
        return CompressConfig(reduction=reduction, search=SearchConfig(epochs=fast_epochs, target=1 - reduction), **kw)

    return {
        "default": CompressConfig(reduction=reduction),
        "fast": fast(),
        **{f"fast-proxy-{n}": fast(proxy_images=n) for n in fast_proxy_images},
        "fast-acc-proxy": fast(proxy_drop=5.0),
    }


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/search_schedule/<model>.json)")
    p.add_argument("--release-betas", type=float, nargs="+", default=[16.0, 48.0], help="the release's betas to re-create (default 16 and 48)")
    p.add_argument("--release-epochs", type=int, default=100)
    p.add_argument("--fast-epochs", type=int, default=5)
    p.add_argument("--fast-proxy-images", type=int, nargs="*", default=[128, 64],
                   help="further fast rows with fewer proxy images (--proxy-images) than the default 256")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--ours", nargs="*", default=None, help="only these rows of ours (default, fast, fast-proxy-N, fast-acc-proxy)")
    args = p.parse_args()
    setup(args)
    model, info = build_model(args.model)
    data = first_test_images(load_data(args.data), args.test_images)
    reference = evaluate(model, data.test)

    def run(config: CompressConfig) -> dict:
        rep = compress(model, data, config, input_shape=info.input_shape, filter_fn=info.default_filter, seed=args.seed, reference=reference).report
        stages = {k: v for k, v in rep["seconds"].items() if k in SEARCH_STAGES + DERIVATION_STAGES}
        search = sum(v for k, v in stages.items() if k in SEARCH_STAGES)
        return {
            "search_seconds": search, "with_derivation_seconds": sum(stages.values()), "stages": stages,
            "candidates": rep["search"]["candidates"],
            "epochs": rep["search"]["config"]["epochs"], "epochs_run": rep["search"]["stopped"]["epochs"],
            "stopped": rep["search"]["stopped"]["reason"], "flops_reduction": rep["flops"]["reduction"],
            "top1": rep["top1"]["compressed"], "drop_pp": rep["top1"]["drop_pp"],
            "peak_rss_mib": max(v["rss"] for v in rep["peak_memory_mib"].values()),
        }

    def show(name: str, x: dict) -> None:
        print(f"{name:32s} {x['candidates']:5d} candidates, {x['epochs_run']:3d} of {x['epochs']:3d} epochs: search {x['search_seconds']:7.1f}s, "
              f"with the derivation {x['with_derivation_seconds']:7.1f}s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in x['stages'].items())}), FLOPs -{100 * x['flops_reduction']:.2f}%, "
              f"top-1 {x['top1']:.2f} (drop {x['drop_pp']:.2f}pp)", flush=True)

    comparisons = []
    for beta in args.release_betas:
        release = run(release_config(beta, args.release_epochs))
        show(f"release-b{beta:g}", release)
        budget = round(release["flops_reduction"], 3)
        entry = {"beta": beta, "release": release, "reduction": budget, "ours": {}}
        if not 0.01 < budget < 0.99:
            print(f"  beta {beta:g} reached {100 * budget:.1f}%: no svdnas run at that budget", flush=True)
        else:
            for name, config in ours_configs(budget, args.fast_epochs, args.fast_proxy_images).items():
                if args.ours is not None and name not in args.ours:
                    continue
                x = run(config)
                x["speedup"] = release["search_seconds"] / x["search_seconds"]
                x["speedup_with_derivation"] = release["with_derivation_seconds"] / x["with_derivation_seconds"]
                x["as_good"] = x["drop_pp"] <= release["drop_pp"] and x["flops_reduction"] >= release["flops_reduction"] - 0.002
                entry["ours"][name] = x
                show(f"  svdnas {name} R={budget:.3f}", x)
        comparisons.append(entry)

    print(f"\n{args.model}, original top-1 {reference['top1']:.2f} on {len(data.test)} test images")
    print("| budget | run | epochs | search s | with the derivation s | FLOPs reduction | top-1 drop (pp) | speed-up | with the derivation "
          "| plan as good |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for e in comparisons:
        r = e["release"]
        print(f"| beta {e['beta']:g} | release | {r['epochs_run']} | {r['search_seconds']:.0f} | {r['with_derivation_seconds']:.0f} "
              f"| {100 * r['flops_reduction']:.2f}% | {r['drop_pp']:.2f} | 1.0x | 1.0x | |")
        for name, x in e["ours"].items():
            print(f"| R = {e['reduction']:.3f} | svdnas {name} | {x['epochs_run']} | {x['search_seconds']:.0f} | {x['with_derivation_seconds']:.0f} "
                  f"| {100 * x['flops_reduction']:.2f}% | {x['drop_pp']:.2f} | {x['speedup']:.1f}x | {x['speedup_with_derivation']:.1f}x "
                  f"| {'yes' if x['as_good'] else 'no'} |")
    out = write_json(args.out or result_path("search_schedule", f"{short_name(args.model)}.json"), {
        "model": args.model, "test_images": len(data.test), "original_top1": reference["top1"], "comparisons": comparisons,
        **stamp(args.threads),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
