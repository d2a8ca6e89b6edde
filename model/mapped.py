"""A safetensors checkpoint mapped into memory once, and the kernel advice the offload runtime
gives about it.

Every ``*.safetensors`` file of a model directory is opened and mmapped once, for the life of
the model. A tensor is a zero-copy view of the mapping (``torch.frombuffer``): computing from it
reads the page cache directly. The reader thread tells the kernel what comes next
(``posix_fadvise``/``madvise`` WILLNEED, then ``MADV_POPULATE_READ`` to fault the pages in off
the compute thread) and what is done (``MADV_DONTNEED`` drops our page-table entries, so the
pages stay in the page cache but no longer count as ours and can be evicted).

The mapping is private (copy-on-write) and never written, so dropping pages is always safe: a
later read faults them in again from the file. libc is called through ctypes, which releases
the GIL, so disk waits in the reader never stall the compute thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from glmchat.errors import GlmchatError

PAGE = mmap.PAGESIZE
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+: fault pages in; errors come back as EFAULT, not SIGBUS

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


class OffloadError(GlmchatError):
    """The weights being streamed cannot be read (file gone, truncated, unreadable)."""


@dataclass(frozen=True)
class TensorLocation:
    file: MappedFile
    start: int  # byte offset of the tensor's data in the file
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class MappedFile:
    """One safetensors file: an open descriptor and one private mapping, kept for the model's
    life. ``needed`` is the file size its header promises."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise OffloadError(f"{path} cannot be opened ({exc.strerror})") from None
        self.size = os.fstat(self.fd).st_size
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, header_len, 8))
        except (struct.error, ValueError) as exc:
            os.close(self.fd)
            raise OffloadError(f"{path} is not a valid safetensors file ({exc})") from None
        self.data_start = 8 + header_len
        # ACCESS_COPY = MAP_PRIVATE: writable for torch.frombuffer, never written back.
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        self.whole = torch.frombuffer(self.mm, dtype=torch.uint8)  # (size,) zero-copy
        self.address = self.whole.data_ptr()
        self.tensors: dict[str, TensorLocation] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = (self.data_start + int(o) for o in meta["data_offsets"])
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise OffloadError(f"{path}: tensor {name} has dtype {meta['dtype']}, which the "
                                   "glmchat offload runtime does not read; use "
                                   "--offload-runtime accelerate")
            self.tensors[name] = TensorLocation(self, begin, end, dtype, tuple(meta["shape"]))
        self.needed = max((t.end for t in self.tensors.values()), default=self.data_start)
        if self.needed > self.size:
            raise OffloadError(f"{path} is truncated ({self.size} bytes, needs {self.needed}); "
                               "re-download or re-save it")

    def view(self, location: TensorLocation) -> torch.Tensor:
        """The tensor's bytes in the mapping, as a tensor: no copy."""
        flat = self.whole[location.start:location.end].view(location.dtype)
        return flat.view(location.shape)

    def check_intact(self) -> None:
        """Raise if the file was deleted or truncated under us: reading a mapped page past the
        end of a truncated file would kill the process with SIGBUS instead."""
        stat = os.fstat(self.fd)
        if stat.st_nlink == 0:
            raise OffloadError(f"{self.path} was deleted while the model was loaded; its layers "
                               "can no longer be streamed — restore the file and reload")
        if stat.st_size < self.needed:
            raise OffloadError(f"{self.path} was truncated to {stat.st_size} bytes while the "
                               f"model was loaded (needs {self.needed}); restore it and reload")

    def _madvise(self, start: int, end: int, advice: int) -> int:
        begin = start - start % PAGE
        length = min(end, self.size) - begin
        if length <= 0:
            return 0
        if _libc.madvise(ctypes.c_void_p(self.address + begin), length, advice) != 0:
            return ctypes.get_errno()
        return 0

    def cached(self, start: int, end: int) -> bool:
        """Whether every page of [start, end) is in the page cache now (``mincore``)."""
        begin = start - start % PAGE
        length = min(end, self.size) - begin
        if length <= 0:
            return True
        pages = (length + PAGE - 1) // PAGE
        vector = ctypes.create_string_buffer(pages)
        if _libc.mincore(ctypes.c_void_p(self.address + begin), length, vector) != 0:
            return False
        return b"\x00" not in vector.raw[:pages]  # one byte per page: 1 = cached

    def will_need(self, start: int, end: int) -> None:
        """Start reading [start, end) into the page cache, asynchronously."""
        os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_WILLNEED)

    def populate(self, start: int, end: int) -> None:
        """Fault [start, end) into our mapping now (waits for the disk). Falls back to
        WILLNEED on kernels without MADV_POPULATE_READ."""
        error = self._madvise(start, end, MADV_POPULATE_READ)
        if error == 0:
            return
        if error == 22:  # EINVAL: an older kernel
            self._madvise(start, end, MADV_WILLNEED)
            return
        raise OffloadError(f"{self.path}: reading bytes {start}-{end} failed "
                           f"({os.strerror(error)}); the file may have been truncated")

    def drop(self, start: int, end: int) -> None:
        """Unmap [start, end) from our address space; the page cache keeps what it wants."""
        self._madvise(start, end, MADV_DONTNEED)

    def evict(self) -> None:
        """Ask the kernel to drop the file from the page cache (pages still mapped stay)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            del self.whole
            # A tensor may still view the mapping: it then goes when the last view goes.
            with contextlib.suppress(BufferError):
                self.mm.close()
            os.close(self.fd)
            self.fd = -1


class MappedCheckpoint:
    """All safetensors files of a directory, mapped; tensors by checkpoint key."""

    def __init__(self, files: list[Path]) -> None:
        if not files:
            raise OffloadError("no *.safetensors files to stream from")
        self.files = [MappedFile(path) for path in files]
        self.locations: dict[str, TensorLocation] = {}
        for mapped in self.files:
            self.locations.update(mapped.tensors)

    @classmethod
    def open(cls, directory: Path) -> MappedCheckpoint:
        return cls(sorted(directory.glob("*.safetensors")))

    def view(self, key: str) -> torch.Tensor:
        location = self.locations[key]
        return location.file.view(location)

    def evict(self) -> None:
        for mapped in self.files:
            mapped.evict()

    def close(self) -> None:
        for mapped in self.files:
            mapped.close()


def read_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous, page-aligned memory for O_DIRECT reads, backed by huge pages where the kernel
    allows (``MADV_HUGEPAGE``) and faulted in now. Huge pages matter: a direct read into 4 KiB
    pages is split into many small device requests (measured here: ~1 GB/s instead of ~3)."""
    size = max(PAGE, nbytes + (-nbytes % HUGE_PAGE))
    buffer = mmap.mmap(-1, size)
    whole = torch.frombuffer(buffer, dtype=torch.uint8)
    _libc.madvise(ctypes.c_void_p(whole.data_ptr()), size, MADV_HUGEPAGE)  # best effort
    whole.zero_()  # fault every page in now, not during the reads
    del whole  # the mapping may be closed again once its last view is gone
    return buffer


def read_range(fd: int, target: memoryview, start: int, end: int) -> int:
    """Read bytes [start, end) of ``fd`` into ``target`` with as few ``pread``s as the kernel
    allows (one, usually); return the offset reached, short of ``end`` at end of file."""
    offset = start
    while offset < end:
        n = os.preadv(fd, [target[offset - start:end - start]], offset)
        if n <= 0:
            break
        offset += n
    return offset


def merged_ranges(locations: list[TensorLocation]) -> list[tuple[MappedFile, int, int]]:
    """Byte ranges covering ``locations``, merged where they touch (a layer is usually one or
    two contiguous runs of its file)."""
    out: list[tuple[MappedFile, int, int]] = []
    for loc in sorted(locations, key=lambda t: (str(t.file.path), t.start)):
        if out and out[-1][0] is loc.file and loc.start - out[-1][2] <= PAGE:
            out[-1] = (loc.file, out[-1][1], max(out[-1][2], loc.end))
        else:
            out.append((loc.file, loc.start, loc.end))
    return out


def evict_files(paths: list[Path]) -> None:
    """posix_fadvise(DONTNEED) on whole files: the bench's cold page-cache regime."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: list[Path]) -> float:
    """The fraction of the files' pages in the page cache now (mincore on a fresh mapping):
    the bench checks with it that its eviction took."""
    mmap_ = _libc.mmap
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
    mmap_.restype = ctypes.c_void_p
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    cached = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + PAGE - 1) // PAGE
        vector = ctypes.create_string_buffer(pages)
        fd = os.open(path, os.O_RDONLY)
        try:
            address = mmap_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                if _libc.mincore(address, size, vector) == 0:
                    cached += sum(1 for byte in vector.raw[:pages] if byte & 1)
                    total += pages
            finally:
                _libc.munmap(address, size)
        finally:
            os.close(fd)
    return cached / total if total else 0.0
