"""The package's modules import one another without cycles, lazy and type-only imports included.

A cycle hidden behind an import inside a function (or `if TYPE_CHECKING`) still couples the two
modules both ways; this test reads every `import` statement of `pretrain/` and looks for one.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pretrain"


def module_name(file: pathlib.Path) -> str:
  parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(file: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that `file` imports anywhere in it: `from a.b import c` is a.b.c when that
  is a module, else a.b."""
  found = set()
  for node in ast.walk(ast.parse(file.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        found.add(target if target in modules else node.module)
  return {name for name in found if name in modules} - {module_name(file)}


def test_no_import_cycles():
  files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
  graph = {name: imports(file, set(files)) for name, file in files.items()}
  # Package __init__ files re-export their modules; an edge into a package's own module from its
  # __init__ is the package's API, not a cycle of two concepts.
  graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
  cycles, state = [], {}

  def visit(name, path):
    state[name] = "open"
    for target in sorted(graph[name]):
      if state.get(target) == "open":
        cycles.append(path[path.index(target):] + [target])
      elif target not in state:
        visit(target, path + [target])
    state[name] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
