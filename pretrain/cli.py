"""`pretrain`: the command line.

  pretrain train [--config=FILE[:ARG]] [--config.a.b=V ...]
  pretrain describe [--config=FILE[:ARG]] [--config.a.b=V ...] [--json]
  pretrain convert --from-hf HF_DIR --to-orbax CKPT_DIR
  pretrain convert --from-orbax CKPT_DIR --to-hf HF_DIR [--dtype=bfloat16]
  pretrain parity [--workdir=DIR]
  pretrain prepare [--config=FILE[:ARG]] [--workers=N] [--overwrite-mismatch]
  pretrain prepare --input PATH [--input PATH ...] --domain code --tokenizer TOK --out DIR
  pretrain tokenizer train [--config=FILE[:ARG]] [--input PATH ...] --out DIR --vocab-size N

Each subcommand takes its own flags; `--config` and `--config.*` go to ml-collections.
Errors in input (a config key, a file, a tensor) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def cmd_train(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.train import stages, trainer

  _, experiment = config_lib.load(config_flags)
  if experiment.stages:
    stages.run(experiment)
  else:
    trainer.train(experiment)


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


def cmd_prepare(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain import schema
  from pretrain.data import workspace
  from pretrain.data.config import DataConfig

  if args.input:  # an ad-hoc single-component preparation, no config file
    if config_flags:
      raise ConfigError("prepare", "give either --config or --input/--domain/--tokenizer/--out, not both")
    missing = [flag for flag, value in (("--domain", args.domain), ("--tokenizer", args.tokenizer),
                                        ("--out", args.out)) if not value]
    if missing:
      raise ConfigError("prepare", f"--input needs {', '.join(missing)}")
    from pretrain.data import prepare
    from pretrain.data.mixture import Mixture
    from pretrain.data.tokenizer import load_tokenizer

    mixture = Mixture.from_inputs(args.input, domain=args.domain, text_field=args.text_field,
                                  language=args.language)
    data = schema.parse(DataConfig, {"mixture": "", "prepared_dir": args.out, "tokenizer": args.tokenizer},
                        "prepare")
    tokenizer = load_tokenizer(args.tokenizer, data.special_tokens, key="--tokenizer")
    config = data.prepare if args.workers is None else dataclasses.replace(data.prepare, workers=args.workers)
    manifest = prepare.prepare(mixture, args.out, tokenizer, config=config, tokenizer_path=str(tokenizer.path),
                               overwrite_mismatch=args.overwrite_mismatch, log=print)
  else:
    _, experiment = config_lib.load(config_flags)
    if experiment.data is None:
      raise ConfigError("config.data", "this config has no data section to prepare")
    _, _, manifest = workspace.ensure_prepared(experiment.data, workers=args.workers,
                                               overwrite_mismatch=args.overwrite_mismatch)
  for name, component in manifest["components"].items():
    print(f"{name:<10} {component['documents_written']:>9,} documents  {component['tokens_written']:>13,} tokens")


def cmd_tokenizer(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.data import mixture as mixture_lib
  from pretrain.data import sources
  from pretrain.data.config import SpecialTokens
  from pretrain.data.tokenizer_train import iter_texts_from_paths, train_sentencepiece

  if args.input:
    texts, special_tokens = iter_texts_from_paths(args.input, args.text_field), SpecialTokens()
  else:
    _, experiment = config_lib.load(config_flags)
    if experiment.data is None:
      raise ConfigError("config.data", "this config has no data section; give --input paths instead")
    texts = sources.mixture_texts(mixture_lib.load(experiment.data.mixture))
    special_tokens = experiment.data.special_tokens
  path = train_sentencepiece(texts, args.out, vocab_size=args.vocab_size, special_tokens=special_tokens)
  print(f"wrote {path}")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
  parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("train", help="continued pretraining: the config's model on its data (default: the built-in "
                 "tiny DeepSeek-V2-style model on the built-in corpus)")
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
  p = sub.add_parser("prepare", help="filter, dedup and tokenize a mixture's raw inputs into shards")
  p.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's; 0 = all cores)")
  p.add_argument("--overwrite-mismatch", action="store_true",
                 help="replace a preparation of other inputs/tokenizer/config in the output directory")
  p.add_argument("--input", action="append", default=[], metavar="PATH",
                 help="an input (directory, .jsonl[.gz], .parquet, glob) for an ad-hoc preparation")
  p.add_argument("--domain", choices=["code", "math", "text"], help="the domain of the --input documents")
  p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model / tokenizer.json, for --input")
  p.add_argument("--out", metavar="DIR", help="output directory, for --input")
  p.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text (default: text)")
  p.add_argument("--language", default="", help="language of JSONL/Parquet documents")
  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tokenizer_sub = p.add_subparsers(dest="tokenizer_command", required=True)
  t = tokenizer_sub.add_parser("train", help="train a byte-exact sentencepiece BPE model with BOS/EOS/PAD and FIM "
                               "sentinels, on a config's mixture or on --input paths")
  t.add_argument("--input", action="append", default=[], metavar="PATH")
  t.add_argument("--text-field", default="text")
  t.add_argument("--out", required=True, metavar="DIR")
  t.add_argument("--vocab-size", type=int, required=True)
  return parser, {"train": cmd_train, "describe": cmd_describe, "convert": cmd_convert, "parity": cmd_parity, "prepare": cmd_prepare,
                  "tokenizer": cmd_tokenizer}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_flags, rest = _split_config_flags(argv)
  parser, commands = _parser()
  args = parser.parse_args(rest)
  from pretrain.data.records import CorruptRecordError
  from pretrain.train.trainer import BadStepsError

  try:
    commands[args.command](args, config_flags)
  except (ConfigError, ConversionError, CorruptRecordError, FileNotFoundError, FileExistsError) as e:
    print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
    return 2
  except BadStepsError as e:  # the run itself went bad, not its input
    print(f"pretrain {args.command}: stopped: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
