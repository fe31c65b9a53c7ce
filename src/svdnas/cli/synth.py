"""``svdnas synth``: synthetic images from a model's BatchNorm statistics, into a .safetensors file.

What it writes: FILE.safetensors (or shards FILE-NNNNN-of-NNNNN.safetensors), FILE.json beside it
(the metadata, with ``"format": "svdnas-synthetic/1"``: what marks them as ours), and the work folder
FILE.partial/ (its settings.json marks it) while generating. A file of these names that is not ours
is refused, with or without --overwrite; ours are replaced only with --overwrite, and the old shards
are removed only after the new images are written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from svdnas.cli.common import add_common, add_model_args, device_of, input_shape, need, progress_bar
from svdnas.cli.options import Section, add_section, build
from svdnas.errors import SpecError
from svdnas.recovery.synthetic import FORMAT, SynthConfig, meta_path

SYNTH = Section(SynthConfig, required=("num",))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="synthetic images from the model's BatchNorm statistics")
    add_model_args(p)
    p.add_argument("--out", default=None, help=".safetensors file to write (shards and a .json beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace synthetic images svdnas wrote at --out")
    add_section(p, SYNTH)
    add_common(p, [SYNTH])
    p.set_defaults(func=run)


def _ours(meta: Path) -> dict | None:
    try:
        values = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) and values.get("format") == FORMAT else None


def check_synth_out(out: Path, overwrite: bool) -> list[Path]:
    """Refuse an --out whose files are not svdnas synthetic images (or are, without --overwrite);
    nothing is written. Returns the old images' files that the new ones replace."""
    if out.suffix != ".safetensors":
        raise SpecError(f"--out must name a .safetensors file, got {out}")
    meta, work = meta_path(out), out.with_name(out.stem + ".partial")
    shards = sorted(out.parent.glob(f"{out.stem}-*-of-*.safetensors")) if out.parent.is_dir() else []
    old = _ours(meta) if meta.exists() else None
    if meta.exists() and old is None:
        raise SpecError(f"{meta} exists and is not the metadata of svdnas synthetic images; choose another --out")
    if old is None and (out.exists() or shards):
        found = out if out.exists() else shards[0]
        raise SpecError(f"{found} exists and is not svdnas synthetic images (no {meta.name} of them beside it); choose another --out")
    if work.exists() and not (work / "settings.json").is_file() and (not work.is_dir() or any(work.iterdir())):
        raise SpecError(f"{work} exists and is not the work folder of an svdnas generation; choose another --out")
    if old is not None and not overwrite:
        raise SpecError(f"{out} already holds synthetic images; pass --overwrite to replace them")
    if old is None:
        return []
    return [out.with_name(n) for n in old.get("shards", []) if isinstance(n, str) and "/" not in n]


def run(args: argparse.Namespace) -> int:
    from svdnas.recovery.synthetic import generate, require_batchnorm, save_synthetic
    from svdnas.runs.directory import load_model

    need(args, "num", "out")
    config = build(SYNTH, args)
    out = Path(args.out)
    replaced = check_synth_out(out, args.overwrite)
    device = device_of(args.device)
    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = input_shape(args, info, None)
    require_batchnorm(model, info.spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(out.stem + ".partial")
    if args.overwrite:
        shutil.rmtree(work, ignore_errors=True)  # an unfinished generation's batches: the old images stay until the new are written
    with progress_bar(args, -(-config.num // config.batch_size), "synthetic") as bar:
        synthetic = generate(model.to(device), shape, config, args.seed, device, work, lambda d, t: bar.update(d - bar.n))
    paths = save_synthetic(out, synthetic)
    for p in replaced:
        if p not in paths and p.is_file():
            p.unlink()
    shutil.rmtree(work, ignore_errors=True)
    finals = [c[-1] for c in synthetic.meta["loss"]]
    print(f"{len(synthetic.images)} synthetic images from {info.spec} in {synthetic.meta['seconds']:.1f}s; "
          f"statistics loss {sum(finals) / len(finals):.4f} (mean final); wrote {', '.join(str(p) for p in paths)} and {meta_path(out)}")
    return 0
