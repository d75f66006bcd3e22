"""DeepSeek-Coder-V2's corpus mixture: code 60%, math 10%, natural language 30%; FIM on half the documents (PSM).

  pretrain prepare \
    --mixture='data_mixtures/deepseek_coder_v2.py:code=/data/code,math=/data/math/*.parquet,text=/data/text/*.jsonl.gz'

You supply the data: each of code, math and text is a directory of source files, a .jsonl,
.jsonl.gz or .parquet file, or a glob of them (the text is in the field/column `text`;
relative paths are relative to the current directory). All three are required: a missing
one is an error, never an empty component. Prepare applies the paper's code filters to the
code component and near-deduplicates every component.
"""

import os

from pretrain.config import parse_arg
from pretrain.schema import ConfigError

WEIGHTS = {"code": 0.6, "math": 0.1, "text": 0.3}


def get_mixture(arg=None):
  paths = parse_arg(arg, code="", math="", text="")
  missing = [name for name in WEIGHTS if not paths[name]]
  if missing:
    raise ConfigError("mixture deepseek_coder_v2", f"give the path of your {', '.join(missing)} data: "
                      "data_mixtures/deepseek_coder_v2.py:code=DIR_OR_GLOB,math=DIR_OR_GLOB,text=DIR_OR_GLOB")
  return {
      "name": "deepseek_coder_v2",
      "components": [
          {"name": name, "domain": name, "weight": weight, "fim_rate": 0.5, "fim_spm_rate": 0.0,
           "inputs": [os.path.abspath(os.path.expanduser(paths[name]))]}
          for name, weight in WEIGHTS.items()
      ],
  }
