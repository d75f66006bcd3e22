"""The DeepSeek-Coder-V2 paper's filters for code documents, one named rule each.

`check` returns the name of the first rule a document fails (the name it is counted
under in the manifest), or None to keep it. Thresholds come from `CodeFilters`:
  avg_line_length    average line length > 100 characters
  max_line_length    a line longer than 1000 characters
  alpha_fraction     fewer than 25% alphabetic characters
  xml_header         `<?xml version=` within the first 100 characters, except XSLT
  html_visible_text  HTML whose visible text is < 20% of the file or < 100 characters
  json_yaml_size     JSON / YAML outside 50..5000 characters
"""

from __future__ import annotations

import html.parser
import re

from pretrain.data.config import CodeFilters

RULES = ("avg_line_length", "max_line_length", "alpha_fraction", "xml_header", "html_visible_text",
         "json_yaml_size")
_NOT_LETTERS = re.compile(r"[\W\d_]+")  # everything str.isalpha() rejects, removed in one C-level pass


def check(text: str, language: str, filters: CodeFilters) -> str | None:
  """The first rule `text` (a code document in `language`) fails, or None."""
  lengths = [len(line) for line in text.splitlines()] or [0]
  if sum(lengths) / len(lengths) > filters.max_avg_line_length:
    return "avg_line_length"
  if max(lengths) > filters.max_line_length:
    return "max_line_length"
  if len(_NOT_LETTERS.sub("", text)) < filters.min_alpha_fraction * len(text) or not text:
    return "alpha_fraction"
  if language != "xslt" and filters.xml_header in text[:filters.xml_header_window]:
    return "xml_header"
  if language == "html":
    visible = len(visible_text(text))
    if visible < filters.html_min_visible_chars or visible < filters.html_min_visible_fraction * len(text):
      return "html_visible_text"
  if language in ("json", "yaml") and not filters.json_yaml_min_chars <= len(text) <= filters.json_yaml_max_chars:
    return "json_yaml_size"
  return None


class _VisibleText(html.parser.HTMLParser):
  """Collects text outside tags; script and style contents are not visible."""

  HIDDEN = ("script", "style")

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._hidden_depth = 0

  def handle_starttag(self, tag, attrs):
    if tag in self.HIDDEN:
      self._hidden_depth += 1

  def handle_endtag(self, tag):
    if tag in self.HIDDEN and self._hidden_depth:
      self._hidden_depth -= 1

  def handle_data(self, data):
    if not self._hidden_depth:
      self.parts.append(data)


def visible_text(page: str) -> str:
  """The text a browser would show, whitespace runs collapsed to one space."""
  parser = _VisibleText()
  parser.feed(page)
  parser.close()
  return " ".join("".join(parser.parts).split())
