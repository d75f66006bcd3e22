"""Data mixtures: named components, each a domain with raw inputs, a weight and its FIM rates.

A mixture file in `data_mixtures/` is a small Python file with `get_mixture(arg=None)`
returning a dict (or ConfigDict) of this schema. `pretrain prepare` turns each
component's raw `inputs` into tokenized shards under `<prepared_dir>/<name>/`; the
training pipeline reads those and mixes the components by `weight`, which a training
stage may override.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Literal

from pretrain import schema, storage
from pretrain.config import call_file_function
from pretrain.schema import ConfigError

Domain = Literal["code", "math", "text"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Component:
  name: str
  domain: Domain
  weight: float
  # Raw inputs for `pretrain prepare`: directories of source files, or files / globs of .jsonl, .jsonl.gz,
  # .parquet; local paths or gs:// / s3:// URLs. Relative paths are relative to the mixture file.
  inputs: tuple[str, ...] = ()
  text_field: str = "text"  # JSONL key / Parquet column holding the document
  language: str = ""  # for JSONL/Parquet inputs; source files get theirs from extension and name
  fim_rate: float = 0.0  # fraction of documents turned into fill-in-the-middle examples
  fim_spm_rate: float = 0.0  # of those, the fraction in SPM order instead of PSM
  min_length: int = 0  # documents with fewer tokens are skipped (a long-context stage upsamples long ones)
  # Repository-level documents, as DeepSeek-Coder made them: a repository's files, filtered one by one, then
  # concatenated in path order (each after a comment naming its path) into one document, deduplicated as a
  # whole. A source tree's repositories are the directories directly under an input directory; JSONL and
  # Parquet rows are grouped by `repository_field` within one file, ordered by `path_field`.
  group_repositories: bool = False
  repository_field: str = "repository"
  path_field: str = "path"

  def validate(self, key: str) -> None:
    if not self.name or "/" in self.name:
      raise ConfigError(f"{key}.name", f"must be a non-empty name without '/', got {self.name!r}")
    if not (math.isfinite(self.weight) and self.weight >= 0):
      raise ConfigError(f"{key}.weight", f"must be a finite number >= 0, got {self.weight}")
    for name in ("fim_rate", "fim_spm_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f"{key}.{name}", f"must be within [0, 1], got {getattr(self, name)}")
    if self.min_length < 0:
      raise ConfigError(f"{key}.min_length", f"must be >= 0, got {self.min_length}")
    if self.group_repositories and not (self.repository_field and self.path_field):
      raise ConfigError(f"{key}.repository_field", "grouping repositories needs a repository_field and a path_field")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuiltinCorpus:
  """Inputs made from files every Python install has (data/builtin_corpus.py), written into `dir` the
  first time they are read (`sources.plan_units`), never when the mixture file is."""

  dir: str
  seed: int = 0
  max_code_files: int | None = None  # None: every file the corpus's byte budgets allow


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixture:
  name: str
  components: tuple[Component, ...]
  root: str = ""  # the directory relative inputs are resolved against (set by `load`)
  builtin_corpus: BuiltinCorpus | None = None  # where the inputs come from, when they are the built-in corpus

  def validate(self, key: str) -> None:
    if not self.components:
      raise ConfigError(f"{key}.components", "a mixture needs at least one component")
    names = [c.name for c in self.components]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
      raise ConfigError(f"{key}.components", f"component name {duplicate!r} appears twice")
    if sum(c.weight for c in self.components) <= 0:
      raise ConfigError(f"{key}.components", "all weights are zero; at least one must be positive")

  @classmethod
  def from_inputs(cls, inputs, *, domain: str, key: str = "--input", **settings) -> Mixture:
    """A one-component mixture of bare inputs (paths relative to the current directory); `settings` are other
    Component fields (text_field, language, group_repositories, ...)."""
    component = {"name": domain, "domain": domain, "weight": 1.0, "inputs": [str(p) for p in inputs], **settings}
    return schema.parse(cls, {"name": "inputs", "components": [component], "root": "."}, key)

  def component(self, name: str) -> Component:
    for c in self.components:
      if c.name == name:
        return c
    raise ConfigError(f"mixture {self.name!r}", f"no component {name!r}; components: {', '.join(self.names)}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.components)

  def input_paths(self, component: Component) -> list[str]:
    """The component's inputs, local ones resolved against `root`; gs:// and s3:// URLs as given."""
    return [p if storage.is_url(p) else str(pathlib.Path(self.root, p)) for p in component.inputs]

  def with_overrides(self, weights: Mapping[str, float] | None = None, min_length: int | None = None) -> Mixture:
    """This mixture with a training stage's weights (by component name) and minimum document length."""
    weights = dict(weights or {})
    for name in weights:
      self.component(name)  # an unknown name is an error, not a silent no-op
    components = tuple(
        dataclasses.replace(c, weight=float(weights.get(c.name, c.weight)),
                            min_length=c.min_length if min_length is None else min_length)
        for c in self.components)
    return schema.parse(Mixture, schema.to_dict(dataclasses.replace(self, components=components)), "mixture")

  def probabilities(self) -> dict[str, float]:
    total = sum(c.weight for c in self.components)
    return {c.name: c.weight / total for c in self.components}


def load(spec: str) -> Mixture:
  """Runs `get_mixture(arg)` of the Python file in `FILE[:ARG]` and checks it against the schema."""
  values = call_file_function(spec, "get_mixture", "mixture")
  values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
  file = pathlib.Path(str(spec).partition(":")[0])
  values.setdefault("root", str(file.resolve().parent))
  return schema.parse(Mixture, values, f"mixture {file.name}")
