#!/usr/bin/env python3
"""A filesystem that forgets what was not synced: the power cut of the tests.

    python3 tests/lazyfs/lazyfs.py BACKING MOUNTPOINT

mounts BACKING (a directory) at MOUNTPOINT through FUSE (fusepy and
libfuse2; root, or a user allowed to mount). Every write stays in this
process's memory until an fsync or fdatasync of its file writes it to
BACKING; reads see it at once, as they would from a page cache. On a line
`cut` on standard input, every write not synced yet is dropped, as a
power cut drops what the page cache held, and `cut N` is printed (N: the
bytes dropped). `ready` is printed once the mount serves.

What it models and what it does not:
- File data: lost unless its file was synced after it was written. The
  kernel's `sync_file_range` never reaches a FUSE filesystem, so it makes
  nothing durable here either, as on a real power cut.
- Sizes follow the data: a file grown by writes nobody synced is back to
  its synced size after the cut.
- Names (create, mkdir, rename, unlink, truncate) are made on BACKING at
  once: they survive the cut whether or not their directory was synced. A
  real filesystem may lose them too; this one is kinder there.
Mounted with `direct_io` and no attribute caching, so the kernel keeps no
page cache or sizes of its own for the mount: after a cut, readers see what
BACKING holds.
"""

import errno
import os
import sys
import threading

from fuse import FUSE, FuseOSError, Operations

PAGE = 4096


class Dirty:
    """A file's writes not synced yet: whole pages, and its size with them."""

    def __init__(self, size):
        self.pages = {}
        self.size = size


class Lazy(Operations):
    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.mutex = threading.Lock()
        # By inode number of the backing file: one file under several
        # names or handles has one set of unsynced writes.
        self.dirty = {}
        # Open handles (backing descriptors) to their inode numbers.
        self.handles = {}

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _ino(self, path):
        return os.lstat(self._path(path)).st_ino

    def cut(self):
        with self.mutex:
            dropped = sum(len(d.pages) * PAGE for d in self.dirty.values())
            self.dirty.clear()
        return dropped

    def __call__(self, op, *args):
        try:
            return super().__call__(op, *args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO)

    def init(self, path):
        print("ready", flush=True)

    # Names and metadata: on BACKING at once.

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        attrs = {
            k: getattr(st, k)
            for k in (
                "st_atime",
                "st_ctime",
                "st_gid",
                "st_mode",
                "st_mtime",
                "st_nlink",
                "st_size",
                "st_uid",
                "st_blocks",
            )
        }
        with self.mutex:
            d = self.dirty.get(st.st_ino)
            if d is not None:
                attrs["st_size"] = d.size
                attrs["st_blocks"] = (d.size + 511) // 512
        return attrs

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def readlink(self, path):
        return os.readlink(self._path(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._path(path), mode, dev)

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def symlink(self, target, source):
        os.symlink(source, self._path(target))

    def link(self, target, source):
        os.link(self._path(source), self._path(target))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def unlink(self, path):
        ino = self._ino(path)
        os.unlink(self._path(path))
        with self.mutex:
            if ino not in self.handles.values():
                self.dirty.pop(ino, None)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        return {
            k: getattr(st, k)
            for k in (
                "f_bavail",
                "f_bfree",
                "f_blocks",
                "f_bsize",
                "f_favail",
                "f_ffree",
                "f_files",
                "f_flag",
                "f_frsize",
                "f_namemax",
            )
        }

    def truncate(self, path, length, fh=None):
        with self.mutex:
            ino = os.fstat(fh).st_ino if fh is not None else self._ino(path)
            self._truncate(ino, length)
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._path(path), length)

    def _truncate(self, ino, length):
        d = self.dirty.get(ino)
        if d is None:
            return
        d.size = length
        for p in [p for p in d.pages if p * PAGE >= length]:
            del d.pages[p]
        tail = d.pages.get(length // PAGE)
        if tail is not None:
            at = length % PAGE
            tail[at:] = bytes(PAGE - at)

    # File data: in memory until synced.

    def open(self, path, flags):
        write = flags & os.O_ACCMODE != os.O_RDONLY
        fh = os.open(self._path(path), os.O_RDWR if write else os.O_RDONLY)
        self._opened(fh)
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fh)
        return fh

    def create(self, path, mode, fi=None):
        fh = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        self._opened(fh)
        with self.mutex:
            self.dirty.pop(os.fstat(fh).st_ino, None)
        return fh

    def _opened(self, fh):
        with self.mutex:
            self.handles[fh] = os.fstat(fh).st_ino

    def read(self, path, size, offset, fh):
        with self.mutex:
            d = self.dirty.get(self.handles[fh])
            if d is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, d.size)
            if end <= offset:
                return b""
            out = bytearray(os.pread(fh, end - offset, offset).ljust(end - offset, b"\0"))
            for p in range(offset // PAGE, (end - 1) // PAGE + 1):
                page = d.pages.get(p)
                if page is None:
                    continue
                s, e = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
                out[s - offset : e - offset] = page[s - p * PAGE : e - p * PAGE]
            return bytes(out)

    def write(self, path, data, offset, fh):
        with self.mutex:
            ino = self.handles[fh]
            d = self.dirty.get(ino)
            if d is None:
                d = self.dirty[ino] = Dirty(os.fstat(fh).st_size)
            pos, n = 0, len(data)
            while pos < n:
                at = offset + pos
                p, s = divmod(at, PAGE)
                k = min(PAGE - s, n - pos)
                page = d.pages.get(p)
                if page is None:
                    start = os.pread(fh, PAGE, p * PAGE) if p * PAGE < d.size else b""
                    # What the file held past its size is not there.
                    start = start[: max(0, d.size - p * PAGE)]
                    page = d.pages[p] = bytearray(start.ljust(PAGE, b"\0"))
                page[s : s + k] = data[pos : pos + k]
                pos += k
            d.size = max(d.size, offset + n)
            return n

    def fsync(self, path, datasync, fh):
        with self.mutex:
            d = self.dirty.pop(self.handles[fh], None)
            if d is None:
                return 0
            # The handle synced may be read-only (a file written through
            # another one, maybe closed since): write through a new one.
            out = os.open(f"/proc/self/fd/{fh}", os.O_WRONLY)
            try:
                for p in sorted(d.pages):
                    start = p * PAGE
                    if start < d.size:
                        os.pwrite(out, bytes(d.pages[p][: min(PAGE, d.size - start)]), start)
                if os.fstat(out).st_size != d.size:
                    os.ftruncate(out, d.size)
            finally:
                os.close(out)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        with self.mutex:
            ino = self.handles.pop(fh, None)
            if os.fstat(fh).st_nlink == 0 and ino not in self.handles.values():
                self.dirty.pop(ino, None)
        os.close(fh)
        return 0


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    fs = Lazy(sys.argv[1])

    def commands():
        for line in sys.stdin:
            if line.strip() == "cut":
                print(f"cut {fs.cut()}", flush=True)

    threading.Thread(target=commands, daemon=True).start()
    # No attribute or name caching in the kernel: sizes after a cut are
    # this process's.
    FUSE(
        fs,
        sys.argv[2],
        foreground=True,
        nothreads=False,
        direct_io=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )


if __name__ == "__main__":
    main()
