"""Token counts on the command line and in reports: `4096` or `4k` (k = 1024), as long-context papers write them."""

from __future__ import annotations

from pretrain.schema import ConfigError


def parse_token_counts(text: str, flag: str) -> list[int]:
  """'1k, 4096' -> [1024, 4096], in the order given; anything but positive counts is an error naming `flag`."""
  counts = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    number, scale = (item[:-1], 1024) if item[-1] in "kK" else (item, 1)
    if not number.isdigit() or int(number) == 0:
      raise ConfigError(flag, f"{item!r} is not a positive token count (e.g. 4096 or 4k)")
    counts.append(int(number) * scale)
  return counts


def token_label(tokens: int) -> str:
  """4096 -> '4K', 300 -> '300'."""
  return f"{tokens // 1024}K" if tokens and tokens % 1024 == 0 else str(tokens)
