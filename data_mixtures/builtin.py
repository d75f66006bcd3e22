"""The built-in mixture: code 60%, math 10%, text 30% (FIM on half the documents, PSM), no download.

  pretrain prepare --mixture=data_mixtures/builtin.py
  pretrain prepare --mixture=data_mixtures/builtin.py:dir=/tmp/corpus,seed=1,max_code_files=200

Its raw corpus is made from files every Python install has (`pretrain.data.builtin_corpus`:
the standard library's sources and docstrings, site-packages sources, generated worked math
problems). `get_mixture` finds it in `dir`, by default `$PRETRAIN_CACHE/builtin_corpus/seed<N>`
(PRETRAIN_CACHE defaults to ~/.cache/pretrain; plus `-files<M>` with max_code_files), and writes it there on first use, in a few seconds:
into a temporary sibling directory renamed into place when complete, so a directory with a
`corpus.json` is always a whole corpus. Delete the directory to make it again.
"""

import json
import os
import pathlib
import shutil

from pretrain.config import parse_arg
from pretrain.data import builtin_corpus
from pretrain.schema import ConfigError

CACHE = pathlib.Path(os.environ.get("PRETRAIN_CACHE", "~/.cache/pretrain")).expanduser() / "builtin_corpus"


def get_mixture(arg=None):
  variant = parse_arg(arg, dir="", seed=0, max_code_files=0)
  max_code_files = variant.max_code_files or None
  default_name = f"seed{variant.seed}" + (f"-files{max_code_files}" if max_code_files else "")
  directory = pathlib.Path(variant.dir).expanduser().resolve() if variant.dir else CACHE / default_name
  inputs = _corpus_inputs(directory, variant.seed, max_code_files)

  def component(name, domain, weight, **kwargs):
    return dict(name=name, domain=domain, weight=weight, inputs=inputs[name], fim_rate=0.5, fim_spm_rate=0.0,
                **kwargs)

  return {
      "name": "builtin",
      "components": [
          component("code", "code", 0.6),  # languages from file extensions
          component("math", "math", 0.1, language="english"),
          component("text", "text", 0.3, language="english"),
      ],
  }


def _corpus_inputs(directory: pathlib.Path, seed: int, max_code_files: int | None) -> dict[str, list[str]]:
  """Component -> input paths of the corpus in `directory`, writing it first if it is not there."""
  manifest = directory / builtin_corpus.MANIFEST
  if not manifest.exists():
    if directory.exists() and any(directory.iterdir()):
      raise ConfigError("mixture builtin.dir", f"{directory} is not empty and holds no {manifest.name}; "
                        "remove it or choose another dir")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    builtin_corpus.write_builtin_corpus(tmp, max_code_files=max_code_files, seed=seed)
    try:
      if directory.exists():
        directory.rmdir()  # empty, checked above
      tmp.rename(directory)
    except OSError:  # another process made it first: use theirs
      shutil.rmtree(tmp, ignore_errors=True)
  written = json.loads(manifest.read_text())
  if (written["seed"], written["max_code_files"]) != (seed, max_code_files):
    raise ConfigError("mixture builtin.dir", f"{directory} holds the corpus of seed={written['seed']}, "
                      f"max_code_files={written['max_code_files']}, not seed={seed}, max_code_files={max_code_files}")
  return {name: [str(directory / path) for path in paths] for name, paths in written["relative_inputs"].items()}
