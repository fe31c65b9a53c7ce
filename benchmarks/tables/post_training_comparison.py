"""Post-training comparison (the paper's Table 1 analogue): svdnas beside every baseline, same model,
data, budget and test images, in one run.

    .venv/bin/python -m benchmarks.tables.post_training_comparison --model zoo:resnet18 --reductions 0.4 0.5 0.6 0.7

Baselines: uniform and energy with every kernel split, data-free LR-S2, ALDS, F-Group and BALF. A
method name may end in @KIND to derive its factors as --derivation KIND does (``svdnas@prefix``,
``energy-kxk@whitened``, ``balf@weight``); without it each method derives as it does by default. With
--branches 2 the svdnas run is the residual extension and gives two rows, B1 (the first search,
which meets the budget on its own) and B2. Prints one table, writes
benchmarks/results/post_training_comparison/<model>.json after every row (a rerun with the same settings skips
the rows already there, so a stopped run resumes) and a plot of top-1 drop against FLOPs reduction.
--test-images N evaluates every method on the same first N test images (default: all).

Each row also keeps how near the compressed model stays to the original on the test images (``agreement``:
the share whose top-1 class is the original's; ``mean_kl``: the mean KL divergence of its softmax from the
original's), the report's latency reduction at batch 1 in each runtime (``latency``), and which test images
it classifies right (``correct``, one bit per image in hexadecimal). A second table prints the first
three beside the drop; a third compares svdnas with every other row of its budget image by image: the
images only one of the two gets right, and the exact sign test's p-value of that split, which says
whether a difference in top-1 is larger than chance gives.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, model_and_data, parser, result_path, setup, stamp
from benchmarks.common import post_training_table as table
from svdnas.baselines.methods import SPLITS
from svdnas.data.evaluate import batches
from svdnas.lowrank.derivation import KINDS
from svdnas.pipeline.baseline import run_baseline
from svdnas.pipeline.compress import compress
from svdnas.pipeline.config import CompressConfig
from svdnas.search import SearchConfig
from svdnas.search.allocation import log_probs

ALL_METHODS = ["svdnas"] + [f"uniform-{s}" for s in SPLITS] + [f"energy-{s}" for s in SPLITS] + ["lrs2", "alds", "fgroup", "balf"]
CHOICES = ALL_METHODS + [f"{m}@{k}" for m in ALL_METHODS for k in KINDS]


def log_softmax(model: torch.nn.Module, dataset) -> torch.Tensor:
    """``model``'s log-softmax on every image of ``dataset``, in order (in eval mode)."""
    return torch.cat(log_probs(model.eval(), dataset, "cpu", 256))


def nearness(reference: torch.Tensor, model: torch.nn.Module, dataset, labels: torch.Tensor) -> dict[str, float | str]:
    """How near ``model`` is to the original on ``dataset``: top-1 agreement (%), mean and largest KL
    divergence from its log-softmax ``reference``; and which images it classifies right
    (:func:`encode_bits` of one bit per image, for :func:`paired_table`)."""
    mine = log_softmax(model, dataset)
    agreement = 100 * float((mine.argmax(-1) == reference.argmax(-1)).double().mean())
    kl = torch.nn.functional.kl_div(mine, reference, log_target=True, reduction="none").sum(-1)
    return {"agreement": agreement, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "correct": encode_bits((mine.argmax(-1) == labels).tolist())}


def encode_bits(bits: list[bool]) -> str:
    """One bit per entry, as a hexadecimal string (4 entries a digit, the first in the highest bit)."""
    padded = list(bits) + [False] * (-len(bits) % 4)
    return "".join(f"{8 * a + 4 * b + 2 * c + d:x}" for a, b, c, d in zip(*[iter(padded)] * 4))


def decode_bits(text: str, count: int) -> list[bool]:
    """The first ``count`` entries :func:`encode_bits` wrote to ``text``."""
    return [bool(int(digit, 16) >> (3 - k) & 1) for digit in text for k in range(4)][:count]


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test's p-value for ``wins`` against ``losses`` (ties left out): how
    likely a split at least this uneven is if either side is equally likely to be right."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0  # 0.0 below 1e-308


def p_text(p: float) -> str:
    """A p-value for a table: two significant digits, or an upper bound where it underflowed."""
    return f"{p:.2g}" if p > 0 else "<1e-300"


def paired_table(path: Path) -> str:
    """Each svdnas row against every other row of its reduction, image by image: the test images only
    svdnas classifies right, those only the other row does, and the sign test's p-value of that split.
    A p-value well above 0.05 says the two rows' difference in top-1 is within what chance gives."""
    data = json.loads(Path(path).read_text())
    count = data["meta"]["test_images"]
    rows = [r for r in data["rows"] if "correct" in r]
    body = []
    for ours in (r for r in rows if r["method"].startswith("svdnas")):
        if len(ours["correct"]) != -(-count // 4):
            raise ValueError(f"{ours['method']}: {len(ours['correct'])} digits of right answers for {count} test images")
        mine = decode_bits(ours["correct"], count)
        for other in (r for r in rows if r["reduction_target"] == ours["reduction_target"] and not r["method"].startswith("svdnas")):
            if len(other["correct"]) != len(ours["correct"]):
                raise ValueError(f"{other['method']}: right answers for another number of test images than {ours['method']}'s")
            theirs = decode_bits(other["correct"], count)
            wins = sum(a and not b for a, b in zip(mine, theirs))
            losses = sum(b and not a for a, b in zip(mine, theirs))
            body.append([f"{ours['reduction_target']:g}", f"{ours['method']} vs {other['method']}", str(wins), str(losses),
                         p_text(sign_test(wins, losses))])
    return markdown_table(["R", "rows", "only svdnas right", "only the other right", "sign test p"], body, ["r", "l", "r", "r", "r"])


def nearness_table(path: Path) -> str:
    """Drop, agreement with the original, mean KL and ONNX Runtime's latency reduction, per method and budget."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "agreement" in r]
    body = []
    for r in sorted(rows, key=lambda r: (r["reduction_target"], r["method"])):
        lat = r.get("latency", {})
        cells = [f"{100 * lat[k]:.1f}%" if k in lat else "-" for k in ("onnxruntime", "torch")]
        body.append([f"{r['reduction_target']:g}", r["method"], f"{r['drop_pp']:.2f}", f"{r['agreement']:.2f}", f"{r['mean_kl']:.2e}", *cells])
    return markdown_table(["R", "method", "top-1 drop (pp)", "agreement with the original (%)", "mean KL",
                           "latency reduction, ONNX Runtime b1", "PyTorch b1"], body, ["r", "l", "r", "r", "r", "r", "r"])


def main() -> None:
    p = parser(__doc__, out="JSON to write (default benchmarks/results/post_training_comparison/<model>.json)")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=CHOICES, metavar="METHOD")
    epochs = SearchConfig.__dataclass_fields__["epochs"].default
    p.add_argument("--epochs", type=int, default=epochs, help=f"the search's epochs, at most (default {epochs}, compress's)")
    p.add_argument("--families", type=int, default=4)
    p.add_argument("--proxy-drop", type=float, default=None, help="compress's --proxy-drop (default: compress's own, by derivation)")
    p.add_argument("--branches", type=int, default=1, choices=(1, 2))
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--offer-slower", action="store_true", help="svdnas: offer candidates measured slower than their layer too")
    p.add_argument("--rank-multiple", type=int, default=None, help="svdnas: --rank-multiple (default: this CPU's channel block)")
    args = p.parse_args()
    setup(args)
    model, info, data = model_and_data(args, args.test_images)
    from svdnas.data.evaluate import evaluate

    reference = evaluate(model, data.test)  # the original's accuracy, measured once for every row
    original_log_softmax = log_softmax(model, data.test)
    truth = torch.cat([y for _, y in batches(data.test, 256)])
    out = Path(args.out or result_path("post_training_comparison", f"{info.spec.replace(':', '_')}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": info.spec, "data": args.data, "epochs": args.epochs, "families": args.families, "proxy_drop": args.proxy_drop,
            "branches": args.branches, "seed": args.seed, "test_images": len(data.test), "threads": args.threads,
            "original_top1": reference["top1"], "offer_slower": args.offer_slower, "rank_multiple": args.rank_multiple,
            "plan_check": "search, spectrum, weighted", **stamp(args.threads)}
    # the original's top-1 stands for its weights: rows of other weights are not resumed
    keys = ("model", "data", "epochs", "families", "proxy_drop", "branches", "seed", "test_images", "original_top1", "offer_slower",
            "rank_multiple", "plan_check")
    # files written before these settings existed: every candidate offered, no plan check (True: written before the
    # plans were named, two plans checked before commit 9456c94 and three from it)
    unset = {"offer_slower": True, "rank_multiple": None, "plan_check": False}
    rows: list[dict] = []
    if out.is_file():
        old = json.loads(out.read_text())
        if all(old.get("meta", {}).get(k, unset.get(k)) == meta[k] for k in keys):
            rows = old["rows"]
            print(f"# resuming: {len(rows)} rows from {out}", flush=True)

    def save() -> None:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    methods = list(dict.fromkeys(args.methods))
    names = [(f"{m}-B1", f"{m}-B2") if m.startswith("svdnas") and args.branches == 2 else (m,) for m in methods]
    labels = [n for group in names for n in group]

    def row(r: float, method: str, rep: dict, seconds: float, compressed: torch.nn.Module | None = None) -> None:
        rows.append({
            "reduction_target": r, "method": method, "flops_reduction": rep["flops"]["reduction"],
            "params_reduction": rep["params"]["reduction"], "top1": rep["top1"]["compressed"],
            "drop_pp": rep["top1"]["drop_pp"], "original_top1": rep["top1"]["original"], "seconds": seconds,
        })
        if compressed is not None:
            rows[-1] |= nearness(original_log_softmax, compressed, data.test, truth)
        if "runtimes" in rep.get("latency", {}):
            rows[-1]["latency"] = {k: v["reduction"] for k, v in rep["latency"]["runtimes"].items()}
        if "peak_memory_mib" in rep:  # svdnas: the search's cost by stage
            rows[-1]["seconds_by_stage"] = rep["seconds"]
            rows[-1]["peak_rss_mib_by_stage"] = {k: v["rss"] for k, v in rep["peak_memory_mib"].items()}
        for key in ("plan_check", "slower_candidates"):  # svdnas: which plan the check kept, candidates not offered
            if key in rep:
                rows[-1][key] = rep[key]
        print(f"R={r:.2f} {method:14s} FLOPs -{100 * rep['flops']['reduction']:6.2f}%  top-1 {rep['top1']['compressed']:6.2f}  "
              f"drop {rep['top1']['drop_pp']:6.2f}pp  ({seconds:.0f}s)", flush=True)
        save()

    for r in args.reductions:
        for method, group in zip(methods, names):
            if all(any(x["method"] == g and x["reduction_target"] == r for x in rows) for g in group):
                continue
            t0 = time.perf_counter()
            base, _, derivation = method.partition("@")
            if base == "svdnas":
                kind = {"derivation": derivation} if derivation else {}
                config = CompressConfig(reduction=r, families=args.families, proxy_drop=args.proxy_drop, branches=args.branches,
                                        offer_slower=args.offer_slower, rank_multiple=args.rank_multiple,
                                        search=SearchConfig(epochs=args.epochs, target=1 - r), **kind)
                result = compress(model, data, config, input_shape=info.input_shape, filter_fn=info.default_filter, seed=args.seed,
                                  reference=reference)
                rep, compressed = result.report, result.model
                if args.branches == 2:
                    row(r, group[0], rep["branches"]["b1"], time.perf_counter() - t0)
                    row(r, group[1], rep, time.perf_counter() - t0, compressed)
                    continue
            else:
                name, _, split = base.partition("-")
                compressed, _, rep = run_baseline(name, model, data, r, info.input_shape, info.default_filter, split or "kx1",
                                                  seed=args.seed, reference=reference, derivation=derivation or None)
            row(r, method, rep, time.perf_counter() - t0, compressed)
    rows.sort(key=lambda x: (x["reduction_target"], labels.index(x["method"]) if x["method"] in labels else len(labels)))
    save()
    print()
    print(table(out))  # the markdown table and verdicts of benchmarks/tools/summarize.py
    if any("agreement" in x for x in rows):
        print()
        print(nearness_table(out))
    if any("correct" in x for x in rows) and any(x["method"].startswith("svdnas") for x in rows):
        print()
        print(paired_table(out))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in labels:
            pts = sorted((x["flops_reduction"], x["drop_pp"]) for x in rows if x["method"] == method)
            style = {"lw": 2.5, "marker": "o"} if method.startswith("svdnas") else {"lw": 1, "marker": "."}
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], label=method, **style)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("top-1 drop (pp), post-training")
        ax.set_title(f"{info.spec} on {args.data} ({len(data.test)} test images)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
