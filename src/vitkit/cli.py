"""The `vitkit` command line: every subcommand's options come from types (a config dataclass, or
the typed signature and docstring of its `cmd_*` function), and each calls one library function."""

from __future__ import annotations

import dataclasses
import inspect
import json as _json
import os
import sys
import typing
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Callable, Literal, Optional

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _config_parser(config: type, description: str) -> ArgumentParser:
    """A subcommand whose options are the fields of a typed config (objective configs as groups)."""
    p = ArgumentParser(description=description, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="A YAML file of the options below; flags override it.")
    p.add_class_arguments(config, as_group=False, sub_configs=False)
    return p


def _command(fn: Callable[..., int], *, many: tuple[str, ...] = (), maybe: tuple[str, ...] = (),
             repeat: tuple[str, ...] = ()) -> ArgumentParser:
    """A subcommand's parser from its function's typed signature and docstring, plus shapes jsonargparse
    does not make from a type: `many` positionals take one or more values, `maybe` ones may be left
    out, `repeat` options take one or more of a Literal's values, repeatably (`--precision bf16 fp32`)."""
    doc = inspect.getdoc(fn) or ""
    p = ArgumentParser(description=doc.split("\n\n")[0], exit_on_error=False)
    p.add_function_arguments(fn, as_group=False, as_positional=True, skip=set(many + maybe + repeat))
    helps = {a.arg_name: a.description for a in docstring_parser.parse(doc).params}
    hints = typing.get_type_hints(fn)
    for name in many:
        p.add_argument(name, nargs="+", help=helps[name])
    for name in maybe:
        p.add_argument(name, nargs="?", default=None, help=helps[name])
    for name in repeat:
        choices = typing.get_args(typing.get_args(typing.get_args(hints[name])[0])[0])  # list[Literal[...]] | None
        p.add_argument(f"--{name}", nargs="+", action="extend", choices=choices, default=None, help=helps[name])
    return p


def build_parser() -> ArgumentParser:
    from .engine import PretrainConfig, TrainConfig

    train = _config_parser(TrainConfig, "Train a classifier; with no options, the default small ViT on mnist5k. "
                           "--teacher distils it from a teacher (DeiT).")
    pretrain = _config_parser(PretrainConfig, "Self-supervised pre-training (MAE or BEiT) on images without labels; "
                              "fine-tune the run with `vitkit train --pretrained RUN`.")
    parser = ArgumentParser(prog="vitkit", description="Vision Transformers: train, evaluate, predict.",
                            exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subcommands(dest="command", required=True)
    sub.add_subcommand("train", train, help="train or resume a run")
    sub.add_subcommand("pretrain", pretrain, help="self-supervised pre-training: MAE or BEiT")
    sub.add_subcommand("eval", _command(cmd_eval), help="evaluate a run")
    sub.add_subcommand("explain", _command(cmd_explain, many=("images",)), help="attention maps, rollout and Grad-CAM over images")
    sub.add_subcommand("predict", _command(cmd_predict, many=("images",)), help="predict classes of images")
    sub.add_subcommand("embed", _command(cmd_embed, many=("images",)), help="write one embedding per image")
    sub.add_subcommand("push", _command(cmd_push), help="upload a run to the Hugging Face Hub")
    sub.add_subcommand("models", _command(cmd_models, maybe=("pattern",)), help="list registered models")
    sub.add_subcommand("convert", _command(cmd_convert), help="convert pretrained weights to a vitkit run")
    sub.add_subcommand("export", _command(cmd_export), help="export a run for use outside vitkit")
    sub.add_subcommand("serve", _command(cmd_serve), help="serve predictions and a web page")
    sub.add_subcommand("data", _command(cmd_data, maybe=("out",)),
                       help="check an image folder (decode every file, count classes) or pack it as shards")
    sub.add_subcommand("benchmark", _command(cmd_benchmark, repeat=("mode", "precision")),
                       help="measure training and inference speed")
    return parser


# On/off switches that may be given bare (`--compile` for `--compile true`), by subcommand.
_SWITCHES = {
    "train": {"--compile", "--grad_checkpointing", "--fsdp", "--strict", "--tta", "--hflip", "--linear_probe"},
    "pretrain": {"--compile", "--grad_checkpointing", "--fsdp", "--strict", "--hflip", "--mae.norm_pix_loss"},
    "eval": {"--no_report", "--tta"}, "predict": {"--json"}, "push": {"--private", "--dry_run"}, "export": {"--int8", "--dynamic_batch"},
}
# The objectives' settings live in their own configs; their short flags stay as users know them.
_SHORT_FLAGS = {
    "train": {"--teacher": "--distill.teacher", "--teacher_weights": "--distill.teacher_weights",
              "--distill": "--distill.kind", "--alpha": "--distill.alpha", "--tau": "--distill.tau"},
    "pretrain": {"--norm_pix_loss": "--mae.norm_pix_loss", "--decoder_dim": "--mae.decoder_dim",
                 "--decoder_depth": "--mae.decoder_depth", "--decoder_heads": "--mae.decoder_heads",
                 "--tokenizer": "--beit.tokenizer", "--vocab_size": "--beit.vocab_size",
                 "--tokenizer_images": "--beit.tokenizer_images"},
    "export": {"--no_dynamic_batch": "--dynamic_batch=false"},
}


def _normalize_flags(argv: list[str]) -> list[str]:
    """Accept `--batch-size` as well as `--batch_size`, bare switches such as `--compile`, and the
    objectives' short flags (`--teacher` for `--distill.teacher`, `--mask-ratio` for `--mae.mask_ratio`)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    short = dict(_SHORT_FLAGS.get(command, {}))
    if command == "pretrain":  # mask_ratio belongs to the method's own config
        method = next((v for f, v in zip(argv, argv[1:]) if f == "--method"), None)
        method = method or next((a.partition("=")[2] for a in argv if a.startswith("--method=")), "mae")
        short["--mask_ratio"] = f"--{method}.mask_ratio"
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and len(a) > 2:
            name, eq, val = a[2:].partition("=")
            flag = "--" + name.replace("-", "_")
            a = short.get(flag, flag) + eq + val
        out.append(a)
        if a in _SWITCHES.get(command, ()) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def train_config(ns: Namespace):
    """The checked `TrainConfig` of a parsed `vitkit train` namespace."""
    from .engine import TrainConfig

    return _typed(TrainConfig, ns)


def _main_process() -> bool:
    """False in the other processes of a torchrun job, which would print the same lines again."""
    return int(os.environ.get("RANK", "0")) == 0


def _typed(config: type, ns: Namespace):
    """The checked config dataclass of a parsed namespace (nested objective configs included)."""
    d = ns.as_dict()
    return config(**{f.name: d[f.name] for f in dataclasses.fields(config) if f.name in d})


def cmd_train(ns: Namespace) -> int:
    from .engine import train

    run_dir = train(train_config(ns))
    if _main_process():
        print(f"run saved to {run_dir}")
    return 0


def cmd_pretrain(ns: Namespace) -> int:
    from .engine import PretrainConfig, pretrain

    run_dir = pretrain(_typed(PretrainConfig, ns))
    if _main_process():
        print(f"run saved to {run_dir}; fine-tune it with: vitkit train --pretrained {run_dir} --data ...")
    return 0


def cmd_eval(run_dir: str, *, data: Optional[str] = None, batch_size: int = 256, device: str = "cpu",
             out: Optional[str] = None, no_report: bool = False, weights: Literal["auto", "ema", "raw"] = "auto",
             tta: Optional[bool] = None) -> int:
    """Top-1, top-5 and loss of a run; written to RUN_DIR/eval.json.

    Args:
        run_dir: a run directory
        data: data set name or folder (default: the run's validation split)
        batch_size: images per batch
        device: cpu, cuda, ...
        out: report folder: JSON, PNGs, report.html (default: RUN_DIR/eval)
        no_report: only top-1, top-5 and loss (RUN_DIR/eval.json)
        weights: auto: the EMA weights when the run kept them; ema; raw
        tta: test-time augmentation: flips and/or 1 px shifts, as the run trained (default: the run's setting)
    """
    from .engine import evaluate_run

    report = None if no_report else Path(out or Path(run_dir) / "eval")
    r = evaluate_run(run_dir, data, batch_size=batch_size, device=device, report_dir=report, tta=tta, weights=weights)
    print(f"{r['data']}: top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}%  loss {r['loss']:.4f}  ({r['n']} images)")
    if "acc1_heads" in r:  # DeiT: the prediction averages the two heads
        print(f"  class head {r['acc1_heads'][0]:.2f}%  distillation head {r['acc1_heads'][1]:.2f}%  average {r['acc1']:.2f}%")
    print(f"written to {run_dir}/eval.json")
    if report is not None:
        print(f"report: {report / 'report.html'} (report.json and the PNGs alongside)")
    return 0


def _readable_images(patterns: list[str], command: str) -> tuple[list[Path], int]:
    """The images `patterns` name that decode, and how many did not (each reported on stderr)."""
    from .preprocess import check_image, expand_images

    files, bad = [], 0
    for f in expand_images(patterns):
        try:
            check_image(f)
            files.append(f)
        except ValueError as e:
            print(f"vitkit {command}: skipped {e}", file=sys.stderr)
            bad += 1
    if not files:
        raise ValueError(f"no readable images in {', '.join(patterns)}")
    return files, bad


def cmd_explain(run_dir: str, images: list[str], *, method: Literal["rollout", "attention", "gradcam", "all"] = "rollout",
                head_fusion: Literal["mean", "max", "min"] = "mean", discard_ratio: float = 0.0,
                target: Optional[str] = None, out: Optional[str] = None, device: str = "cpu") -> int:
    """Heat maps of what a run's model looks at, overlaid on the images, as PNGs; unreadable images
    are reported on stderr (exit status 1).

    Args:
        run_dir: a run directory
        images: image files or folders
        method: rollout: attention rollout over all blocks (window-aware for Swin); attention: the last block's, per head; gradcam: gradient-weighted last-block tokens; all: each of them
        head_fusion: how heads are combined
        discard_ratio: rollout: zero this share of the weakest links
        target: gradcam: explain this class (default: the predicted one)
        out: folder for the PNGs (default: RUN_DIR/explain)
        device: cpu, cuda, ...
    """
    from .explain import METHODS, explain_files
    from .run import load_run

    run = load_run(run_dir, device)
    files, bad = _readable_images(images, "explain")
    out = Path(out or Path(run_dir) / "explain")
    methods = METHODS if method == "all" else (method,)
    written = explain_files(run, files, out, methods=methods, head_fusion=head_fusion, discard_ratio=discard_ratio,
                            target=target)
    print(f"{len(written)} overlays ({', '.join(methods)}) written to {out}")
    return 1 if bad else 0


def cmd_predict(run_dir: str, images: list[str], *, topk: int = 5, json: bool = False, device: str = "cpu") -> int:
    """Class probabilities for images; unreadable images are reported on stderr and skipped (exit status 1).

    Args:
        run_dir: a run directory
        images: image files or folders
        topk: how many classes per image
        json: print JSON instead of text
        device: cpu, cuda, ...
    """
    from .run import load_run

    run = load_run(run_dir, device)
    files, bad = _readable_images(images, "predict")
    preds = run.predict(files, topk=topk)
    if json:
        print(_json.dumps([{"image": str(f), "top": [{"class": c, "prob": p} for c, p in ps]} for f, ps in zip(files, preds)], indent=2))
    else:
        for f, ps in zip(files, preds):
            print(f"{f}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in ps))
    return 1 if bad else 0


def cmd_embed(source: str, images: list[str], *, out: str, model: Optional[str] = None, batch_size: int = 64,
              device: str = "cpu") -> int:
    """One embedding per image (the pooled features the classifier reads), batched, written to a file;
    unreadable images are reported on stderr and skipped (exit status 1).

    Args:
        source: a run directory, a hub id, a Hugging Face directory or a weights file
        images: image files or folders
        out: .npy (file names in a .txt beside it) or .parquet (columns file, embedding)
        model: the variant a timm weights file holds (other sources name their own)
        batch_size: images per forward pass
        device: cpu, cuda, ...
    """
    from .convert import open_source
    from .run import write_embeddings

    if Path(out).suffix not in (".npy", ".parquet"):
        raise ValueError(f"--out {out}: write embeddings to a .npy or .parquet file")
    run = open_source(source, model, device)
    files, bad = _readable_images(images, "embed")
    emb = run.embed(files, batch_size=batch_size, progress=True)
    written = write_embeddings(out, emb, [str(f) for f in files])
    print(f"{emb.shape[0]} embeddings of {emb.shape[1]} values -> {', '.join(map(str, written))}")
    return 1 if bad else 0


def cmd_push(run_dir: str, *, repo_id: str, private: bool = False, dry_run: bool = False) -> int:
    """Upload a run (model card, config.yaml, weights, eval.json, metrics) to a Hugging Face model repository;
    needs huggingface_hub, a token (`hf auth login` or HF_TOKEN) and a network.

    Args:
        run_dir: a run directory
        repo_id: the repository, NAME or ORG/NAME (created if needed)
        private: create it private
        dry_run: only list what would be uploaded (and refresh the card)
    """
    from .card import push

    files = push(run_dir, repo_id, private=private, dry_run=dry_run)
    verb = "would upload" if dry_run else "uploaded"
    print(f"{verb} to https://huggingface.co/{repo_id}{' (private)' if private else ''}:")
    for f in files:
        print(f"  {f.name:<28} {f.stat().st_size / 1e6:>9.2f} MB")
    return 0


def cmd_data(action: Literal["check", "pack"], root: str, out: Optional[str] = None, *, shard_size: int = 10_000,
             seed: int = 0, val_fraction: float = 0.2) -> int:
    """Check an image folder, or write it as WebDataset shards.

    check: decode every image once (as training will), with a progress bar, then list the classes and their
    image counts, the images' modes and every damaged file or empty class folder training would skip. Exit
    status 1 when there are any. pack: write ROOT as OUT/train-NNNNNN.tar and OUT/val-NNNNNN.tar of
    --shard-size samples each, with OUT/info.json (classes, counts), for `vitkit train --data wds:OUT`.

    Args:
        action: check or pack.
        root: ROOT/CLASS/*.png, or ROOT/train/CLASS/... and ROOT/val/CLASS/....
        out: pack: the folder to write the shards to.
        shard_size: pack: samples per shard.
        seed: pack: the seed of the train/validation split (as `vitkit train --seed`) and the shuffle.
        val_fraction: pack: the validation share of a folder without train/ and val/ (as `vitkit train`).
    """
    if action == "pack":
        from .data.streams import pack_folder

        if out is None:
            raise ValueError("vitkit data pack ROOT OUT: name the folder to write the shards to")
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} is invalid: must be >= 1")
        info = pack_folder(root, out, shard_size=shard_size, seed=seed, val_fraction=val_fraction,
                           progress=sys.stderr.isatty())
        for split, shards in info["splits"].items():
            print(f"{split}: {sum(s['samples'] for s in shards):,} samples in {len(shards)} shards")
        print(f"{len(info['classes'])} classes -> {out}; train on them with: vitkit train --data wds:{out}")
        return 0
    from .data import check_folder

    report = check_folder(root, progress=sys.stderr.isatty())
    print(f"{report.images:,} usable images under {report.root}")
    for split, classes in report.counts.items():
        where = "" if split == "all" else f"{split}: "
        print(f"  {where}{len(classes)} classes: " + ", ".join(f"{c} {n:,}" for c, n in classes.items()))
    print("  modes: " + ", ".join(f"{m} {n:,}" for m, n in sorted(report.modes.items())))
    if report.skipped:
        print(f"{len(report.skipped)} damaged files or empty class folders, which training skips (--strict: an error):")
        for path, why in report.skipped:
            print(f"  {path}: {why}")
    return 1 if report.skipped else 0


def cmd_models(pattern: Optional[str] = None) -> int:
    """The registry: name, family, parameters, GFLOPs and default image size.

    Args:
        pattern: wildcard or substring, e.g. 'deit*'
    """
    import torch

    from .models import create_model, get_model_entry, list_models
    from .models.profile import count_flops, count_params

    names = list_models(pattern)
    if not names:
        raise ValueError(f"no model matches {pattern!r}; `vitkit models` lists them all")
    print(f"{'name':<36} {'family':<8} {'params':>9} {'GFLOPs':>8} {'img size':>9}")
    for name in names:
        entry = get_model_entry(name)
        try:
            with torch.device("meta"):  # count without allocating or initialising weights
                model = create_model(name)
        except (NotImplementedError, RuntimeError):  # an initialiser that reads values (torchvision's RegNet)
            model = create_model(name)
        size = entry.config.img_size
        flops = count_flops(model, size, entry.config.in_chans)
        side = size if isinstance(size, int) else size[0]
        print(f"{name:<36} {entry.family:<8} {count_params(model) / 1e6:>8.2f}M {flops / 1e9:>8.2f} {side:>9}")
    return 0


def cmd_convert(src: str, out: str, *, model: Optional[str] = None, num_classes: Optional[int] = None,
                img_size: Optional[int] = None) -> int:
    """Convert a timm file, Hugging Face directory or hub id, or JAX .npz to a run directory.

    Args:
        src: weights file, Hugging Face directory, or hub id org/name
        out: run directory to write
        model: registered model name (required for timm files)
        num_classes: a new classifier with this many classes
        img_size: input side; position embeddings are resampled
    """
    from .convert import convert

    print(f"run saved to {convert(src, out, model=model, num_classes=num_classes, img_size=img_size)}")
    return 0


def cmd_export(run_dir: str, *, format: Literal["onnx", "torchscript", "exported-program"] = "onnx",
               out: Optional[str] = None, dynamic_batch: bool = True, int8: bool = False,
               weights: Literal["auto", "ema", "raw"] = "auto") -> int:
    """Export a run to ONNX, TorchScript or a torch.export program, checked against PyTorch
    (exit status 1 when parity fails); preprocess.json next to the model holds the preprocessing and class names.

    Args:
        run_dir: a run directory
        format: the export format
        out: folder to write (default: RUN_DIR/export-FORMAT)
        dynamic_batch: a free batch dimension (--no-dynamic-batch for batch 1)
        int8: also write model.int8.onnx (dynamic int8 linear layers) and report its accuracy change
        weights: auto: EMA weights when kept
    """
    from .export import PARITY_TOL, export_run

    try:
        r = export_run(run_dir, format, out, dynamic_batch=dynamic_batch, int8=int8, weights=weights)
    except ImportError as e:  # onnx / onnxruntime missing
        raise RuntimeError(f"vitkit export needs the export extra: pip install 'vitkit[export]' ({e})") from e
    batch = "dynamic batch" if r.dynamic_batch else "batch 1"
    print(f"exported {r.model_file} ({r.format}, {batch})")
    sizes = " and ".join(map(str, r.batch_sizes))
    print(f"parity with PyTorch at batch {sizes}: max |logit difference| {r.max_abs_diff:.2e} "
          f"(tolerance {PARITY_TOL:.0e}): {'ok' if r.parity_ok else 'FAILED'}")
    if q := r.int8:
        print(f"int8: {r.out_dir / q['file']} ({q['int8_bytes'] / 1e6:.2f} MB, fp32 {q['fp32_bytes'] / 1e6:.2f} MB): "
              f"top-1 {q['fp32_acc1']:.2f}% -> {q['int8_acc1']:.2f}% ({q['change']:+.2f} points), same top-1 class "
              f"on {q['agreement']:.1f}% of {q['n']} validation images")
    print(f"preprocessing and class names: {r.preprocess_file}")
    if not r.parity_ok:
        print("vitkit export: error: the export does not reproduce the PyTorch logits", file=sys.stderr)
    return 0 if r.parity_ok else 1


def cmd_serve(path: str, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10.0, max_batch: int = 32,
              max_wait_ms: float = 2.0, max_queue: int = 64, timeout_s: float = 30.0,
              max_image_pixels: int = 40_000_000) -> int:
    """Serve a run directory or ONNX export over HTTP: POST /predict, GET /health, GET /metrics, and a
    web page at / to try it. A full queue answers 503 with Retry-After.

    Args:
        path: a run directory, an ONNX export folder or one of its .onnx files
        host: 0.0.0.0 to accept other machines
        port: the TCP port
        max_upload_mb: larger request bodies get 413
        max_batch: most concurrent requests in one forward pass
        max_wait_ms: how long a batch waits for more requests
        max_queue: most requests waiting at once (upload read, decoded or queued for a batch); more get 503 with Retry-After
        timeout_s: a request not answered within this gets 504 and its work is dropped
        max_image_pixels: larger images (or resized copies) get 413; decoding one costs ~14 bytes per pixel
    """
    try:
        from .serve import serve

        serve(path, host, port, max_upload_bytes=int(max_upload_mb * 2**20), max_batch=max_batch, max_wait_ms=max_wait_ms,
              max_queue=max_queue, timeout_s=timeout_s, max_image_pixels=max_image_pixels)
    except ImportError as e:  # fastapi / uvicorn / python-multipart (or onnxruntime for an export) missing
        raise RuntimeError(f"vitkit serve needs the serve extra: pip install 'vitkit[serve]' ({e})") from e
    return 0


def cmd_benchmark(*, model: str, mode: Optional[list[Literal["train", "infer"]]] = None,
                  precision: Optional[list[Literal["auto", "fp32", "bf16", "fp16"]]] = None, batch_size: int = 64,
                  img_size: Optional[int] = None, steps: int = 10, warmup: int = 3, device: str = "cpu",
                  matmul_size: Optional[int] = None, json: Optional[str] = None) -> int:
    """Training and inference speed of a model on this machine: images/s, latency, peak memory,
    GFLOPs and TFLOP/s against the measured matmul peak.

    Args:
        model: a name from `vitkit models`
        mode: train and/or infer, repeatable (default: both)
        precision: one or more of auto, fp32, bf16, fp16, repeatable (default: fp32 and auto)
        batch_size: images per batch
        img_size: input side in pixels (default: the model's)
        steps: timed batches per row (the median is reported)
        warmup: untimed batches per row before timing
        device: cpu, cuda, cuda:1, auto
        matmul_size: side of the square matmuls that measure the peak (default 2048 on CPU, 8192 on CUDA)
        json: also write the report to this JSON file
    """
    from .benchmark import DEFAULT_MODES, DEFAULT_PRECISIONS, benchmark

    benchmark(model, modes=mode or DEFAULT_MODES, precisions=precision or DEFAULT_PRECISIONS, batch_size=batch_size,
              img_size=img_size, steps=steps, warmup=warmup, device=device, matmul_size=matmul_size, json_path=json)
    return 0


# What a user can cause: a bad value, a missing or damaged file, a full disk, a diverging run, an
# optional dependency not installed (peft for LoRA, huggingface_hub for push, pyarrow for Parquet).
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2 (`--debug` raises them instead)."""
    at_terminal = argv is None  # the console script; tests and other callers keep their own warning format
    argv = _normalize_flags(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if at_terminal and not debug:  # a warning is one line for a person, not a source location and a code line
        warnings.formatwarning = lambda message, category, *_, **__: f"vitkit: {category.__name__}: {message}\n"
    try:
        ns = build_parser().parse_args(argv)
    except ArgumentError as e:
        if debug:
            raise
        msg = " ".join(str(e).split())
        print(f"vitkit: error: {msg} (see vitkit --help)", file=sys.stderr)
        return 2
    commands = {"train": cmd_train, "pretrain": cmd_pretrain, "eval": cmd_eval, "predict": cmd_predict, "embed": cmd_embed,
                "push": cmd_push, "models": cmd_models, "data": cmd_data,
                "convert": cmd_convert, "explain": cmd_explain, "export": cmd_export, "serve": cmd_serve, "benchmark": cmd_benchmark}
    args = ns[ns.command]
    try:
        return commands[ns.command](args) if ns.command in ("train", "pretrain") else commands[ns.command](**args.as_dict())
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"vitkit {ns.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
