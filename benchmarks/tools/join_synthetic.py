"""Join synthetic image sets made by ``svdnas synth`` into one, in the order given, so that a larger
set reuses images already made (``compress`` and ``finetune`` hold out the *last* images of a set for
validation and fidelity: put the set whose last images should play that part last).

    .venv/bin/python -m benchmarks.tools.join_synthetic A.safetensors B.safetensors --out AB.safetensors
"""

from __future__ import annotations

import torch

from benchmarks.common import parser
from svdnas.recovery.synthetic import SyntheticSet, load_synthetic, save_synthetic


def main() -> None:
    p = parser(__doc__, model=None, data=None, threads=None, seed=None)
    p.add_argument("sets", nargs="+", help="synthetic image files written by svdnas synth")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    parts = [load_synthetic(path) for path in args.sets]
    configs = {str(s.meta.get("config", {}) | {"num": None}) for s in parts}
    if len(configs) > 1:
        raise SystemExit("the sets were made with different settings; joining them would mix two kinds of image")
    last = parts[-1].meta
    meta = {
        **last, "seed": [s.meta.get("seed") for s in parts], "seconds": sum(float(s.meta.get("seconds", 0.0)) for s in parts),
        "loss": [curve for s in parts for curve in s.meta.get("loss", [])], "joined": list(args.sets),
    }
    meta["config"] = dict(last["config"], num=sum(len(s.images) for s in parts))
    images = torch.cat([s.images for s in parts])
    save_synthetic(args.out, SyntheticSet(images, meta))
    print(f"{len(images)} images from {len(parts)} sets -> {args.out}")


if __name__ == "__main__":
    main()
