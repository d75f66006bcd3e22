"""safetensors files, read by byte range and written one tensor at a time.

Layout: an 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape,
data_offsets: [begin, end]}}`, offsets relative to the end of the header, and an optional
`__metadata__`), then every tensor's raw row-major bytes. The `safetensors` package reads
whole tensors or numpy-style slices through a memory map; a sharded load needs less and
more: only the rows and columns a process's devices hold (strided ranges of a tensor), from
local disks or object stores, with the bytes read counted. So this module reads the header
itself and issues exact byte-range reads (`read_block`); on a URL, ranges closer than
`max_gap` bytes are merged into one request, since a request costs more than the gap.

The writer streams: the header is known from the shapes alone, then each tensor's bytes are
appended in order, so an export holds one tensor in memory, never a whole shard file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from pretrain import storage
from pretrain.convert.errors import ConversionError

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
URL_MAX_GAP = 8 * 2**20  # an object-store request costs about as much as reading this many more bytes


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset of the first element in the file

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsReader:
  """The tensors of one safetensors file, by name, and exact reads of their parts."""

  def __init__(self, path, max_gap: int | None = None):
    self.path = storage.as_path(path)
    self.name = str(path)
    self.bytes_read = 0
    self.max_gap = (URL_MAX_GAP if storage.is_url(path) else 0) if max_gap is None else max_gap
    try:
      self._file = self.path.open("rb")
    except FileNotFoundError as e:
      raise ConversionError(f"{self.name}: not found") from e
    except OSError as e:
      raise ConversionError(f"{self.name}: cannot open ({e})") from e
    self._fd = self._file.fileno() if not storage.is_url(path) else None
    try:
      self.tensors = self._read_header()
    except BaseException:
      self.close()
      raise
    self.bytes_read = 0  # counts tensor bytes only

  def _read_header(self) -> dict[str, TensorInfo]:
    size = self._size()
    if size < 8:
      raise ConversionError(f"{self.name}: cannot read as safetensors (truncated: {size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", self._read(0, 8))
    if 8 + header_len > size:
      raise ConversionError(f"{self.name}: cannot read as safetensors (truncated: the header claims {header_len} "
                            f"bytes, the file has {size})")
    try:
      header = json.loads(self._read(8, header_len))
    except ValueError as e:
      raise ConversionError(f"{self.name}: cannot read as safetensors (header is not JSON: {e})") from e
    if not isinstance(header, dict):
      raise ConversionError(f"{self.name}: cannot read as safetensors (header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
      try:
        dtype_name, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
      except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{self.name}: tensor {name!r} has a malformed header entry {entry!r}") from e
      if dtype_name not in DTYPES:
        raise ConversionError(f"tensor {name!r} in {self.name} has dtype {dtype_name}; supported: "
                              f"{', '.join(DTYPES)}")
      info = TensorInfo(name, DTYPES[dtype_name], shape, 8 + header_len + int(begin))
      if int(end) - int(begin) != info.nbytes:
        raise ConversionError(f"tensor {name!r} in {self.name}: {int(end) - int(begin)} bytes for shape "
                              f"{list(shape)} of {dtype_name}")
      if 8 + header_len + int(end) > size:
        raise ConversionError(f"{self.name}: cannot read as safetensors (truncated: tensor {name!r} ends at byte "
                              f"{8 + header_len + int(end)}, the file has {size})")
      tensors[name] = info
    return tensors

  def _size(self) -> int:
    if self._fd is not None:
      return os.fstat(self._fd).st_size
    return self._file.seek(0, os.SEEK_END)

  def _read(self, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    self._read_into(offset, memoryview(buffer))
    return bytes(buffer)

  def _read_into(self, offset: int, buffer: memoryview) -> None:
    done = 0
    while done < len(buffer):
      if self._fd is not None:
        n = os.preadv(self._fd, [buffer[done:]], offset + done)
      else:
        self._file.seek(offset + done)
        chunk = self._file.read(len(buffer) - done)
        n = len(chunk)
        buffer[done:done + n] = chunk
      if n <= 0:
        raise ConversionError(f"{self.name}: truncated: reading {len(buffer)} bytes at {offset} ended after {done}")
      done += n
    self.bytes_read += len(buffer)

  def read_block(self, info: TensorInfo, row_width: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """[r1 - r0, c1 - c0] elements of the tensor seen as row-major [size / row_width, row_width]."""
    (r0, r1), (c0, c1) = rows, cols
    out = np.empty((r1 - r0, c1 - c0), info.dtype)
    item = info.dtype.itemsize
    try:
      if c0 == 0 and c1 == row_width or r1 - r0 == 1:  # one contiguous range
        self._read_into(info.start + (r0 * row_width + c0) * item, _bytes(out))
      elif self.max_gap >= (row_width - (c1 - c0)) * item:  # rows merged into one request, the gaps dropped after
        span = np.empty(((r1 - r0) * row_width - c0 - (row_width - c1),), info.dtype)
        self._read_into(info.start + (r0 * row_width + c0) * item, _bytes(span))
        padded = np.concatenate([np.empty(c0, info.dtype), span, np.empty(row_width - c1, info.dtype)])
        out[...] = padded.reshape(r1 - r0, row_width)[:, c0:c1]
      else:
        for i in range(r1 - r0):
          self._read_into(info.start + ((r0 + i) * row_width + c0) * item, _bytes(out[i]))
    except ConversionError as e:
      raise ConversionError(f"tensor {info.name!r} cannot be read from {self.name} ({e})") from e
    except OSError as e:
      raise ConversionError(f"tensor {info.name!r} cannot be read from {self.name} ({e})") from e
    return out

  def read(self, name: str) -> np.ndarray:
    """A whole tensor, in its stored dtype."""
    info = self.tensors[name]
    flat = self.read_block(info, max(1, math.prod(info.shape)), (0, 1), (0, max(1, math.prod(info.shape))))
    return flat.reshape(info.shape)

  def close(self) -> None:
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _bytes(array: np.ndarray) -> memoryview:
  """A contiguous array's memory as bytes to read into (bfloat16 has no buffer format of its own)."""
  return memoryview(array.reshape(-1).view(np.uint8))


class SafetensorsWriter:
  """Writes a safetensors file whose tensors (names, dtypes, shapes, in order) are declared up front."""

  def __init__(self, path, tensors: Sequence[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None):
    header, offset = {}, 0
    if metadata:
      header["__metadata__"] = metadata
    self._expected = []
    for name, dtype, shape in tensors:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      self._expected.append((name, np.dtype(dtype), tuple(shape)))
      offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    self._file = storage.as_path(path).open("wb")
    self._file.write(struct.pack("<Q", len(encoded)) + encoded)
    self._next = 0

  def write(self, name: str, array: np.ndarray) -> None:
    want_name, want_dtype, want_shape = self._expected[self._next]
    if (name, array.dtype, tuple(array.shape)) != (want_name, want_dtype, want_shape):
      raise ValueError(f"expected tensor {want_name} {want_dtype}{list(want_shape)} next, got {name} "
                       f"{array.dtype}{list(array.shape)}")
    self._file.write(np.ascontiguousarray(array).tobytes())
    self._next += 1

  def close(self) -> None:
    self._file.close()
    if self._next != len(self._expected):
      raise ValueError(f"{len(self._expected) - self._next} declared tensors were never written")
