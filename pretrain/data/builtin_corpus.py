"""A small code/math/text corpus made from files every Python install has, with no download.

  code  a sample of the Python standard library's .py files (no tests, no idlelib or
        turtledemo, no pydoc_data), and of the other source files under site-packages
        (.c/.h/.pyi/.toml/.json/.yaml/...), copied into `code/` as a source tree
  text  English prose: the docstrings of the standard library's modules, classes and
        functions (read with `ast`, nothing is imported), one document per module, and
        the `pydoc_data.topics` help topics; JSONL parts under `text/`
  math  generated worked problems (arithmetic, fractions, equations, percentages, word
        problems, ...), each with a step-by-step solution and a final answer; JSONL parts
        under `math/`

The same Python install and seed give the same corpus; sampling and the problems follow
`seed`. About 11 MB of text in all (the byte budgets below), written in a few seconds, so
a CPU run prepares it in about a minute.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import sys
import sysconfig
from fractions import Fraction

from pretrain.atomic_file import atomic_dir
from pretrain.data.languages import language_of
from pretrain.data.mixture import BuiltinCorpus
from pretrain.schema import ConfigError

STDLIB_BYTES = 6_000_000
SITE_PACKAGES_BYTES = 2_000_000
MATH_BYTES = 1_500_000
DOCS_PER_PART = 200  # JSONL documents per file: a file is the unit of parallel work in `prepare`
STDLIB_SKIPPED_DIRS = {"site-packages", "dist-packages", "idlelib", "turtledemo", "pydoc_data", "lib2to3",
                       "ensurepip", "__pycache__"}
SITE_PACKAGES_SUFFIXES = {".c", ".h", ".cc", ".cpp", ".hpp", ".cuh", ".pyi", ".pyx", ".pxd", ".js", ".toml",
                          ".json", ".yaml", ".yml", ".md", ".rst", ".html", ".css", ".cmake", ".sh", ".f90"}
MIN_DOCSTRING_CHARS = 80  # shorter ones are mostly "Return self." lines, not prose
MANIFEST = "corpus.json"
RELATIVE_INPUTS = {"code": ["code"], "math": ["math/*.jsonl"], "text": ["text/*.jsonl"]}  # per component


def write_builtin_corpus(out_dir, *, max_code_files: int | None = None, seed: int = 0) -> dict[str, list[str]]:
  """Writes the corpus under `out_dir`; returns component -> input paths (also in `corpus.json`, relative).

  Replaces `out_dir`'s code/, text/ and math/; `corpus.json` is written last.
  """
  out = pathlib.Path(out_dir)
  for name in ("code", "text", "math"):
    shutil.rmtree(out / name, ignore_errors=True)
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  site_packages = pathlib.Path(sysconfig.get_paths()["purelib"])
  stdlib_files = _stdlib_sources(stdlib)
  stdlib_cap = None if max_code_files is None else max_code_files - max_code_files // 5
  site_cap = None if max_code_files is None else max_code_files // 5
  stdlib_sample = _sample(stdlib, stdlib_files, STDLIB_BYTES, stdlib_cap, seed)
  site_sample = _sample(site_packages, _site_package_sources(site_packages), SITE_PACKAGES_BYTES, site_cap, seed)
  copied = _copy_sample(stdlib, stdlib_sample, out / "code" / "stdlib")
  copied += _copy_sample(site_packages, site_sample, out / "code" / "site-packages")
  text_docs = [d for f in stdlib_files if (d := _module_docstrings(stdlib, f))] + _help_topics()
  _write_parts(out / "text", "text", text_docs)
  _write_parts(out / "math", "math", math_documents(seed, MATH_BYTES))
  (out / MANIFEST).write_text(json.dumps({
      "python": sys.version.split()[0], "seed": seed, "max_code_files": max_code_files, "code_files": copied,
      "text_documents": len(text_docs), "relative_inputs": RELATIVE_INPUTS}, indent=2) + "\n")
  return inputs(out)


def inputs(directory) -> dict[str, list[str]]:
  """Component -> input paths of the corpus in `directory` (whether written yet or not)."""
  return {name: [str(pathlib.Path(directory) / path) for path in paths] for name, paths in RELATIVE_INPUTS.items()}


def ensure(corpus: BuiltinCorpus) -> None:
  """Writes the corpus into `corpus.dir` unless it is there: into a temporary sibling renamed into place
  when complete, so a directory with a manifest is always a whole corpus. Another seed or size there
  is an error, not a silent reuse."""
  directory = pathlib.Path(corpus.dir)
  manifest = directory / MANIFEST
  if not manifest.exists():
    if directory.exists() and any(directory.iterdir()):
      raise ConfigError("mixture builtin.dir", f"{directory} is not empty and holds no {manifest.name}; "
                        "remove it or choose another dir")
    try:
      with atomic_dir(directory) as tmp:
        write_builtin_corpus(tmp, max_code_files=corpus.max_code_files, seed=corpus.seed)
    except FileExistsError:  # another process made it first: use theirs
      pass
  written = json.loads(manifest.read_text())
  if (written["seed"], written["max_code_files"]) != (corpus.seed, corpus.max_code_files):
    raise ConfigError("mixture builtin.dir", f"{directory} holds the corpus of seed={written['seed']}, "
                      f"max_code_files={written['max_code_files']}, not seed={corpus.seed}, "
                      f"max_code_files={corpus.max_code_files}")


# Code.
def _stdlib_sources(stdlib: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for root, dirs, names in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIPPED_DIRS and not d.startswith(("test", ".")))
    files += [pathlib.Path(root, n) for n in sorted(names) if n.endswith(".py") and not n.startswith("test")]
  return files


def _site_package_sources(site_packages: pathlib.Path) -> list[pathlib.Path]:
  if not site_packages.is_dir():
    return []
  files = []
  for root, dirs, names in os.walk(site_packages):
    dirs[:] = sorted(d for d in dirs if not d.endswith(".dist-info") and d not in ("tests", "test", "__pycache__")
                     and not d.startswith("."))
    files += [pathlib.Path(root, n) for n in sorted(names)
              if os.path.splitext(n)[1] in SITE_PACKAGES_SUFFIXES and language_of(n)]
  return files


def _sample(root: pathlib.Path, files: list[pathlib.Path], budget: int, max_files: int | None,
            seed: int) -> list[pathlib.Path]:
  """A seeded sample that fits the byte budget, taking one file of each language in turn.

  Within a language the order is by a hash of seed and path; the turns keep a few languages
  with thousands of files (C headers) from crowding out the rest.
  """
  by_language: dict[str, list[pathlib.Path]] = {}
  for path in files:
    by_language.setdefault(language_of(path.name), []).append(path)
  def order(path):
    return hashlib.sha256(f"{seed}:{path.relative_to(root)}".encode()).digest()

  queues = [collections.deque(sorted(group, key=order)) for _, group in sorted(by_language.items())]
  chosen, total = [], 0
  while any(queues) and (max_files is None or len(chosen) < max_files):
    for queue in queues:
      while queue:
        path = queue.popleft()
        size = path.stat().st_size
        if size <= budget // 20 and total + size <= budget:  # no single file takes a large part of the sample
          chosen.append(path)
          total += size
          break
      if max_files is not None and len(chosen) >= max_files:
        break
  return sorted(chosen)


def _copy_sample(root: pathlib.Path, files: list[pathlib.Path], dest: pathlib.Path) -> int:
  for path in files:
    target = dest / path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
  return len(files)


# Text.
def _module_docstrings(stdlib: pathlib.Path, path: pathlib.Path) -> dict | None:
  """One document of a module's docstrings, each under the name it documents."""
  module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
  try:
    tree = ast.parse(path.read_bytes())
  except (SyntaxError, ValueError):
    return None
  sections = []

  def visit(node, prefix):
    doc = ast.get_docstring(node)
    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
      sections.append(f"{prefix}\n\n{doc.strip()}")
    for child in node.body:
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        visit(child, f"{module}.{child.name}" if prefix == module else f"{prefix}.{child.name}")

  visit(tree, module)
  if not sections:
    return None
  return {"text": "\n\n".join(sections) + "\n", "source": f"stdlib docstrings of {module}"}


def _help_topics() -> list[dict]:
  from pydoc_data import topics

  return [{"text": topics.topics[name], "source": f"pydoc_data.topics {name}"} for name in sorted(topics.topics)]


def _write_parts(directory: pathlib.Path, stem: str, docs: list[dict]) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  for start in range(0, len(docs), DOCS_PER_PART):
    with open(directory / f"{stem}-{start // DOCS_PER_PART:05d}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs[start:start + DOCS_PER_PART])


# Math: worked problems. Every generator returns (problem, solution steps, answer).
def _number(x: Fraction) -> str:
  """An exact number: an integer, a terminating decimal, or a fraction in lowest terms."""
  if x.denominator == 1:
    return str(x.numerator)
  denominator = x.denominator
  for p in (2, 5):
    while denominator % p == 0:
      denominator //= p
  if denominator == 1:
    return f"{float(x):.10f}".rstrip("0")
  return f"{x.numerator}/{x.denominator}"


def _add_subtract(rng: random.Random):
  a, b = rng.randint(100, 99999), rng.randint(100, 99999)
  if rng.random() < 0.5:
    return (f"Compute {a} + {b}.", [f"Add the numbers: {a} + {b} = {a + b}."], str(a + b))
  a, b = max(a, b), min(a, b)
  return (f"Compute {a} - {b}.", [f"Subtract: {a} - {b} = {a - b}.", f"Check: {a - b} + {b} = {a}."], str(a - b))


def _multiply(rng: random.Random):
  a, b = rng.randint(12, 999), rng.randint(12, 99)
  tens, ones = b - b % 10, b % 10
  return (f"Compute {a} * {b}.",
          [f"Split {b} into {tens} + {ones}.", f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.",
           f"Add the parts: {a * tens} + {a * ones} = {a * b}."], str(a * b))


def _divide(rng: random.Random):
  d, q = rng.randint(3, 29), rng.randint(10, 999)
  r = rng.randint(0, d - 1)
  n = d * q + r
  return (f"Divide {n} by {d}. Give the quotient and the remainder.",
          [f"{d} goes into {n} {q} times, since {d} * {q} = {d * q}.", f"The remainder is {n} - {d * q} = {r}.",
           f"Check: {d} * {q} + {r} = {n}."], f"{q} remainder {r}")


def _fractions(rng: random.Random):
  a, b, c, d = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
  op = rng.choice("+-")
  lcd = math.lcm(b, d)
  x, y = a * (lcd // b), c * (lcd // d)
  total = x + y if op == "+" else x - y
  result = Fraction(total, lcd)
  steps = [f"The least common denominator of {b} and {d} is {lcd}.",
           f"Rewrite: {a}/{b} = {x}/{lcd} and {c}/{d} = {y}/{lcd}.",
           (f"{'Add' if op == '+' else 'Subtract'} the numerators: {x} {op} {y} = {total}, "
            f"so the result is {total}/{lcd}.")]
  if result.denominator != lcd:
    steps.append(f"Simplify by dividing by {math.gcd(total, lcd)}: {total}/{lcd} = {result}.")
  return (f"Compute {a}/{b} {op} {c}/{d} and simplify.", steps, str(result))


def _linear_equation(rng: random.Random):
  a, x, b = rng.randint(2, 15), rng.randint(-20, 30), rng.randint(-50, 50)
  c = a * x + b
  sign, magnitude = ("+", b) if b >= 0 else ("-", -b)
  undo = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
  return (f"Solve for x: {a}x {sign} {magnitude} = {c}.",
          [f"{undo}: {a}x = {c - b}.", f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
           f"Check: {a} * {x} {sign} {magnitude} = {a * x} {sign} {magnitude} = {c}."], f"x = {x}")


def _percentage(rng: random.Random):
  p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75, 80, 120]), rng.randint(2, 400) * 4
  result = Fraction(p, 100) * n
  return (f"What is {p}% of {n}?",
          [f"{p}% means {p}/100.", f"{p}/100 * {n} = {p * n}/100 = {_number(result)}."], _number(result))


def _percent_change(rng: random.Random):
  old, p = rng.randint(1, 50) * 20, rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])  # whole-dollar changes
  change = old * p // 100
  up = rng.random() < 0.5
  new = old + change if up else old - change
  word = "increase" if up else "decrease"
  return (f"A price changes from {old} dollars to {new} dollars. What is the percent {word}?",
          [f"The change is |{new} - {old}| = {change}.",
           f"Divide by the original price: {change} / {old} = {_number(Fraction(change, old))}.",
           f"As a percent: {_number(Fraction(change, old))} * 100 = {p}%."], f"{p}%")


def _order_of_operations(rng: random.Random):
  a, b, c, d = (rng.randint(2, 12) for _ in range(4))
  expression = f"{a} + {b} * ({c} + {d})"
  return (f"Evaluate {expression}.",
          [f"Parentheses first: {c} + {d} = {c + d}.", f"Then multiply: {b} * {c + d} = {b * (c + d)}.",
           f"Then add: {a} + {b * (c + d)} = {a + b * (c + d)}."], str(a + b * (c + d)))


def _rectangle(rng: random.Random):
  w, h = rng.randint(2, 60), rng.randint(2, 60)
  return (f"A rectangle is {w} m wide and {h} m long. What are its area and its perimeter?",
          [f"Area = width * length = {w} * {h} = {w * h} square meters.",
           f"Perimeter = 2 * (width + length) = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} meters."],
          f"area {w * h} square meters, perimeter {2 * (w + h)} meters")


def _average(rng: random.Random):
  values = [rng.randint(40, 100) for _ in range(rng.randint(3, 6))]
  total = sum(values)
  mean = Fraction(total, len(values))
  return (f"Find the mean of {', '.join(map(str, values))}.",
          [f"Add them: {' + '.join(map(str, values))} = {total}.",
           f"Divide by the count, {len(values)}: {total} / {len(values)} = {_number(mean)}."], _number(mean))


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
_ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
          ("book", "books"), ("sandwich", "sandwiches"), ("candle", "candles"), ("ball", "balls")]


def _shopping(rng: random.Random):
  name = rng.choice(_NAMES)
  (_, many_a), (_, many_b) = rng.sample(_ITEMS, 2)
  n_a, n_b = rng.randint(2, 9), rng.randint(2, 9)
  p_a, p_b = Fraction(rng.randint(2, 40), 4), Fraction(rng.randint(2, 40), 4)  # quarters of a dollar
  paid = rng.choice([50, 100, 200])
  cost = n_a * p_a + n_b * p_b
  while paid < cost:
    paid *= 2
  def money(x):
    return f"${float(x):.2f}"

  return ((f"{name} buys {n_a} {many_a} at {money(p_a)} each and {n_b} {many_b} at {money(p_b)} each, and pays "
           f"with {money(paid)}. How much change does {name} get?"),
          [f"The {many_a} cost {n_a} * {money(p_a)} = {money(n_a * p_a)}.",
           f"The {many_b} cost {n_b} * {money(p_b)} = {money(n_b * p_b)}.",
           f"Together: {money(n_a * p_a)} + {money(n_b * p_b)} = {money(cost)}.",
           f"Change: {money(paid)} - {money(cost)} = {money(paid - cost)}."], money(paid - cost))


def _speed(rng: random.Random):
  speed, hours = rng.randint(30, 120), rng.randint(2, 9)
  name = rng.choice(_NAMES)
  return ((f"{name} drives {speed * hours} km in {hours} hours at a constant speed. How far does {name} get in "
           f"{hours + 2} hours at the same speed?"),
          [f"Speed = distance / time = {speed * hours} / {hours} = {speed} km per hour.",
           f"In {hours + 2} hours: {speed} * {hours + 2} = {speed * (hours + 2)} km."], f"{speed * (hours + 2)} km")


def _gcd_lcm(rng: random.Random):
  g = rng.randint(2, 12)
  a, b = g * rng.randint(2, 15), g * rng.randint(2, 15)
  gcd, lcm = math.gcd(a, b), math.lcm(a, b)
  return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
          [f"By the Euclidean algorithm, gcd({a}, {b}) = {gcd}.",
           f"lcm({a}, {b}) = {a} * {b} / gcd = {a * b} / {gcd} = {lcm}."], f"gcd {gcd}, lcm {lcm}")


PROBLEM_KINDS = (_add_subtract, _multiply, _divide, _fractions, _linear_equation, _percentage, _percent_change,
                 _order_of_operations, _rectangle, _average, _shopping, _speed, _gcd_lcm)


def math_problem(rng: random.Random) -> str:
  problem, steps, answer = rng.choice(PROBLEM_KINDS)(rng)
  return f"Problem: {problem}\nSolution:\n" + "\n".join(steps) + f"\nAnswer: {answer}\n"


def math_documents(seed: int, budget_bytes: int) -> list[dict]:
  """Worksheets of 3 to 8 problems each, until `budget_bytes` of text."""
  rng = random.Random(seed)
  docs, total = [], 0
  while total < budget_bytes:
    text = "\n".join(math_problem(rng) for _ in range(rng.randint(3, 8)))
    docs.append({"text": text, "source": f"generated math worksheet {len(docs)} (seed {seed})"})
    total += len(text)
  return docs
