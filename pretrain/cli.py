"""`pretrain`: the command line.

  pretrain describe [--config=FILE[:ARG]] [--config.a.b=V ...] [--json]
  pretrain convert --from-hf HF_DIR --to-orbax CKPT_DIR
  pretrain convert --from-orbax CKPT_DIR --to-hf HF_DIR [--dtype=bfloat16]
  pretrain parity [--workdir=DIR]

Each subcommand takes its own flags; `--config` and `--config.*` go to ml-collections.
Errors in input (a config key, a file, a tensor) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pretrain.convert.errors import ConversionError
from pretrain.schema import ConfigError


def _split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(--config and --config.* flags, everything else)."""
  config_flags, rest = [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
      config_flags += [arg, args.pop(0)] if args else [arg]
    elif arg.startswith(("--config=", "--config.")):
      config_flags.append(arg)
    else:
      rest.append(arg)
  return config_flags, rest


def cmd_describe(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.models import param_count

  _, experiment = config_lib.load(config_flags)
  model = experiment.model
  counts = param_count.count(model)
  if args.json:
    print(json.dumps({"family": model.family, "total": counts.total, "active": counts.active,
                      "by_group": counts.by_group}, indent=2))
    return
  print(f"model family     {model.family}")
  print(f"total params     {counts.total:>18,}  ({counts.total / 1e9:.2f}B)")
  print(f"active params    {counts.active:>18,}  ({counts.active / 1e9:.2f}B per token; "
        "excludes the input embedding lookup and unrouted experts)")
  for group, n in sorted(counts.by_group.items(), key=lambda kv: -kv[1]):
    print(f"  {group:<15}{n:>18,}")


def cmd_convert(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import convert

  if config_flags:
    raise ConfigError("--config", "convert reads the model config from the checkpoint; drop --config")
  if bool(args.from_hf) == bool(args.from_orbax):
    raise ConfigError("convert", "give exactly one of --from-hf or --from-orbax")
  if args.from_hf:
    if not args.to_orbax:
      raise ConfigError("convert", "--from-hf needs --to-orbax CKPT_DIR")
    model = convert.load_hf(args.from_hf)
    convert.save_orbax(model, args.to_orbax)
    print(f"wrote Orbax checkpoint {args.to_orbax}")
  else:
    if not args.to_hf:
      raise ConfigError("convert", "--from-orbax needs --to-hf HF_DIR")
    model = convert.load_orbax(args.from_orbax)
    convert.save_hf(model, args.to_hf, dtype=args.dtype)
    print(f"wrote Hugging Face checkpoint {args.to_hf}")


def cmd_parity(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain.convert import parity

  if config_flags:
    raise ConfigError("--config", "parity builds its own tiny models; drop --config")
  parity.main(args.workdir)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
  parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("describe", help="print total and active parameter counts of a config's model")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p = sub.add_parser("convert", help="convert between Hugging Face and Orbax checkpoints")
  p.add_argument("--from-hf", metavar="HF_DIR")
  p.add_argument("--to-orbax", metavar="CKPT_DIR")
  p.add_argument("--from-orbax", metavar="CKPT_DIR")
  p.add_argument("--to-hf", metavar="HF_DIR")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="dtype of the written safetensors (default float32)")
  p = sub.add_parser("parity", help="demo: tiny transformers models -> ours -> transformers, logits compared")
  p.add_argument("--workdir", default=None, help="where to keep the checkpoints (default: a temp dir)")
  return parser, {"describe": cmd_describe, "convert": cmd_convert, "parity": cmd_parity}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_flags, rest = _split_config_flags(argv)
  parser, commands = _parser()
  args = parser.parse_args(rest)
  try:
    commands[args.command](args, config_flags)
  except (ConfigError, ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
