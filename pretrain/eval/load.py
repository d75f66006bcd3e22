"""From `--checkpoint` to a model and its tokenizer, for every evaluation.

`--checkpoint` names one of the three sources `init_from` reads (train/checkpoint.py):
  - a Hugging Face directory (config.json + safetensors);
  - an Orbax model checkpoint (model_config.json, `pretrain convert --to-orbax`);
  - a training work directory (checkpoints/): its latest checkpoint's parameters, with the
    model config the trainer recorded in its experiment.json.
A staged recipe's work directory (stages/<i>-<name>/) stands for its latest finished stage;
name a stage's directory to evaluate an unfinished one (train/workdir.py `checkpoint_kind`
tells the kinds apart for every reader). The parameters are read by
`checkpoint.load_init_params`, as `init_from` reads them.
The tokenizer is `--tokenizer` if given, else the run's `data.tokenizer` (work directory),
else the tokenizer.json or single *.model inside the checkpoint directory. A Hugging Face
tokenizer_config.json, when present, names the BOS/EOS/pad strings; a model without a BOS
token (Qwen2) starts each text after EOS instead, as its pretraining packed documents.

`load_mixture` reads the mixture files that the evaluations take their text from.

`resolve` reads only small JSON files, so flags are checked against the tokenizer and the
model config before any parameter is read; `load_model` then reads the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from etils import epath
from flax import nnx

from pretrain import convert, models, schema, storage
from pretrain.convert import hf_import, param_shapes
from pretrain.data import mixture as mixture_lib
from pretrain.data.config import SpecialTokens
from pretrain.data.mixture import Mixture
from pretrain.data.tokenizer import Tokenizer, load_tokenizer, special_tokens_from_config
from pretrain.schema import ConfigError
from pretrain.train import checkpoint, workdir

KEY = "--checkpoint"


@dataclasses.dataclass(frozen=True)
class Source:
  """What `--checkpoint` points at, resolved: where the parameters are and how to read them."""

  given: str  # the flag's value, for reports
  path: epath.Path  # the directory whose parameters are read (for a recipe: its latest finished stage); may be a URL
  kind: workdir.Kind
  model_config: models.ModelConfig
  tokenizer_path: epath.Path  # may be a URL
  special_tokens: SpecialTokens
  step: int | None = None  # a work directory's latest checkpointed step

  def describe(self) -> dict:
    return {"checkpoint": self.given, "path": _absolute(self.path), "kind": self.kind, "step": self.step,
            "family": self.model_config.family, "tokenizer": _absolute(self.tokenizer_path)}


def resolve(checkpoint_path: str, tokenizer: str | None = None) -> Source:
  """The source `checkpoint_path` names, its model config and its tokenizer's location; reads no parameters."""
  kind, path = workdir.checkpoint_kind(checkpoint_path, KEY)
  if kind == "huggingface":
    config = convert.config_from_hf(_read_json(path / workdir.HF_CONFIG_FILE))
    return _with_tokenizer(checkpoint_path, path, kind, config, tokenizer)
  if kind == "orbax":
    config = models.parse_model_config(_read_json(path / convert.orbax_io.CONFIG_FILE),
                                       key=str(path / convert.orbax_io.CONFIG_FILE))
    return _with_tokenizer(checkpoint_path, path, kind, config, tokenizer)
  return _workdir_source(checkpoint_path, path, tokenizer)


def load_tokenizer_of(source: Source) -> Tokenizer:
  local = source.tokenizer_path
  if storage.is_url(local):  # sentencepiece and tokenizers read local files
    local = storage.download(local, "--tokenizer")
  # A released model's FIM sentinels (Qwen2.5-Coder's, say) are found even where no config names them.
  tokenizer = load_tokenizer(local, source.special_tokens, key="--tokenizer").with_known_fim_sentinels()
  if tokenizer.vocab_size > source.model_config.vocab_size:
    raise ConfigError("--tokenizer", f"{source.tokenizer_path} has {tokenizer.vocab_size} tokens, more than the "
                      f"model's vocab_size {source.model_config.vocab_size}")
  return tokenizer


def load_model(source: Source) -> models.CausalLM:
  """The model with the source's parameters, on the default device (read as `init_from` reads them)."""
  graphdef, abstract_params, rest = nnx.split(models.build_abstract(source.model_config), nnx.Param, ...)
  placed = param_shapes.placed(abstract_params, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  params = checkpoint.load_init_params(str(source.path), placed, read_window_bytes=hf_import.DEFAULT_READ_WINDOW_BYTES,
                                       key=KEY, log=lambda *_: None)
  return nnx.merge(graphdef, params, rest)


def load_mixture(spec: str, flag: str) -> Mixture:
  """The mixture file (FILE[:ARG], FILE local or a URL) an evaluation reads text from; a missing file is an
  error naming `flag`."""
  scheme = next((s for s in storage.URL_SCHEMES if spec.startswith(s)), "")
  name, colon, arg = spec[len(scheme):].partition(":")
  name = scheme + name
  file = storage.download(name, flag) if scheme else pathlib.Path(name).expanduser()
  if not file.is_file():
    raise ConfigError(flag, f"mixture file {file} does not exist")
  return mixture_lib.load(str(file) + colon + arg)


def jit_apply(model: models.CausalLM, fn):
  """`fn(model, *arrays)` under jax.jit, the parameters passed as arguments rather than baked in as constants."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda state, *arrays: fn(nnx.merge(graphdef, state), *arrays))
  return lambda *arrays: jitted(state, *arrays)


def default_out_dir(source: Source) -> epath.Path:
  """`<workdir>/eval` for a training run, which owns its directory (on a bucket too); `./eval/<name>` for a
  model directory, which may be read-only or shared."""
  if source.kind == "workdir":
    return source.path / "eval"
  return epath.Path("eval") / pathlib.PurePath(_absolute(source.path)).name


def _workdir_source(given: str, path: epath.Path, tokenizer: str | None) -> Source:
  experiment_file = path / workdir.EXPERIMENT_FILE
  if not experiment_file.is_file():
    raise ConfigError(KEY, f"{path} has {checkpoint.CHECKPOINTS_DIR}/ but no {workdir.EXPERIMENT_FILE}, where the "
                      "trainer records the run's model and tokenizer")
  experiment = _read_json(experiment_file)
  config = models.parse_model_config(experiment.get("model"), key=f"{experiment_file} model")
  data = experiment.get("data") or {}
  special_tokens = schema.parse(SpecialTokens, data.get("special_tokens"), f"{experiment_file} data.special_tokens")
  if tokenizer is None and not data.get("tokenizer"):
    raise ConfigError("--tokenizer", f"{experiment_file} records no data.tokenizer; give --tokenizer")
  tokenizer_path = storage.as_path(tokenizer or data["tokenizer"])
  if not tokenizer_path.exists():
    where = "" if tokenizer else f" (the run's data.tokenizer, from {experiment_file}; give --tokenizer)"
    raise ConfigError("--tokenizer", f"{tokenizer_path} does not exist{where}")
  step = workdir.complete_steps(path)[-1]
  return Source(given, path, "workdir", config, tokenizer_path, special_tokens, step)


def _with_tokenizer(given: str, path: epath.Path, kind: workdir.Kind, config, tokenizer: str | None) -> Source:
  """A model directory's source: its tokenizer is --tokenizer or the one inside it."""
  if tokenizer is not None:
    tokenizer_path = storage.as_path(tokenizer)
    if not tokenizer_path.exists():
      raise ConfigError("--tokenizer", f"{tokenizer_path} does not exist")
  elif (path / "tokenizer.json").is_file():
    tokenizer_path = path / "tokenizer.json"
  else:
    found = sorted(path.glob("*.model"))
    if len(found) != 1:
      raise ConfigError("--tokenizer", f"{path} holds no tokenizer.json and {len(found)} *.model files; "
                        "give --tokenizer")
    tokenizer_path = found[0]
  return Source(given, path, kind, config, tokenizer_path, _special_tokens(path))


def _special_tokens(path: epath.Path) -> SpecialTokens:
  """BOS/EOS/pad strings from the model directory's tokenizer_config.json (a local copy for a bucket's)."""
  file = path / "tokenizer_config.json"
  if storage.is_url(path):
    return special_tokens_from_config(storage.download(file, KEY).parent) if file.is_file() else SpecialTokens()
  return special_tokens_from_config(path)


def _read_json(file: epath.Path) -> dict:
  try:
    values = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(KEY, f"{file}: cannot read JSON: {e}") from e
  if not isinstance(values, dict):
    raise ConfigError(KEY, f"{file}: expected a JSON object")
  return values


def _absolute(path: epath.Path) -> str:
  return str(path) if storage.is_url(path) else str(pathlib.Path(path).resolve())
