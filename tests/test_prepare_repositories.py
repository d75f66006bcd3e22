"""Repository-level documents (Component.group_repositories), as DeepSeek-Coder built its code corpus: a
repository's files are filtered one by one, then joined in path order, each after a comment naming its path,
into one document that dedup sees whole. Both engines make the same documents."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import code_file, lightly_edited, prepare_cli, read_documents, run
from test_prepare import tokenizer_json  # noqa: F401 (a fixture)

from pretrain import schema
from pretrain.data import sources
from pretrain.data.mixture import Mixture
from pretrain.schema import ConfigError

MINIFIED = "var a=" + "1," * 800 + "2;\n"  # one 1,607-character line: the avg_line_length rule drops it


def write_repositories(src: pathlib.Path) -> dict[str, str]:
  files = {"alpha/setup.py": code_file(1), "alpha/pkg/core.py": code_file(2), "alpha/pkg/util.c": code_file(3),
           "alpha/bundle.min.js": MINIFIED,
           # alpha again with one file lightly edited: a near duplicate of alpha as a whole
           "beta/setup.py": lightly_edited(code_file(1)), "beta/pkg/core.py": code_file(2),
           "beta/pkg/util.c": code_file(3),
           "gamma/main.py": code_file(4), "gamma/README.md": "# Gamma\n\nA tool that does one thing well.\n",
           "loose.py": code_file(5)}
  for name, text in files.items():
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text(text)
  return files


def code_mixture(root: pathlib.Path, *inputs: str, group: bool = True, **component) -> Mixture:
  return schema.parse(Mixture, {"name": "repos", "root": str(root), "components": [
      {"name": "code", "domain": "code", "weight": 1.0, "inputs": list(inputs), "group_repositories": group,
       **component}]})


def texts(out: pathlib.Path) -> list[tuple[str, str, str]]:
  return [(d.source, d.language, bytes(d.tokens.astype("uint8")).decode()) for d in read_documents(out, "code")]


@pytest.fixture
def source_tree(tmp_path) -> tuple[pathlib.Path, dict[str, str]]:
  return tmp_path / "in", write_repositories(tmp_path / "in" / "src")


def test_a_source_tree_gives_one_document_per_repository_its_files_filtered_and_in_path_order(source_tree, tmp_path):
  root, files = source_tree
  manifest = run(root, tmp_path / "out", mixture=code_mixture(root, "src"))
  src = root / "src"
  alpha = ("# pkg/core.py\n" + files["alpha/pkg/core.py"] + "// pkg/util.c\n" + files["alpha/pkg/util.c"]
           + "# setup.py\n" + files["alpha/setup.py"])
  gamma = "<!-- README.md -->\n" + files["gamma/README.md"] + "# main.py\n" + files["gamma/main.py"]
  # Files directly in the input directory stay documents of their own; the near-duplicate repository goes.
  assert texts(tmp_path / "out") == [(str(src / "loose.py"), "python", files["loose.py"]),
                                     (str(src / "alpha"), "python", alpha), (str(src / "gamma"), "python", gamma)]
  code = manifest["components"]["code"]
  assert code["dropped"]["near_duplicate"] == 1 and code["dropped"]["avg_line_length"] == 1
  # A file a filter drops counts as a document read, in its language; a repository as one, in its main language.
  assert code["by_language"]["javascript"]["documents_read"] == 1
  assert code["by_language"]["python"]["documents_read"] == 4
  assert code["documents_read"] == 5 and code["documents_written"] == 3


def test_grouping_is_part_of_the_plan(source_tree, tmp_path):
  root, _ = source_tree
  run(root, tmp_path / "out", mixture=code_mixture(root, "src"))
  with pytest.raises(FileExistsError, match="prepared from different inputs, components"):
    run(root, tmp_path / "out", mixture=code_mixture(root, "src", group=False))
  manifest = run(root, tmp_path / "ungrouped", mixture=code_mixture(root, "src", group=False))
  # Every file alone: beta's files are duplicates of alpha's, one by one.
  assert manifest["components"]["code"]["documents_written"] == 6


ROWS = [{"repository": "r1", "path": "b.py", "text": code_file(11)},
        {"repository": "r2", "path": "x.py", "text": code_file(12)},
        {"text": code_file(13)},  # no repository: a document of its own
        {"repository": "r1", "path": "a.py", "text": code_file(14)}]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_rows_are_grouped_by_their_repository_field_in_path_order(tmp_path, kind):
  root = tmp_path / "in"
  root.mkdir()
  rows = [{("repo" if k == "repository" else k): v for k, v in row.items()} for row in ROWS]
  if kind == "jsonl":
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  else:
    columns = ("repo", "path", "text")
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), root / "rows.parquet")
  mixture = code_mixture(root, f"rows.{kind}", language="python", repository_field="repo")
  run(root, tmp_path / "out", mixture=mixture)
  where = str(root / f"rows.{kind}")
  third = f"{where}:3" if kind == "jsonl" else f"{where}#2"
  assert texts(tmp_path / "out") == [
      (f"{where}[r1]", "python", f"# a.py\n{ROWS[3]['text']}# b.py\n{ROWS[0]['text']}"),
      (f"{where}[r2]", "python", f"# x.py\n{ROWS[1]['text']}"),
      (third, "python", ROWS[2]["text"])]


def test_the_beam_engine_makes_the_same_repository_documents(source_tree, tmp_path):
  pytest.importorskip("apache_beam")
  root, _ = source_tree
  mixture = code_mixture(root, "src")
  local = run(root, tmp_path / "local", mixture=mixture)
  beam = run(root, tmp_path / "beam", mixture=mixture, engine="beam",
             beam_options=("--direct_num_workers=2", "--direct_running_mode=multi_threading"))
  assert beam == local
  tree = {str(p.relative_to(tmp_path / "local")): p.read_bytes() for p in (tmp_path / "local").rglob("*")
          if p.is_file()}
  assert {name: (tmp_path / "beam" / name).read_bytes() for name in tree} == tree


def test_the_cli_groups_repositories(source_tree, tmp_path, tokenizer_json):  # noqa: F811
  root, _ = source_tree
  assert prepare_cli(tokenizer_json, tmp_path / "out", "--input", str(root / "src"), "--group-repositories") == 0
  sources_kept = [d.source for d in read_documents(tmp_path / "out", "code")]
  assert sources_kept == [str(root / "src" / name) for name in ("loose.py", "alpha", "gamma")]


def test_a_component_that_groups_needs_its_fields(tmp_path):
  with pytest.raises(ConfigError, match=r"components\[0\]\.repository_field"):
    code_mixture(tmp_path, "src", repository_field="")


def test_path_comments_follow_the_language():
  assert [sources.path_comment(language, "a/b") for language in ("python", "rust", "html", "sql", "css", "ocaml",
                                                                 "nonesuch")] == [
      "# a/b", "// a/b", "<!-- a/b -->", "-- a/b", "/* a/b */", "(* a/b *)", "# a/b"]
