"""The `vitkit` command line: each subcommand parses its options and calls the library."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _config_parser(config: type, description: str) -> ArgumentParser:
    """A subcommand whose options are the fields of a typed config (objective configs as groups)."""
    p = ArgumentParser(description=description, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="A YAML file of the options below; flags override it.")
    p.add_class_arguments(config, as_group=False, sub_configs=False)
    return p


def _train_parser() -> ArgumentParser:
    from .engine import TrainConfig

    return _config_parser(TrainConfig, "Train a classifier; with no options, the default small ViT on mnist5k. "
                          "--teacher distils it from a teacher (DeiT).")


def _pretrain_parser() -> ArgumentParser:
    from .engine import PretrainConfig

    return _config_parser(PretrainConfig, "Self-supervised pre-training (MAE or BEiT) on images without labels; "
                          "fine-tune the run with `vitkit train --pretrained RUN`.")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vitkit", description="Vision Transformers: train, evaluate, predict.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subcommands(dest="command", required=True)
    sub.add_subcommand("train", _train_parser(), help="train or resume a run")
    sub.add_subcommand("pretrain", _pretrain_parser(), help="self-supervised pre-training: MAE or BEiT")

    ev = ArgumentParser(description="Top-1, top-5 and loss of a run; written to RUN_DIR/eval.json.", exit_on_error=False)
    ev.add_argument("run_dir", help="a run directory")
    ev.add_argument("--data", default=None, help="data set name or folder (default: the run's validation split)")
    ev.add_argument("--batch_size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="report folder: JSON, PNGs, report.html (default: RUN_DIR/eval)")
    ev.add_argument("--no_report", action="store_true", help="only top-1, top-5 and loss (RUN_DIR/eval.json)")
    ev.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                    help="auto: the EMA weights when the run kept them; ema; raw")
    ev.add_argument("--tta", default=None, type=Optional[bool], help="test-time augmentation: flips and/or 1 px shifts, as the run trained (default: the run's setting)")
    sub.add_subcommand("eval", ev, help="evaluate a run")

    xp = ArgumentParser(description="Heat maps of what a run's model looks at, overlaid on the images, as PNGs.",
                        exit_on_error=False)
    xp.add_argument("run_dir", help="a run directory")
    xp.add_argument("images", nargs="+", help="image files or folders")
    xp.add_argument("--method", choices=["rollout", "attention", "gradcam", "all"], default="rollout",
                    help="rollout: attention rollout over all blocks (window-aware for Swin); attention: the last "
                    "block's, per head; gradcam: gradient-weighted last-block tokens; all: each of them")
    xp.add_argument("--head_fusion", choices=["mean", "max", "min"], default="mean", help="how heads are combined")
    xp.add_argument("--discard_ratio", type=float, default=0.0, help="rollout: zero this share of the weakest links")
    xp.add_argument("--target", default=None, help="gradcam: explain this class (default: the predicted one)")
    xp.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/explain)")
    xp.add_argument("--device", default="cpu")
    sub.add_subcommand("explain", xp, help="attention maps, rollout and Grad-CAM over images")

    pr = ArgumentParser(description="Class probabilities for images; unreadable images are reported and skipped.", exit_on_error=False)
    pr.add_argument("run_dir", help="a run directory")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.add_argument("--device", default="cpu")
    sub.add_subcommand("predict", pr, help="predict classes of images")

    md = ArgumentParser(description="The registry: name, family, parameters, GFLOPs and default image size.", exit_on_error=False)
    md.add_argument("pattern", nargs="?", default=None, help="wildcard or substring, e.g. 'deit*'")
    sub.add_subcommand("models", md, help="list registered models")

    cv = ArgumentParser(description="Convert a timm file, Hugging Face directory or hub id, or JAX .npz to a run directory.",
                        exit_on_error=False)
    cv.add_argument("src", help="weights file, Hugging Face directory, or hub id org/name")
    cv.add_argument("out", help="run directory to write")
    cv.add_argument("--model", default=None, help="registered model name (required for timm files)")
    cv.add_argument("--num_classes", type=int, default=None, help="a new classifier with this many classes")
    cv.add_argument("--img_size", type=int, default=None, help="input side; position embeddings are resampled")
    sub.add_subcommand("convert", cv, help="convert pretrained weights to a vitkit run")

    ex = ArgumentParser(description="Export a run to ONNX, TorchScript or a torch.export program, checked against "
                        "PyTorch; preprocess.json next to the model holds the preprocessing and class names.",
                        exit_on_error=False)
    ex.add_argument("run_dir", help="a run directory")
    ex.add_argument("--format", choices=["onnx", "torchscript", "exported-program"], default="onnx")
    ex.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/export-FORMAT)")
    ex.add_argument("--dynamic_batch", action=ActionYesNo, default=True, help="a free batch dimension")
    ex.add_argument("--int8", action="store_true",
                    help="also write model.int8.onnx (dynamic int8 linear layers) and report its accuracy change")
    ex.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto", help="auto: EMA weights when kept")
    sub.add_subcommand("export", ex, help="export a run for use outside vitkit")

    sv = ArgumentParser(description="Serve a run directory or ONNX export over HTTP: POST /predict, GET /health, "
                        "GET /metrics, and a web page at / to try it. A full queue answers 503 with Retry-After.",
                        exit_on_error=False)
    sv.add_argument("path", help="a run directory, an ONNX export folder or one of its .onnx files")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max_upload_mb", type=float, default=10.0, help="larger request bodies get 413")
    sv.add_argument("--max_batch", type=int, default=32, help="most concurrent requests in one forward pass")
    sv.add_argument("--max_wait_ms", type=float, default=2.0, help="how long a batch waits for more requests")
    sv.add_argument("--max_queue", type=int, default=64,
                    help="most requests waiting at once (upload read, decoded or queued for a batch); more get 503 "
                         "with Retry-After")
    sv.add_argument("--timeout_s", type=float, default=30.0,
                    help="a request not answered within this gets 504 and its work is dropped")
    sv.add_argument("--max_image_pixels", type=int, default=40_000_000,
                    help="larger images (or resized copies) get 413; decoding one costs ~14 bytes per pixel")
    sub.add_subcommand("serve", sv, help="serve predictions and a web page")

    bm = ArgumentParser(description="Training and inference speed of a model on this machine: images/s, latency, "
                        "peak memory, GFLOPs and TFLOP/s against the measured matmul peak.", exit_on_error=False)
    bm.add_argument("--model", required=True, help="a name from `vitkit models`")
    bm.add_argument("--mode", nargs="+", action="extend", choices=["train", "infer"], default=None,
                    help="train and/or infer, repeatable; null means both")
    bm.add_argument("--precision", nargs="+", action="extend", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                    help="one or more of auto, fp32, bf16, fp16, repeatable; null means fp32 and auto")
    bm.add_argument("--batch_size", type=int, default=64)
    bm.add_argument("--img_size", type=int, default=None, help="input side in pixels (default: the model's)")
    bm.add_argument("--steps", type=int, default=10, help="timed batches per row (the median is reported)")
    bm.add_argument("--warmup", type=int, default=3, help="untimed batches per row before timing")
    bm.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    bm.add_argument("--matmul_size", type=int, default=None,
                    help="side of the square matmuls that measure the peak (default 2048 on CPU, 8192 on CUDA)")
    bm.add_argument("--json", default=None, help="also write the report to this JSON file")
    sub.add_subcommand("benchmark", bm, help="measure training and inference speed")
    return parser


# On/off training switches that may be given bare (`--compile` for `--compile true`).
_SWITCHES = {"--compile", "--grad_checkpointing", "--strict", "--tta", "--hflip", "--linear_probe", "--mae.norm_pix_loss"}
# The objectives' settings live in their own configs; their short flags stay as users know them.
_SHORT_FLAGS = {
    "train": {"--teacher": "--distill.teacher", "--teacher_weights": "--distill.teacher_weights",
              "--distill": "--distill.kind", "--alpha": "--distill.alpha", "--tau": "--distill.tau"},
    "pretrain": {"--norm_pix_loss": "--mae.norm_pix_loss", "--decoder_dim": "--mae.decoder_dim",
                 "--decoder_depth": "--mae.decoder_depth", "--decoder_heads": "--mae.decoder_heads",
                 "--tokenizer": "--beit.tokenizer", "--vocab_size": "--beit.vocab_size",
                 "--tokenizer_images": "--beit.tokenizer_images"},
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
        if a in _SWITCHES and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
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


def cmd_eval(ns: Namespace) -> int:
    from .engine import evaluate_run

    report = None if ns.no_report else Path(ns.out or Path(ns.run_dir) / "eval")
    r = evaluate_run(ns.run_dir, ns.data, batch_size=ns.batch_size, device=ns.device, report_dir=report, tta=ns.tta,
                     weights=ns.weights)
    print(f"{r['data']}: top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}%  loss {r['loss']:.4f}  ({r['n']} images)")
    if "acc1_heads" in r:  # DeiT: the prediction averages the two heads
        print(f"  class head {r['acc1_heads'][0]:.2f}%  distillation head {r['acc1_heads'][1]:.2f}%  average {r['acc1']:.2f}%")
    print(f"written to {ns.run_dir}/eval.json")
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


def cmd_explain(ns: Namespace) -> int:
    """Overlays for every readable image; unreadable ones are reported on stderr (exit 1)."""
    from .explain import METHODS, explain_files
    from .run import load_run

    run = load_run(ns.run_dir, ns.device)
    files, bad = _readable_images(ns.images, "explain")
    out = Path(ns.out or Path(ns.run_dir) / "explain")
    methods = METHODS if ns.method == "all" else (ns.method,)
    written = explain_files(run, files, out, methods=methods, head_fusion=ns.head_fusion,
                            discard_ratio=ns.discard_ratio, target=ns.target)
    print(f"{len(written)} overlays ({', '.join(methods)}) written to {out}")
    return 1 if bad else 0


def cmd_predict(ns: Namespace) -> int:
    """Predict every readable image; report unreadable ones on stderr and exit 1 if there were any."""
    from .run import load_run

    run = load_run(ns.run_dir, ns.device)
    files, bad = _readable_images(ns.images, "predict")
    preds = run.predict(files, topk=ns.topk)
    if ns.json:
        print(json.dumps([{"image": str(f), "top": [{"class": c, "prob": p} for c, p in ps]} for f, ps in zip(files, preds)], indent=2))
    else:
        for f, ps in zip(files, preds):
            print(f"{f}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in ps))
    return 1 if bad else 0


def cmd_models(ns: Namespace) -> int:
    import torch

    from .models import create_model, get_model_entry, list_models
    from .models.profile import count_flops, count_params

    names = list_models(ns.pattern)
    if not names:
        raise ValueError(f"no model matches {ns.pattern!r}; `vitkit models` lists them all")
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


def cmd_convert(ns: Namespace) -> int:
    from .convert import convert

    out = convert(ns.src, ns.out, model=ns.model, num_classes=ns.num_classes, img_size=ns.img_size)
    print(f"run saved to {out}")
    return 0


def cmd_export(ns: Namespace) -> int:
    """Export, then report parity (exit status 1 when it fails) and the int8 accuracy change."""
    from .export import PARITY_TOL, export_run

    try:
        r = export_run(ns.run_dir, ns.format, ns.out, dynamic_batch=ns.dynamic_batch, int8=ns.int8, weights=ns.weights)
    except ImportError as e:  # onnx / onnxruntime missing
        raise RuntimeError(f"vitkit export needs the export extra: pip install 'vitkit[export]' ({e})") from e
    batch = "dynamic batch" if r.dynamic_batch else "batch 1"
    print(f"exported {r.model_file} ({r.format}, {batch})")
    sizes = " and ".join(map(str, r.batch_sizes))
    print(f"parity with PyTorch at batch {sizes}: max |logit difference| {r.max_abs_diff:.2e} "
          f"(tolerance {PARITY_TOL:.0e}): {'ok' if r.parity_ok else 'FAILED'}")
    if r.int8:
        q = r.int8
        print(f"int8: {r.out_dir / q['file']} ({q['int8_bytes'] / 1e6:.2f} MB, fp32 {q['fp32_bytes'] / 1e6:.2f} MB): "
              f"top-1 {q['fp32_acc1']:.2f}% -> {q['int8_acc1']:.2f}% ({q['change']:+.2f} points), same top-1 class "
              f"on {q['agreement']:.1f}% of {q['n']} validation images")
    print(f"preprocessing and class names: {r.preprocess_file}")
    if not r.parity_ok:
        print("vitkit export: error: the export does not reproduce the PyTorch logits", file=sys.stderr)
    return 0 if r.parity_ok else 1


def cmd_serve(ns: Namespace) -> int:
    try:
        from .serve import serve

        serve(ns.path, ns.host, ns.port, max_upload_bytes=int(ns.max_upload_mb * 2**20), max_batch=ns.max_batch,
              max_wait_ms=ns.max_wait_ms, max_queue=ns.max_queue, timeout_s=ns.timeout_s,
              max_image_pixels=ns.max_image_pixels)
    except ImportError as e:  # fastapi / uvicorn / python-multipart (or onnxruntime for an export) missing
        raise RuntimeError(f"vitkit serve needs the serve extra: pip install 'vitkit[serve]' ({e})") from e
    return 0


def cmd_benchmark(ns: Namespace) -> int:
    from .benchmark import DEFAULT_MODES, DEFAULT_PRECISIONS, benchmark

    benchmark(ns.model, modes=ns.mode or DEFAULT_MODES, precisions=ns.precision or DEFAULT_PRECISIONS,
              batch_size=ns.batch_size, img_size=ns.img_size, steps=ns.steps, warmup=ns.warmup, device=ns.device,
              matmul_size=ns.matmul_size, json_path=ns.json)
    return 0


# What a user can cause: a bad value, a missing or damaged file, a full disk, a diverging run.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2 (`--debug` raises them instead)."""
    argv = _normalize_flags(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        ns = build_parser().parse_args(argv)
    except ArgumentError as e:
        if debug:
            raise
        msg = " ".join(str(e).split())
        print(f"vitkit: error: {msg} (see vitkit --help)", file=sys.stderr)
        return 2
    commands = {"train": cmd_train, "pretrain": cmd_pretrain, "eval": cmd_eval, "predict": cmd_predict, "models": cmd_models,
                "convert": cmd_convert, "explain": cmd_explain, "export": cmd_export, "serve": cmd_serve, "benchmark": cmd_benchmark}
    try:
        return commands[ns.command](ns[ns.command])
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"vitkit {ns.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
