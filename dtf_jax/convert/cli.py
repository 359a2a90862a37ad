"""Command line of the converter (``python -m dtf_jax.convert``).

Import a PyTorch checkpoint (writes an orbax model-state directory + ``dtf_jax_model.json``)::

  python -m dtf_jax.convert --model c2d_sifa_resnet50 --source original \\
      --input ckpt_epoch_64.pth --output /tmp/sifa_r50
  python -m dtf_jax.convert --model c2d_dtf_resnet50 --source imagenet --num-classes 400 \\
      --input resnet50-19c8e357.pth --output /tmp/dtf_r50_init

Export one back to PyTorch (original key names and layouts; ``.safetensors`` or ``.pth``)::

  python -m dtf_jax.convert export --checkpoint /tmp/sifa_r50 --output sifa_r50.safetensors
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
import warnings

from flax import nnx

from dtf_jax.convert import api, export
from dtf_jax.convert.loading import UnsafeCheckpointError, read_state_dict
from dtf_jax.convert.mapping import ConversionError
from dtf_jax.models import list_models


def _parse_override(text: str) -> tuple[str, object]:
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--override expects KEY=VALUE, got {text!r}")
  key, value = text.split("=", 1)
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value  # a bare string, e.g. dtype=bfloat16
  return key.strip(), parsed


def _import_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m dtf_jax.convert",
      description="Convert a PyTorch checkpoint (the originals' or 2-D ImageNet weights) to a dtf_jax "
                  "model-state directory. `python -m dtf_jax.convert export --help` for the reverse.")
  p.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                 help="registered model name: " + ", ".join(list_models()))
  p.add_argument("--source", required=True, choices=api.SOURCES,
                 help="'original': a checkpoint of the original DTF/SIFA code (or one exported by "
                      "dtf_jax); 'imagenet': torchvision ResNet or official Swin 2-D weights, inflated")
  p.add_argument("--input", required=True, help=".pth/.pt (read with weights_only=True) or .safetensors")
  p.add_argument("--output", required=True, help="new directory for the orbax model state + JSON")
  p.add_argument("--num-classes", type=int, default=None,
                 help="classifier size (default for --source original: the checkpoint's fc rows)")
  p.add_argument("--clip-length", type=int, default=16, help="frames per clip (default 16)")
  p.add_argument("--image-size", type=int, default=224, help="input size (default 224)")
  p.add_argument("--allow-missing-head", action="store_true",
                 help="the checkpoint may lack fc.* / fc_dual.* (the head keeps its initialisation)")
  p.add_argument("--remove-fc", action="store_true", help="drop fc.* (the original remove_fc)")
  p.add_argument("--remove-defcor-weight", action="store_true",
                 help="drop *def_cor.weight (SIFA; they depend on the clip length)")
  p.add_argument("--convert-fft-weight", action="store_true",
                 help="the original DTF convert_fft_weight (drops *weights_cor*)")
  p.add_argument("--seed", type=int, default=0,
                 help="initialisation seed of the tensors the checkpoint does not provide")
  p.add_argument("--override", action="append", type=_parse_override, default=[], metavar="KEY=VALUE",
                 help="extra create_model argument (Python literal), e.g. layers=[3,4,6,3]; repeatable")
  return p


def _export_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m dtf_jax.convert export",
      description="Write a dtf_jax model-state directory as a PyTorch state_dict with the originals' "
                  "key names and layouts (loads into the original networks with strict=True).")
  p.add_argument("--checkpoint", required=True, help="directory written by python -m dtf_jax.convert")
  p.add_argument("--output", required=True, help="output file: .safetensors or .pth")
  return p


def _log(msg: str) -> None:
  print(msg, flush=True)


def run_import(args: argparse.Namespace) -> int:
  start = time.perf_counter()
  if os.path.exists(args.output):
    raise ValueError(f"--output {args.output!r} already exists; choose a new directory")
  _log(f"reading {args.input} (weights only) ...")
  raw = read_state_dict(args.input)
  _log(f"  {len(raw)} tensors")
  num_classes = args.num_classes
  if num_classes is None:
    if args.source == "imagenet" or args.remove_fc or "fc.weight" not in raw:
      raise ValueError("--num-classes is required (it cannot be read from the checkpoint's fc.weight "
                       "for --source imagenet, with --remove-fc, or without an fc.weight)")
    num_classes = int(raw["fc.weight"].shape[0])
    _log(f"  num_classes = {num_classes} (from fc.weight)")
  overrides = dict(args.override)
  settings = "".join(f", {k}={v!r}" for k, v in overrides.items())
  _log(f"building and converting {args.model} (num_classes={num_classes}, "
       f"clip_length={args.clip_length}, image_size={args.image_size}{settings}) ...")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # printed in the summary instead
    model, report = api.from_pytorch(
        args.model, raw, source=args.source, num_classes=num_classes, clip_length=args.clip_length,
        image_size=args.image_size, rngs=nnx.Rngs(args.seed), remove_fc=args.remove_fc,
        remove_defcor_weight=args.remove_defcor_weight, convert_fft_weight=args.convert_fft_weight,
        allow_missing_head=args.allow_missing_head, return_report=True, **overrides)
  meta = export.model_meta(
      args.model, num_classes=num_classes, clip_length=args.clip_length, image_size=args.image_size,
      model_overrides=overrides,
      converted_from={"source": args.source, "input": args.input,
                      "rules": sorted(set(report.dropped_by_rule.values())),
                      "tensors_converted": len(report.converted),
                      "missing_kept_at_init": sorted(report.missing)})
  _log(f"writing {args.output} ...")
  export.save_model(args.output, model, meta)
  _log(report.summary())
  _log(f"done in {time.perf_counter() - start:.1f}s: {args.output}")
  return 0


def run_export(args: argparse.Namespace) -> int:
  start = time.perf_counter()
  _log(f"loading {args.checkpoint} ...")
  model, meta = export.load_model(args.checkpoint)
  state_dict = api.export_pytorch(model, meta["model"], args.output)
  _log(f"wrote {len(state_dict)} tensors of {meta['model']} in the original PyTorch layout to "
       f"{args.output} ({time.perf_counter() - start:.1f}s)")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  exporting = bool(argv) and argv[0] == "export"
  args = (_export_parser().parse_args(argv[1:]) if exporting else _import_parser().parse_args(argv))
  try:
    return run_export(args) if exporting else run_import(args)
  except (ConversionError, UnsafeCheckpointError, ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
