"""The `vitkit` command line: each subcommand parses its options and calls the library."""

from __future__ import annotations

import dataclasses
import json
import sys

from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _train_parser() -> ArgumentParser:
    from .engine import TrainConfig

    p = ArgumentParser(description="Train a model; with no options, the default small ViT on mnist5k.", exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="A YAML file of the options below; flags override it.")
    p.add_class_arguments(TrainConfig, as_group=False, sub_configs=False)
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vitkit", description="Vision Transformers: train, evaluate, predict.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subcommands(dest="command", required=True)
    sub.add_subcommand("train", _train_parser(), help="train or resume a run")

    ev = ArgumentParser(description="Top-1, top-5 and loss of a run; written to RUN_DIR/eval.json.", exit_on_error=False)
    ev.add_argument("run_dir", help="a run directory")
    ev.add_argument("--data", default=None, help="data set name or folder (default: the run's validation split)")
    ev.add_argument("--batch_size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    sub.add_subcommand("eval", ev, help="evaluate a run")

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
    return parser


def _normalize_flags(argv: list[str]) -> list[str]:
    """Accept `--batch-size` as well as `--batch_size`."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, val = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + val
        out.append(a)
    return out


def train_config(ns: Namespace):
    """The checked `TrainConfig` of a parsed `vitkit train` namespace."""
    from .engine import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields})


def cmd_train(ns: Namespace) -> int:
    from .engine import train

    run_dir = train(train_config(ns))
    print(f"run saved to {run_dir}")
    return 0


def cmd_eval(ns: Namespace) -> int:
    from .engine import evaluate_run

    r = evaluate_run(ns.run_dir, ns.data, batch_size=ns.batch_size, device=ns.device)
    print(f"{r['data']}: top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}%  loss {r['loss']:.4f}  ({r['n']} images)")
    print(f"written to {ns.run_dir}/eval.json")
    return 0


def cmd_predict(ns: Namespace) -> int:
    """Predict every readable image; report unreadable ones on stderr and exit 1 if there were any."""
    from .data import check_image
    from .engine import expand_images, load_run

    run = load_run(ns.run_dir, ns.device)
    files, bad = [], 0
    for f in expand_images(ns.images):
        try:
            check_image(f)
            files.append(f)
        except ValueError as e:
            print(f"vitkit predict: skipped {e}", file=sys.stderr)
            bad += 1
    if not files:
        raise ValueError(f"no readable images in {', '.join(ns.images)}")
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
        with torch.device("meta"):  # count without allocating or initialising weights
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
    commands = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "models": cmd_models,
                "convert": cmd_convert}
    try:
        return commands[ns.command](ns[ns.command])
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"vitkit {ns.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
