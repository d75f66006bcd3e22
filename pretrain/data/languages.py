"""A source file's language, from its extension or its name (Makefile, Dockerfile, ...)."""

from __future__ import annotations

import os

LANGUAGE_BY_EXTENSION = {
    ".py": "python", ".pyi": "python", ".pyx": "cython", ".pxd": "cython",
    ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
    ".cu": "cuda", ".cuh": "cuda", ".m": "objective-c", ".mm": "objective-cpp",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".java": "java", ".kt": "kotlin", ".scala": "scala",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "csharp", ".swift": "swift",
    ".lua": "lua", ".pl": "perl", ".pm": "perl", ".r": "r", ".R": "r", ".jl": "julia", ".hs": "haskell",
    ".ml": "ocaml", ".ex": "elixir", ".erl": "erlang", ".clj": "clojure", ".dart": "dart", ".f90": "fortran",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".ps1": "powershell", ".bat": "batchfile",
    ".html": "html", ".htm": "html", ".css": "css", ".scss": "scss", ".vue": "vue",
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini",
    ".xml": "xml", ".xsl": "xslt", ".xslt": "xslt", ".svg": "xml",
    ".md": "markdown", ".rst": "restructuredtext", ".txt": "text", ".tex": "tex",
    ".sql": "sql", ".proto": "protobuf", ".cmake": "cmake", ".asm": "assembly", ".s": "assembly",
}
LANGUAGE_BY_NAME = {
    "Makefile": "make", "makefile": "make", "GNUmakefile": "make", "Dockerfile": "dockerfile",
    "CMakeLists.txt": "cmake", "Rakefile": "ruby", "Gemfile": "ruby", "BUILD": "starlark",
    "BUILD.bazel": "starlark", "WORKSPACE": "starlark",
}


def language_of(path: str) -> str | None:
  name = os.path.basename(path)
  return LANGUAGE_BY_NAME.get(name) or LANGUAGE_BY_EXTENSION.get(os.path.splitext(name)[1])

# How a repository-level document names each file before its text: a comment in the file's own language.
_COMMENT = {
    **dict.fromkeys(("c", "cpp", "cuda", "objective-c", "objective-cpp", "javascript", "typescript", "java", "kotlin",
                     "scala", "go", "rust", "php", "csharp", "swift", "dart", "scss", "vue", "protobuf", "json"),
                    "// {}"),
    **dict.fromkeys(("lua", "haskell", "sql"), "-- {}"),
    **dict.fromkeys(("html", "xml", "xslt", "markdown"), "<!-- {} -->"),
    **dict.fromkeys(("erlang", "tex"), "% {}"),
    "css": "/* {} */", "ocaml": "(* {} *)", "clojure": ";; {}", "fortran": "! {}", "assembly": "; {}",
    "batchfile": "REM {}",
}


def path_comment(language: str, path: str) -> str:
  """A comment naming `path` in `language` ('// a/b.c', '<!-- a/b.html -->'); '# a/b' for Python, shells,
  configuration files and any language not listed."""
  return _COMMENT.get(language, "# {}").format(path)
