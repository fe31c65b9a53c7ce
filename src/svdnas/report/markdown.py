"""report.md: the run's summary and per-layer plan as markdown."""

from __future__ import annotations

from typing import Any


def _branch_text(branches: list[dict[str, Any]]) -> str:
    if not branches:
        return "kept"
    parts = []
    for b in branches:
        g1, g2 = b["groups"]
        groups = f"g{g1} first" if g1 > 1 else (f"g{g2} second" if g2 > 1 else "no groups")
        parts.append(f"{b['first_kernel'][0]}x{b['first_kernel'][1]} first, {groups}, rank {b['rank']}")
    return " + ".join(parts)


# the plans the plan check compares, as report.md names them
PLAN_NAMES = {"search": "the search's", "spectrum": "the spectrum allocation's", "weighted": "the sensitivity-weighted spectrum allocation's"}


def _plan_check_text(check: dict[str, Any]) -> str:
    if "skipped" in check:
        return f"- plan: the search's (the plan check was skipped: {check['skipped']})"
    kl = ", ".join(f"{k} {v:.3g}" for k, v in check["kl"].items())
    line = (f"- plan: {PLAN_NAMES.get(check['kept'], check['kept'])}, the nearest of {len(check['kl'])} to the original "
            f"on {check['images']} proxy images (mean KL: {kl})")
    return line + (f"; no sensitivity-weighted plan: {check['weighted_skipped']}" if "weighted_skipped" in check else "")


def markdown(report: dict[str, Any]) -> str:
    """The run's summary and per-layer plan as markdown."""
    lines = [f"# {report['method']} on {report['model']}", ""]
    f, p = report["flops"], report["params"]
    lines.append(f"- FLOPs: {f['original'] / 1e6:.2f} M -> {f['compressed'] / 1e6:.2f} M (-{100 * f['reduction']:.2f}%)")
    lines.append(f"- params: {p['original'] / 1e6:.3f} M -> {p['compressed'] / 1e6:.3f} M (-{100 * p['reduction']:.2f}%)")
    if report.get("latency"):
        lat = report["latency"]
        for name, fig in lat.get("runtimes", {lat.get("runtime", "torch"): lat}).items():
            line = (f"- latency in {name} ({lat['device']}, batch {lat['batch']}, {lat['threads']} threads): {fig['original_ms']:.3f} ms -> "
                    f"{fig['compressed_ms']:.3f} ms ({-100 * fig['reduction']:+.2f}%)")
            if fig["reduction"] < 0:
                line += ": **slower than the original**"
            if "predicted" in lat and name == lat.get("runtime"):
                line += f"; the lookup table predicted {-100 * lat['predicted']['reduction']:+.2f}%"
            lines.append(line)
        budget = lat.get("measured_budget")
        if budget is not None:
            kept = budget["attempts"][budget["kept"]]
            verdict = "met" if budget["met"] else "**not met**"
            lines.append(f"- latency budget {verdict} on the whole model measured in {budget['runtime']} while selecting: "
                         f"{-100 * kept['reduction']:+.2f}% after {budget['repairs']} repair(s) of the table's plan "
                         f"({-100 * budget['attempts'][0]['reduction']:+.2f}% measured at first)")
    if report.get("top1"):
        t = report["top1"]
        lines.append(f"- top-1: {t['original']:.2f}% -> {t['compressed']:.2f}% (drop {t['drop_pp']:.2f}pp)")
    if report.get("plan_check"):
        lines.append(_plan_check_text(report["plan_check"]))
    if report.get("seconds"):
        lines.append("- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    lines += ["", "| layer | input | weight | plan | MFLOPs before | MFLOPs after |", "| --- | --- | --- | --- | ---: | ---: |"]
    for layer in report.get("layers", []):
        hw = "x".join(map(str, layer["input_hw"]))
        w = "x".join(map(str, layer["weight_shape"]))
        lines.append(
            f"| `{layer['name']}` | {hw} | {w} | {_branch_text(layer['branches'])} | "
            f"{layer['flops'][0] / 1e6:.2f} | {layer['flops'][1] / 1e6:.2f} |"
        )
    if report.get("skipped"):
        lines.append("")
        lines += [f"- left alone: `{s['name']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"
