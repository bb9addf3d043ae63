"""The GGUF container: header, key/value metadata, tensor directory, and views of tensor bytes.

Why we parse the container ourselves: gguf-py's `GGUFReader` builds a numpy memmap slice for
every part of every field, so the ~98k tokenizer strings and merges of SmolLM2-135M alone cost
it 3-4 seconds before a single weight is read. Here the header is walked once with `struct` over one
`mmap`: strings in a plain loop, numeric arrays in one `np.frombuffer` call each. Tensor bytes stay
in the map; gguf-py still defines the tensor types and dequantizes them.

Layout (little-endian, or big-endian when the version word says so):
    "GGUF", u32 version (2 or 3), u64 tensor_count, u64 kv_count,
    kv_count x (string key, u32 value type, value),
    tensor_count x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset),
    padding up to `general.alignment` (default 32), then the tensor data (offsets count from here).
    string = u64 byte length + UTF-8 bytes; array = u32 item type + u64 count + items.

Values come back exactly as `GGUFReader.fields[key].contents()` gives them: Python scalars,
`str`, and flat lists (nested arrays are flattened, as gguf-py does; where inner arrays differ in
item type, gguf-py misreads all of them as the first one's type, we decode each as stored).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from minicpm.errors import CheckpointError

__all__ = ["GGUFFile", "GGUFTensorInfo"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_NESTING = 8  # arrays of arrays deeper than this are refused rather than recursed into

# Fixed-size value types: struct code (also a numpy type code with the byte order prefixed).
_SCALAR_CODES = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}
# Tensor types numpy can hold element by element; the rest are viewed as rows of raw bytes.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2",
    GGMLQuantizationType.F64: "f8", GGMLQuantizationType.I8: "i1",
    GGMLQuantizationType.I16: "i2", GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


class GGUFFormatError(ValueError):
    """What is wrong with the bytes; `GGUFFile` reports it as a CheckpointError naming the file."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor directory."""
    name: str
    dims: tuple[int, ...]  # as GGUF stores them: innermost (the row length) first
    tensor_type: GGMLQuantizationType
    offset: int  # absolute position of the first data byte in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The element shape in numpy/torch order (outermost first)."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class GGUFFile:
    """A GGUF file opened read-only: `metadata` (key -> value), `value_types` (key -> stored
    GGUFValueType), `tensors` (the directory, in file order) and `tensor_data(info)`.

    The file is memory-mapped once; tensor data is handed out as numpy views of that map
    (read-only, no copy), shaped like `GGUFReader`'s `ReaderTensor.data`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._map = _map_file(self.path)
        self._fd = None  # read_rows' descriptor, opened on first use
        try:
            self._parse()
        except GGUFFormatError as e:
            raise CheckpointError(f"{self.path}: not a valid GGUF file (truncated or corrupt?): "
                                  f"{e}") from None

    def _parse(self) -> None:
        cursor, self.version, tensor_count, kv_count = _read_header(self._map)
        self.byte_order = cursor.order  # "<" or ">", as a struct/numpy prefix
        self.metadata, self.value_types = _read_metadata(cursor, kv_count)
        # An entry is at least a name length, n_dims, type and offset: 8 + 4 + 4 + 8 bytes.
        infos = [_read_tensor_info(cursor)
                 for _ in range(_checked_count(cursor, tensor_count, 24, "tensor_count"))]
        self.alignment = _alignment(self.metadata, self.value_types.get("general.alignment"))
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors = _place_tensors(infos, self.data_offset, len(self._map))

    def release(self, info: GGUFTensorInfo, first: int = 0, size: int | None = None) -> None:
        """Drop the pages of one tensor's bytes (or of `size` bytes from byte `first` of them)
        from this process once they were copied: a mapped file's pages count in its resident size
        for as long as they are mapped (SmolLM2 loaded as stored kept all 98 MB of its file
        resident beside the repacked copy). A later read of the range (a view still held) faults
        the pages in again from the page cache: nothing is lost."""
        page = mmap.PAGESIZE
        size = info.n_bytes - first if size is None else size
        start = (info.offset + first) // page * page
        end = min(len(self._map), -(-(info.offset + first + size) // page) * page)
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read_rows(self, info: GGUFTensorInfo, rows) -> np.ndarray:
        """Copies of some rows of a 2-D tensor's stored bytes ([len(rows), row_bytes] as
        tensor_data shapes them), read with pread: no page of the file is mapped. A lookup through
        the map faulted in whole page-cache folios around each row (MiniCPM-2B's embedding: ~90 MB
        resident for 128 rows until released)."""
        like = self.tensor_data(info)[:1]  # the row's dtype and shape, from the map's header alone
        row_bytes = like.nbytes
        out = np.empty((len(rows),) + like.shape[1:], like.dtype)
        raw = out.reshape(len(rows), -1).view(np.uint8)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        for i, row in enumerate(rows):
            if not 0 <= row < info.shape[0]:
                raise IndexError(f"row {row} of {info.name} (it has {info.shape[0]})")
            got = os.pread(self._fd, row_bytes, info.offset + int(row) * row_bytes)
            if len(got) != row_bytes:
                raise CheckpointError(f"{self.path}: {info.name} row {row} is truncated")
            raw[i] = np.frombuffer(got, np.uint8)
        return out

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes of one tensor as a read-only view: elements for F32/F16/F64/I*,
        rows of raw bytes ([..., row_bytes] uint8) for block types and BF16."""
        element = _ELEMENT_DTYPES.get(info.tensor_type)
        if element is not None:
            flat = np.frombuffer(self._map, np.dtype(self.byte_order + element),
                                 info.n_elements, info.offset)
            return flat.reshape(info.shape)
        flat = np.frombuffer(self._map, np.uint8, info.n_bytes, info.offset)
        block, type_size = GGML_QUANT_SIZES[info.tensor_type]
        return flat.reshape(*info.shape[:-1], info.dims[0] // block * type_size)


def _map_file(path: Path) -> mmap.mmap:
    """The whole file, mapped read-only (an empty file cannot be mapped: it is no GGUF either)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise CheckpointError(f"{path}: not a GGUF file ({size} bytes, shorter than the "
                                      "24-byte header)")
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the GGUF file: {e}") from None


# ------------------------------------------------------------------------------------------------
# A cursor over the mapped bytes
# ------------------------------------------------------------------------------------------------
class _Cursor:
    """Reads GGUF values from `buf` at `pos` onwards, checking each against the end of the file."""

    def __init__(self, buf: mmap.mmap, pos: int, order: str):
        self.buf, self.pos, self.order, self.end = buf, pos, order, len(buf)
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")
        self.scalars = {t: struct.Struct(order + code) for t, code in _SCALAR_CODES.items()}

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise GGUFFormatError(f"{what} needs {n} bytes at offset {self.pos}, but the file "
                                  f"ends at {self.end}")

    def unpack(self, fmt: struct.Struct, what: str) -> Any:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def raw_string(self, what: str) -> bytes:
        n = self.unpack(self.u64, what)
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def string(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{what} is not UTF-8: {e}") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack(self.u32, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        """One value of a known type: a Python scalar, a str, or a flat list for arrays."""
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth=0)
        return self.unpack(self.scalars[vtype], what)

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= _MAX_NESTING:
            raise GGUFFormatError(f"{what}: arrays nested more than {_MAX_NESTING} deep")
        item_type = self.value_type(what)
        count = self.unpack(self.u64, what)
        if item_type == GGUFValueType.STRING:
            return self.strings(_checked_count(self, count, 8, what), what)
        if item_type == GGUFValueType.ARRAY:
            out: list[Any] = []  # flattened, as GGUFReader.contents() returns nested arrays
            for _ in range(_checked_count(self, count, 12, what)):
                out.extend(self.array(what, depth + 1))
            return out
        return self.numbers(item_type, count, what)

    def numbers(self, item_type: GGUFValueType, count: int, what: str) -> list[Any]:
        """A numeric/bool array in one numpy call (element-wise parsing makes gguf-py slow)."""
        dtype = np.dtype(self.order + _SCALAR_CODES[item_type])
        self.need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += count * dtype.itemsize
        return values.tolist()

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a tight loop over locals (the hot path: tokenizer vocabularies)."""
        buf, pos, end, unpack = self.buf, self.pos, self.end, self.u64.unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise GGUFFormatError(f"{what}: string {len(out)} runs past the end of the "
                                          "file")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    raise GGUFFormatError(f"{what}: string {len(out)} of {n} bytes runs past "
                                          "the end of the file")
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{what}: string {len(out)} is not UTF-8: {e}") from None
        self.pos = pos
        return out


def _checked_count(cursor: _Cursor, count: int, min_size: int, what: str) -> int:
    """Refuse a count whose items cannot fit in the rest of the file (a corrupt count would
    otherwise loop for a long time before running off the end)."""
    if count * min_size > cursor.end - cursor.pos:
        raise GGUFFormatError(f"{what} is {count}, but that many items need at least "
                              f"{count * min_size} bytes and only {cursor.end - cursor.pos} remain")
    return count


# ------------------------------------------------------------------------------------------------
# Header, metadata, tensor directory
# ------------------------------------------------------------------------------------------------
def _read_header(buf: mmap.mmap) -> tuple[_Cursor, int, int, int]:
    """(cursor after the header, version, tensor_count, kv_count)."""
    if buf[:4] != MAGIC:
        raise GGUFFormatError(f"bad magic {buf[:4]!r} (a GGUF file starts with {MAGIC!r})")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written on a big-endian machine: the version word is swapped
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in VERSIONS:
        raise GGUFFormatError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count, kv_count = struct.unpack_from(order + "QQ", buf, 8)
    return _Cursor(buf, 24, order), version, tensor_count, kv_count


def _read_metadata(cursor: _Cursor, kv_count: int
                   ) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    """(key -> value, key -> stored value type), in file order."""
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    # A pair is at least an 8-byte key length, a 4-byte type and a 1-byte value.
    for index in range(_checked_count(cursor, kv_count, 13, "kv_count")):
        key = cursor.string(f"key {index}")
        if key in metadata:
            raise GGUFFormatError(f"duplicate key {key!r}")
        vtype = cursor.value_type(f"key {key!r}")
        metadata[key] = cursor.value(vtype, f"key {key!r}")
        types[key] = vtype
    return metadata, types


def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    """(name, dims, type, offset relative to the data section) of the next directory entry."""
    name = cursor.string("tensor name")
    what = f"tensor {name}"
    n_dims = cursor.unpack(cursor.u32, what)
    cursor.need(8 * n_dims, what)
    dims = struct.unpack_from(f"{cursor.order}{n_dims}Q", cursor.buf, cursor.pos)
    cursor.pos += 8 * n_dims
    raw_type = cursor.unpack(cursor.u32, what)
    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFFormatError(f"{what} has unknown type {raw_type}") from None
    return name, dims, tensor_type, cursor.unpack(cursor.u64, what)


def _alignment(metadata: dict[str, Any], vtype: GGUFValueType | None) -> int:
    """`general.alignment` (a uint32 power of two) or the default 32."""
    if vtype is None:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if vtype != GGUFValueType.UINT32:
        raise GGUFFormatError(f"general.alignment has type {vtype.name}, not UINT32")
    if value <= 0 or value & (value - 1):
        raise GGUFFormatError(f"general.alignment {value} is not a power of two")
    return value


def _place_tensors(infos, data_offset: int, file_size: int) -> list[GGUFTensorInfo]:
    """Directory entries with absolute offsets and sizes, each checked to lie inside the file."""
    tensors, seen = [], set()
    for name, dims, tensor_type, relative in infos:
        if name in seen:
            raise GGUFFormatError(f"duplicate tensor {name}")
        seen.add(name)
        if tensor_type not in GGML_QUANT_SIZES:
            raise GGUFFormatError(f"tensor {name} has type {tensor_type.name} of unknown size")
        block, type_size = GGML_QUANT_SIZES[tensor_type]
        if tensor_type not in _ELEMENT_DTYPES and (not dims or dims[0] % block):
            # Block types are viewed as rows of whole blocks.
            row = dims[0] if dims else "(none)"
            raise GGUFFormatError(f"tensor {name}: row length {row} is not a multiple of the "
                                  f"{tensor_type.name} block size {block}")
        n_bytes = math.prod(dims) * type_size // block
        start = data_offset + relative
        if start + n_bytes > file_size:
            raise GGUFFormatError(f"tensor {name}: data at bytes {start}..{start + n_bytes} runs "
                                  f"past the end of the file ({file_size} bytes)")
        tensors.append(GGUFTensorInfo(name, tuple(dims), tensor_type, start, n_bytes))
    return tensors
