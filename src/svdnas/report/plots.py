"""``svdnas report DIR``: a markdown table and PNG plots of a run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from svdnas.errors import SpecError
from svdnas.fileio import atomic_write_bytes
from svdnas.report.markdown import markdown

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def write_report(directory: str | Path) -> list[Path]:
    """Write report.md, layers.png and (after a search) history.png into ``directory``.

    Without matplotlib only report.md is written, and a warning says so.
    """
    d = Path(directory)
    path = d / "report.json"
    if not path.is_file():
        raise SpecError(f"{d} holds no report.json: not a finished run directory")
    report = json.loads(path.read_text())
    written = [d / "report.md"]
    atomic_write_bytes(written[0], markdown(report).encode())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: wrote %s without the plots (pip install 'svdnas[plots]')", written[0])
        return written
    layers = report.get("layers", [])
    if layers:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers)), 4.5))
        xs = range(len(layers))
        before = [layer["flops"][0] / 1e6 for layer in layers]
        after = [layer["flops"][1] / 1e6 for layer in layers]
        ax.bar(xs, before, color="#cccccc", label="original")
        colors = ["#4477aa" if layer["branches"] else "#aa3377" for layer in layers]
        ax.bar(xs, after, color=colors, width=0.6, label="compressed (purple: kept)")
        for x, layer, a in zip(xs, layers, after):
            if layer["branches"]:
                b = layer["branches"][0]
                ax.text(x, a, f"{b['first_kernel'][0]}x{b['first_kernel'][1]} r{b['rank']}" + (f" g{max(b['groups'])}" if max(b["groups"]) > 1 else ""),
                        rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([layer["name"] for layer in layers], rotation=70, ha="right", fontsize=6)
        ax.set_ylabel("MFLOPs")
        f = report["flops"]
        acc = f", top-1 drop {report['top1']['drop_pp']:.2f}pp" if report.get("top1") else ""
        ax.set_title(f"{report['method']}: FLOPs -{100 * f['reduction']:.1f}%{acc}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, d / "layers.png")
        plt.close(fig)
        written.append(d / "layers.png")
    hist_path = d / "history.json"
    if hist_path.is_file():
        h = json.loads(hist_path.read_text())
        runs = {"B1": h["b1"], "B2": h["b2"]} if "b1" in h else {"": h}
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        offset = 0
        for label, run in runs.items():
            epochs = [offset + e for e in run["epoch"]]
            tag = f"{label} " if label else ""
            axes[0].plot(epochs, run["ce"], label=f"{tag}cross-entropy")
            axes[0].plot(epochs, run["loss"], label=f"{tag}loss")
            axes[1].plot(epochs, run["expected_cost_ratio"], label=f"{tag}expected")
            axes[2].plot(epochs, run["temperature"], label=f"{tag}temperature")
            axes[2].plot(epochs, run["multiplier"], label=f"{tag}budget multiplier")
            offset = epochs[-1] if epochs else offset
        axes[0].legend(fontsize=7)
        if report.get("reduction_target") is not None:
            axes[1].axhline(1 - report["reduction_target"], color="gray", ls="--", label="target")
        axes[1].legend(fontsize=7)
        axes[1].set_title("expected cost / original", fontsize=9)
        axes[2].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, d / "history.png")
        plt.close(fig)
        written.append(d / "history.png")
    return written
