"""The built-in mixture: code 60%, math 10%, text 30% (FIM on half the documents, PSM), no download.

  pretrain prepare                                   # the default config's data section uses this file
  pretrain eval ppl --checkpoint=runs/default --mixture=data_mixtures/builtin.py:dir=/tmp/corpus,seed=1

Its raw corpus is made from files every Python install has (`pretrain.data.builtin_corpus`:
the standard library's sources and docstrings, site-packages sources, generated worked math
problems), in `dir`, by default `$PRETRAIN_CACHE/builtin_corpus/seed<N>` (PRETRAIN_CACHE defaults
to ~/.cache/pretrain; plus `-files<M>` with max_code_files). Reading this file writes nothing: the
corpus is written when its inputs are first read (`pretrain prepare`, tokenizer training, `eval`),
in a few seconds, into a temporary sibling directory renamed into place when complete, so a
directory with a `corpus.json` is always a whole corpus. Delete the directory to make it again.
"""

import pathlib

from pretrain.config import parse_arg
from pretrain.data import builtin_corpus
from pretrain.data.config import cache_dir


def get_mixture(arg=None):
  variant = parse_arg(arg, dir="", seed=0, max_code_files=0)
  max_code_files = variant.max_code_files or None
  default_name = f"seed{variant.seed}" + (f"-files{max_code_files}" if max_code_files else "")
  directory = pathlib.Path(variant.dir).expanduser().resolve() if variant.dir else cache_dir() / "builtin_corpus" / default_name
  inputs = builtin_corpus.inputs(directory)

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
      "builtin_corpus": {"dir": str(directory), "seed": variant.seed, "max_code_files": max_code_files},
  }
