"""The one error type of the conversion package."""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the tensor, file or key."""
