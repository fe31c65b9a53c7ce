"""The ``svdnas`` command line: a thin layer that parses options and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence

import torch

from svdnas.errors import SvdnasError, WriteError

log = logging.getLogger("svdnas")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SvdnasError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SvdnasError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML (or JSON) file of this command's options; flags override it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, module:FILE.py:FUNC or a run directory")
    p.add_argument("--weights", default=None, help=".safetensors, .pt or .pth (loaded without unpickling)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input when the model does not say")
    p.add_argument("--allow-code", action="store_true", help="let a run directory rebuild a module: base (runs its code)")


def _progress(args: argparse.Namespace, total: int, desc: str):
    from tqdm import tqdm

    disable = args.quiet or not sys.stdout.isatty()
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False, dynamic_ncols=True)


def _input_shape(args: argparse.Namespace, info, data) -> tuple[int, int, int]:
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise SvdnasError(f"--input-shape must be C,H,W, got {args.input_shape!r}")
        return shape  # type: ignore[return-value]
    if info.input_shape:
        return info.input_shape
    if data is not None:
        return data.input_shape
    raise SvdnasError(f"cannot tell the input shape of {info.spec}; give --input-shape C,H,W")


def _model_and_data(args: argparse.Namespace, device: torch.device, data_free: bool = False):
    """The MODEL and the labelled DATA of a command, checked against each other (DATA may be none only when ``data_free``)."""
    from svdnas.data.datasets import load_data
    from svdnas.runs.directory import load_model
    from svdnas.surgery.trace import check_input

    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    data = load_data(args.data)
    if data is None and not data_free:
        raise SvdnasError(f"{args.command} needs real data: --data none works only with --mode data-free")
    shape = _input_shape(args, info, data)
    if data is not None and tuple(shape) != tuple(data.input_shape):
        raise SvdnasError(f"{args.model} expects inputs {tuple(shape)}, but {args.data} has {data.input_shape}")
    model = model.to(device)
    check_input(model, shape)
    return model, info, data, shape


def cmd_eval(args: argparse.Namespace) -> int:
    from svdnas.cost.counting import count_params, model_macs
    from svdnas.data.evaluate import evaluate

    _need(args, "data")
    device = _device(args.device)
    model, info, data, shape = _model_and_data(args, device)
    with _progress(args, len(data.test), "eval") as bar:  # type: ignore[arg-type]
        acc = evaluate(model, data.test, device, progress=bar.update)
    result = {"top1": acc["top1"], "top5": acc["top5"], "flops": 2 * model_macs(model, shape), "params": count_params(model)}
    if not args.json:
        print(f"model   {info.spec}")
        print(f"top-1   {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   ({len(data.test)} images)")
        print(f"FLOPs   {result['flops'] / 1e6:.2f} M   params {result['params'] / 1e6:.3f} M")
    print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from svdnas.lowrank.space import count_space
    from svdnas.runs.directory import load_model
    from svdnas.surgery.targets import select_targets
    from svdnas.surgery.trace import example_input, trace_layers

    model, info = load_model(args.model, args.weights, pretrained=False)
    shape = _input_shape(args, info, None)
    infos = trace_layers(model, example_input(model, shape))
    targets, skipped = select_targets(model, infos, args.filter or info.default_filter)
    total = 0
    rows = []
    for name in targets:
        layer = model.get_submodule(name)
        n = count_space(layer)
        total += n
        rows.append({"name": name, "shape": list(layer.weight.shape), "candidates": n})
        if not args.json:
            print(f"{name:40s} {tuple(layer.weight.shape)!s:22s} {n:8d}")
    if args.json:
        print(json.dumps({"layers": rows, "total": total, "skipped": skipped}))
    else:
        print(f"{'total':40s} {'':22s} {total:8d}")
        for name, reason in skipped.items():
            print(f"left alone: {name}: {reason}")
    return 0


def _grid(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) not in (2, 3):
        raise SvdnasError(f"--grid must be START:STOP[:STEP], got {text!r}")
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else 0.05)


def _prepare_out(out: str, overwrite: bool, resume: bool = False) -> None:
    from pathlib import Path

    d = Path(out)
    if d.exists() and not d.is_dir():
        raise SvdnasError(f"--out {out} exists and is not a directory")
    if (d / "report.json").exists() and not overwrite:
        raise SvdnasError(f"{out} already holds a finished run; pass --overwrite to replace it")
    stale = [*d.glob("checkpoint-*.pt"), *d.glob("checkpoint-*.json"), *d.glob("*.partial")] if d.is_dir() else []
    if stale and not resume:
        if not overwrite:
            raise SvdnasError(f"{out} holds the checkpoints of an unfinished run; pass --resume to continue it or --overwrite to start again")
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(d, e) from e


def _need(args: argparse.Namespace, *names: str) -> None:
    """Options that a command needs, from the command line or --config."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is None]
    if missing:
        raise SvdnasError(f"{args.command} needs {', '.join(missing)} (on the command line or in --config)")


def _save_config(args: argparse.Namespace) -> None:
    from pathlib import Path

    from svdnas.fileio import atomic_write_json

    atomic_write_json(Path(args.out) / "config.json", resolved_config(args))


def cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdnas.pipeline.compress import compress
    from svdnas.pipeline.config import CompressConfig
    from svdnas.runs.directory import RunDir
    from svdnas.search import SearchConfig

    _need(args, "data", "out")
    if args.reduction is not None and args.beta is not None:
        raise SvdnasError("give --reduction or --beta, not both")
    if args.reduction is None and args.beta is None:
        raise SvdnasError("give --reduction R (share of the cost to remove) or --beta X")
    from svdnas import distributed as ddp

    # options first: a bad one is reported before a model or data set is loaded
    search = SearchConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, sampling=args.sampling, window_dtype=args.search_dtype, target=0.5,
    )
    config = CompressConfig(
        reduction=args.reduction, beta=args.beta, objective=args.objective, filter=args.filter,
        grid=_grid(args.grid), max_groups=None if args.max_groups == 0 else args.max_groups,
        search_images=args.search_images, proxy_images=args.proxy_images, families=args.families, proxy_drop=args.proxy_drop, branches=args.branches, search_loss=args.search_loss, search=search,
        mode=args.mode, finetune=_finetune_config(args), synth=_synth_config(args, args.synth_images),
        synthetic_path=args.synthetic, synth_val=args.synth_val, synth_test=args.synth_test,
    )
    if args.objective == "latency":
        from svdnas.cost.table import LatencyConfig

        config.latency = LatencyConfig(batch=args.latency_batch, cache=args.latency_cache)
    config.fractions()  # checks --grid
    device = _device(args.device)
    ddp.init(device)
    model, info, data, shape = _model_and_data(args, device, data_free=args.mode == "data-free")
    config.filter = config.filter or info.default_filter
    bar, progress = _start_run(args, "search")

    try:
        result = compress(
            model, data, config, input_shape=shape, device=device, seed=args.seed,
            out=RunDir(Path(args.out), base=info.spec), progress=progress, resume=True,
        )
    finally:
        bar.close()
    main = ddp.is_main()
    ddp.barrier()
    ddp.shutdown()
    if not main:
        return 0
    r = result.report
    print(f"{info.spec}: FLOPs -{100 * r['flops']['reduction']:.2f}%  params -{100 * r['params']['reduction']:.2f}%")
    _print_outcome(r)
    if "branches" in r:
        for b in ("b1", "b2"):
            x = r["branches"][b]
            print(f"  {b.upper()}: FLOPs -{100 * x['flops']['reduction']:.2f}%  top-1 drop {x['top1']['drop_pp']:.2f}pp")
    if "predicted" in (r.get("latency") or {}):
        lat = r["latency"]
        print(f"latency -{100 * lat['reduction']:.2f}% measured at batch {lat['batch']} (predicted -{100 * lat['predicted']['reduction']:.2f}%)")
    _write_report_quietly(args.out)
    print(f"search {r['seconds']['search']:.1f}s, total {r['seconds']['total']:.1f}s; run directory {args.out}")
    return 0


def _start_run(args: argparse.Namespace, first_stage: str):
    """Prepare and claim --out (rank 0), then a progress bar that every stage of the run updates.

    Returns the bar (close it at the end) and ``progress(stage, done, total)``.
    """
    from tqdm import tqdm

    from svdnas import distributed as ddp

    if ddp.is_main():
        _prepare_out(args.out, args.overwrite, args.resume)
        _save_config(args)
    ddp.barrier()
    quiet = args.quiet or not sys.stdout.isatty() or not ddp.is_main()
    bar = tqdm(total=0, desc=first_stage, unit="step", disable=quiet, dynamic_ncols=True)

    def progress(stage: str, done: int, total: int) -> None:
        bar.set_description(stage)
        bar.total, bar.n = total, done
        bar.refresh()

    return bar, progress


def _print_outcome(r: dict) -> None:
    """Accuracy (before and after recovery) and fidelity lines of a report."""
    rec = r.get("recovery")
    if r.get("top1"):
        if rec and "before" in rec:
            print(f"top-1 after compression {rec['before']['top1']:.2f}%, after {rec['mode']} recovery {r['top1']['compressed']:.2f}%")
        print(f"top-1 {r['top1']['original']:.2f}% -> {r['top1']['compressed']:.2f}% (drop {r['top1']['drop_pp']:.2f}pp)")
    if r.get("fidelity"):
        f = r["fidelity"]
        print(f"top-1 agreement with the original on {f['images']} held-out synthetic images: {f['top1_agreement']:.2f}%")


def _finetune_config(args: argparse.Namespace):
    from svdnas.recovery.distill import FinetuneConfig

    if args.mode == "post-training":
        return None
    mode = "synthetic" if args.mode == "data-free" else args.mode
    return FinetuneConfig(
        mode=mode, epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.finetune_batch_size,
        shots=args.shots, val_images=args.val_images, augment=args.augment, layer_loss=args.layer_loss,
        collapse=args.collapse,
    )


def _synth_config(args: argparse.Namespace, num: int):
    from svdnas.recovery.synthetic import SynthConfig

    return SynthConfig(
        num=num, batch_size=args.synth_batch_size, iterations=args.synth_iterations, lr=args.synth_lr,
        image_weight=args.image_weight, channel_mean=not args.no_channel_mean, parallel=args.synth_parallel,
    )


def _recovery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=int, default=1000, help="few-shot: labelled training images to learn on")
    p.add_argument("--val-images", type=int, default=1000, help="training images held out to steer the fine-tuning schedule")
    p.add_argument("--finetune-epochs", type=int, default=None, help="most epochs of fine-tuning (default: 60, or 3 with --mode full)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="SGD's learning rate (default: 0.01 for synthetic, few-shot and data-free, restarting at a tenth "
                        "after a collapse; 0.001, the paper's, for full)")
    p.add_argument("--augment", action="store_true",
                   help="few-shot and full: flip and shift the training images at random (teacher and student alike)")
    p.add_argument("--finetune-batch-size", type=int, default=64)
    p.add_argument("--collapse", type=float, default=10.0,
                   help="validation points below the best at which fine-tuning goes back to its best state with a tenth "
                        "of the learning rate (a non-finite loss too); 0: off, a non-finite loss stops the run")
    p.add_argument("--layer-loss", default="relative", choices=["relative", "plain"],
                   help="per-layer distillation term: MSE over the original output's mean square (default), or the paper's plain MSE")
    p.add_argument("--synthetic", default=None, help="reuse synthetic images written by `svdnas synth` (a .safetensors file)")
    p.add_argument("--synth-images", type=int, default=1384, help="synthetic images to make (learning + --synth-val + --synth-test)")
    p.add_argument("--synth-val", type=int, default=128, help="synthetic images held out to steer the schedule")
    p.add_argument("--synth-test", type=int, default=256, help="synthetic images held out for the fidelity figure")
    _synth_args(p)


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synth-batch-size", type=int, default=32, help="images optimised together")
    p.add_argument("--synth-iterations", type=int, default=500)
    p.add_argument("--synth-lr", type=float, default=0.5)
    p.add_argument("--image-weight", type=float, default=1.0, help="lambda, the weight of the per-image mean/std term")
    p.add_argument("--no-channel-mean", action="store_true", help="sum each BatchNorm layer's term over channels (ZeroQ) instead of averaging")
    p.add_argument("--synth-parallel", type=int, default=1,
                   help="batches optimised in one pass (the same images, faster on a GPU; memory grows with it)")


def cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdnas.recovery.synthetic import generate, meta_path, require_batchnorm, save_synthetic
    from svdnas.runs.directory import load_model

    _need(args, "num", "out")
    device = _device(args.device)
    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = _input_shape(args, info, None)
    require_batchnorm(model, info.spec)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SvdnasError(f"--out must name a .safetensors file, got {args.out}")
    if meta_path(out).exists() and not args.overwrite:
        raise SvdnasError(f"{out} already holds synthetic images; pass --overwrite to replace them")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(out.stem + ".partial")
    if args.overwrite:
        shutil.rmtree(work, ignore_errors=True)
    config = _synth_config(args, args.num)
    with _progress(args, -(-args.num // config.batch_size), "synthetic") as bar:
        synthetic = generate(model.to(device), shape, config, args.seed, device, work, lambda d, t: bar.update(d - bar.n))
    paths = save_synthetic(out, synthetic)
    shutil.rmtree(work, ignore_errors=True)
    finals = [c[-1] for c in synthetic.meta["loss"]]
    print(f"{len(synthetic.images)} synthetic images from {info.spec} in {synthetic.meta['seconds']:.1f}s; "
          f"statistics loss {sum(finals) / len(finals):.4f} (mean final); wrote {', '.join(str(p) for p in paths)} and {meta_path(out)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from svdnas import distributed as ddp
    from svdnas.data.datasets import load_data
    from svdnas.pipeline.finetune import finetune
    from svdnas.runs.directory import load_model

    _need(args, "data", "out", "mode")
    device = _device(args.device)
    ddp.init(device)
    data = load_data(args.data)
    if data is None and args.mode != "data-free":
        raise SvdnasError(f"--mode {args.mode} needs real data: --data none works only with --mode data-free")
    teacher = None
    if args.teacher is not None:
        teacher, _ = load_model(args.teacher, args.teacher_weights, allow_code=args.allow_code)
    bar, progress = _start_run(args, "finetune")

    try:
        _, r = finetune(
            args.dir, args.mode, data, args.out, _finetune_config(args), _synth_config(args, args.synth_images), args.synthetic,
            args.synth_val, args.synth_test, teacher, device, args.seed, args.allow_code, resume=True, progress=progress,
        )
    finally:
        bar.close()
    main = ddp.is_main()
    ddp.barrier()
    ddp.shutdown()
    if not main:
        return 0
    print(f"{args.dir} fine-tuned ({args.mode}): FLOPs -{100 * r['flops']['reduction']:.2f}%")
    _print_outcome(r)
    _write_report_quietly(args.out)
    print(f"fine-tuning {r['seconds']['finetune']:.1f}s; run directory {args.out}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdnas.pipeline.baseline import run_baseline
    from svdnas.runs.directory import RunDir

    _need(args, "data", "reduction", "out")
    device = _device(args.device)
    model, info, data, shape = _model_and_data(args, device)
    _prepare_out(args.out, args.overwrite)
    _save_config(args)
    _, _, r = run_baseline(
        args.method, model, data, args.reduction, shape, args.filter or info.default_filter, args.split,
        args.objective, args.search_images, device, args.seed, RunDir(Path(args.out), base=info.spec),
    )
    print(f"{args.method} ({r['split']}) on {info.spec}: FLOPs -{100 * r['flops']['reduction']:.2f}%  params -{100 * r['params']['reduction']:.2f}%")
    _write_report_quietly(args.out)
    print(f"top-1 {r['top1']['original']:.2f}% -> {r['top1']['compressed']:.2f}% (drop {r['top1']['drop_pp']:.2f}pp); run directory {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from svdnas.report.plots import write_report

    for path in write_report(args.dir):
        print(path)
    return 0


def _write_report_quietly(out: str) -> None:
    from svdnas.report.plots import write_report

    write_report(out)


def cmd_export(args: argparse.Namespace) -> int:
    from svdnas.runs.directory import load_model
    from svdnas.runs.export import export_onnx

    _need(args, "onnx")
    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = _input_shape(args, info, None)
    result = export_onnx(model, shape, args.onnx, opset=args.opset)
    print(f"wrote {result['path']} (opset {result['opset']}); ONNX Runtime vs PyTorch max abs difference {result['max_abs_diff']:.2e}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from svdnas.cost.timer import onnx_latency, torch_latency
    from svdnas.runs.directory import load_model

    model, info = load_model(args.model, args.weights, allow_code=args.allow_code)
    shape = _input_shape(args, info, None)
    kw = {"batch": args.batch, "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats}
    result = {"model": info.spec, "batch": args.batch, "threads": args.threads or torch.get_num_threads(), "pytorch": torch_latency(model, shape, **kw)}
    if args.onnx:
        result["onnxruntime"] = onnx_latency(model, shape, **kw)
    for engine in ("pytorch", "onnxruntime"):
        if engine in result and not args.json:
            r = result[engine]
            print(f"{engine:12s} median {r['median_ms']:.3f} ms  (p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f}; {r['repeats']} runs, batch {args.batch})")
    if args.json:
        print(json.dumps(result))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from svdnas import __version__

    parser = _Parser(prog="svdnas", description="Low-rank compression of CNNs found by neural architecture search (SVD-NAS).")
    parser.add_argument("--version", action="version", version=f"svdnas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="top-1, top-5, FLOPs and params of a model")
    _model_args(p)
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR or imagefolder:DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="the SVD-NAS pipeline: search, derive, evaluate, write a run directory")
    _model_args(p)
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR, imagefolder:DIR (none: data-free only)")
    p.add_argument("--reduction", type=float, default=None, help="share of the original cost to remove, 0 < R < 1")
    p.add_argument("--beta", type=float, default=None, help="the paper's fixed trade-off instead of --reduction")
    p.add_argument("--out", default=None, help="run directory to write")
    p.add_argument("--mode", default="post-training", choices=["post-training", "synthetic", "few-shot", "full", "data-free"])
    p.add_argument("--objective", default="flops", choices=["flops", "params", "latency"])
    p.add_argument("--latency-batch", type=int, default=1, help="images per pass of the latency objective's timings (default 1: one request)")
    p.add_argument("--latency-cache", default=None, help="JSON file of measured layer latencies (default: latency-<device>-<threads>.json in $SVDNAS_CACHE or ~/.cache/svdnas)")
    p.add_argument("--branches", type=int, default=1, choices=[1, 2])
    p.add_argument("--filter", default=None, help="target layers (default: the paper's for the model)")
    p.add_argument("--sampling", default="mixed", choices=["mixed", "two"], help="mixed: all candidates in one weight (default); two: the release's scheme")
    p.add_argument("--search-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision of the mixed super blocks' rank-window products (auto: bfloat16 where the device multiplies it natively)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the logits (the paper: 0.01 over 100 epochs)")
    p.add_argument("--search-images", type=int, default=1000)
    p.add_argument("--search-loss", default="ce", choices=["ce", "kd"], help="ce: labels (the paper); kd: the original model's soft labels")
    p.add_argument("--grid", default=None, help="START:STOP[:STEP] of kept-cost fractions per layer (default: around the target)")
    p.add_argument("--max-groups", type=int, default=0, help="largest group count of a candidate (default 0: no limit)")
    p.add_argument("--families", type=int, default=4, help="families kept per layer by the output-error proxy (0: all)")
    p.add_argument("--proxy-drop", type=float, default=5.0, metavar="PP",
                   help="remove candidates whose layer alone loses more than PP points of top-1 on the proxy images (0: off)")
    p.add_argument("--proxy-images", type=int, default=256,
                   help="training images, apart from the search images, for both proxies (fewer: faster, coarser verdicts)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoints in --out")
    _recovery_args(p)
    _common(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("synth", help="synthetic images from the model's BatchNorm statistics")
    _model_args(p)
    p.add_argument("--num", type=int, default=None, help="images to make")
    p.add_argument("--out", default=None, help=".safetensors file to write (shards beside it when large)")
    p.add_argument("--overwrite", action="store_true")
    _synth_args(p)
    _common(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("finetune", help="knowledge-distillation recovery of a compressed run directory")
    p.add_argument("dir", help="a run directory written by compress or baseline")
    p.add_argument("--data", default=None, help="fmnist, fmnist:DIR, imagefolder:DIR (none: data-free only)")
    p.add_argument("--mode", default=None, choices=["synthetic", "few-shot", "full", "data-free"])
    p.add_argument("--out", default=None, help="run directory to write")
    p.add_argument("--teacher", default=None, help="the original model (default: the run's base model with its weights)")
    p.add_argument("--teacher-weights", default=None)
    p.add_argument("--allow-code", action="store_true", help="let a module: base be rebuilt (runs its code)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue a killed fine-tuning from its checkpoint in --out")
    _recovery_args(p)
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("baseline", help="a published competitor at the same budget, same outputs as compress")
    p.add_argument("method", choices=["uniform", "energy", "lrs2", "alds", "fgroup"])
    _model_args(p)
    p.add_argument("--data", default=None)
    p.add_argument("--reduction", type=float, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--objective", default="flops", choices=["flops", "params"])
    p.add_argument("--split", default="kx1", help="uniform and energy: kxk, 1x1, kx1, 1xk (what the first layer holds) "
                   "or best; lrs2 (kx1), alds and fgroup (kxk) fix their own")
    p.add_argument("--filter", default=None)
    p.add_argument("--search-images", type=int, default=1000, help="images that pick the split for --split best")
    p.add_argument("--overwrite", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("report", help="report.md and PNG plots of a run directory")
    p.add_argument("dir")
    _common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="ONNX export, checked in ONNX Runtime against PyTorch")
    _model_args(p)
    p.add_argument("--onnx", default=None, help="file to write")
    p.add_argument("--opset", type=int, default=17)
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("latency", help="measured inference latency (median of repeated runs)")
    _model_args(p)
    p.add_argument("--onnx", action="store_true", help="also measure ONNX Runtime")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("space", help="size of the LR-space of each target layer")
    _model_args(p)
    p.add_argument("--filter", default=None, help="target layers: all-but-first, convs, pointwise, linear, convs+linear")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_space)
    return parser


def _load_config(path: str) -> dict:
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SvdnasError(f"cannot read --config {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        import yaml
    except ImportError:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SvdnasError(f"--config {path} is not valid JSON (install PyYAML for YAML): {e}") from e
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SvdnasError(f"--config {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SvdnasError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the config file's values as defaults, so that flags given still win."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    values = _load_config(args.config)
    known = {a.dest for a in sub._actions}
    unknown = sorted(set(values) - known - {"command", "config"})
    if unknown:
        raise SvdnasError(f"--config {args.config}: unknown option(s) for {args.command}: {', '.join(unknown)}")
    positional = {a.dest for a in sub._actions if not a.option_strings}
    sub.set_defaults(**{k: v for k, v in values.items() if k not in positional})
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> dict:
    """The options a command ran with (for the run directory)."""
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def _one_line(message: str) -> str:
    """A message that spans lines (some libraries' do) as the one line the contract promises."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if getattr(args, "config", None):
            args = _apply_config(parser, argv, args)
        torch.manual_seed(args.seed)
        return args.func(args)
    except (SvdnasError, OSError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
