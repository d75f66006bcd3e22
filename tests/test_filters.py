"""The paper's code filters: every rule on both sides of its threshold."""

from __future__ import annotations

import pytest

from pretrain.data import filters
from pretrain.data.config import CodeFilters

RULES = CodeFilters()


def check(text: str, language: str = "python") -> str | None:
  return filters.check(text, language, RULES)


def lines(length: int, count: int = 10) -> str:
  return "\n".join("x" * length for _ in range(count))


def test_plain_code_is_kept():
  assert check("def add(a, b):\n  return a + b\n") is None


def test_avg_line_length():
  assert check(lines(100)) is None
  assert check(lines(101)) == "avg_line_length"


def test_max_line_length():
  short = "\n".join(["abc"] * 30)
  assert check(short + "\n" + "y" * 1000) is None
  assert check(short + "\n" + "y" * 1001) == "max_line_length"


def test_alpha_fraction():
  assert check("a" * 25 + "1" * 75) is None  # 25% letters
  assert check("a" * 24 + "1" * 76) == "alpha_fraction"
  assert check("é" * 25 + "1" * 75) is None  # letters are not only ASCII
  assert check("_" * 80 + "ab" * 10) == "alpha_fraction"  # underscores are not letters


@pytest.mark.parametrize("language", ["xml", "html", "python"])
def test_xml_header(language):
  body = "\n".join(["<item>some words here</item>"] * 20)
  header = '<?xml version="1.0"?>\n'
  assert check(header + body, language) == "xml_header"
  assert check(" " * 78 + header + body, language) == "xml_header"  # still inside the first 100 characters
  assert check("<!-- " + "x" * 95 + " -->\n" + header + body, "xml") is None  # after them


def test_xslt_is_exempt_from_xml_header():
  stylesheet = '<?xml version="1.0"?>\n<xsl:stylesheet version="1.0">\n<xsl:template match="/"/>\n</xsl:stylesheet>\n'
  assert check(stylesheet, "xslt") is None
  assert check(stylesheet, "xml") == "xml_header"


def page(paragraphs: int, empty_divs: int = 0, script_lines: int = 0) -> str:
  return "\n".join(["<html>", "<head>", "<style>body { color: red; }</style>", "<script>",
                    *["var message = 'code, not visible text';"] * script_lines, "</script>", "</head>", "<body>",
                    *["<p>Hello world, this is a page.</p>"] * paragraphs, *['<div class="empty"></div>'] * empty_divs,
                    "</body>", "</html>"])


def visible_fraction(text: str) -> float:
  return len(filters.visible_text(text)) / len(text)


def test_html_kept_with_enough_visible_text():
  assert check(page(paragraphs=10), "html") is None


def test_html_needs_100_visible_characters():
  paragraphs = next(n for n in range(1, 10) if len(filters.visible_text(page(n))) >= 100)
  assert visible_fraction(page(paragraphs - 1)) >= 0.2  # only the character count fails
  assert check(page(paragraphs - 1), "html") == "html_visible_text"
  assert check(page(paragraphs), "html") is None


def test_html_needs_20_percent_visible():
  divs = next(n for n in range(200) if visible_fraction(page(10, empty_divs=n)) < 0.2)
  assert len(filters.visible_text(page(10, empty_divs=divs))) >= 100  # only the fraction fails
  assert check(page(10, empty_divs=divs - 1), "html") is None
  assert check(page(10, empty_divs=divs), "html") == "html_visible_text"


def test_html_script_and_style_are_not_visible():
  text = filters.visible_text(page(1, script_lines=20))
  assert text == "Hello world, this is a page."
  assert check(page(4, script_lines=0), "html") is None
  assert check(page(4, script_lines=40), "html") == "html_visible_text"


def sized(n: int) -> str:
  """`n` characters in lines of 99."""
  return ("a" * 98 + "\n") * (n // 99) + "a" * (n % 99)


@pytest.mark.parametrize("language", ["json", "yaml"])
def test_json_yaml_size(language):
  assert check(sized(49), language) == "json_yaml_size"
  assert check(sized(50), language) is None
  assert check(sized(5000), language) is None
  assert check(sized(5001), language) == "json_yaml_size"
  assert check(sized(49), "python") is None  # only JSON and YAML have a size window


def test_first_failing_rule_is_named():
  assert check("1" * 1001) == "avg_line_length"  # also too long and not alphabetic
  assert filters.RULES == ("avg_line_length", "max_line_length", "alpha_fraction", "xml_header",
                           "html_visible_text", "json_yaml_size")


def test_thresholds_come_from_the_config():
  assert filters.check(lines(60), "python", CodeFilters(max_avg_line_length=50)) == "avg_line_length"
  assert filters.check("a" * 40, "json", CodeFilters(json_yaml_min_chars=10)) is None
