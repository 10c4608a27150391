"""The questions a restore asks Xen, answered in process instead of by ``xl``.

Every ``xl`` call sets up libxl, which costs dom0 0.15-0.4 s of CPU on the test
host (an emulated CPU) and competes with the decompression and xl's own
reading on dom0's vCPU. A restore asks twice which domain id a name has (is
the name free; which domain did ``xl restore`` make) and unpauses once. Those
are a xenstore read (``/local/domain/ID/name``, where libxl keeps names) and
one domctl (and a xenstore read of the device model's process id), so
:class:`XenControl` calls libxenstore and libxenctrl through
ctypes. Where the libraries cannot be loaded (no Xen here), every method
raises :class:`Unavailable` and the caller asks ``xl``.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

__all__ = ["Unavailable", "XenControl"]

_XENSTORE = ("libxenstore.so.4", "libxenstore.so")
_XENCTRL = ("libxenctrl.so.4.17", "libxenctrl.so")
_XBT_NULL = 0


class Unavailable(Exception):
    """The Xen libraries (or xenstore) cannot answer here; ask xl instead."""


def _load(names: tuple[str, ...]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    return None


class XenControl:
    """libxenstore and libxenctrl, loaded on first use; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self._xs: ctypes.CDLL | None = None
        self._xc: ctypes.CDLL | None = None
        self._libc: ctypes.CDLL | None = None

    def _libs(self) -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                xs, xc, libc = _load(_XENSTORE), _load(_XENCTRL), _load(("libc.so.6",))
                if xs is not None and xc is not None and libc is not None:
                    xs.xs_open.argtypes, xs.xs_open.restype = [ctypes.c_ulong], ctypes.c_void_p
                    xs.xs_close.argtypes, xs.xs_close.restype = [ctypes.c_void_p], None
                    xs.xs_directory.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p,
                                                ctypes.POINTER(ctypes.c_uint)]
                    xs.xs_directory.restype = ctypes.c_void_p
                    xs.xs_read.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p,
                                           ctypes.POINTER(ctypes.c_uint)]
                    xs.xs_read.restype = ctypes.c_void_p
                    xc.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
                    xc.xc_interface_open.restype = ctypes.c_void_p
                    xc.xc_interface_close.argtypes, xc.xc_interface_close.restype = [ctypes.c_void_p], ctypes.c_int
                    xc.xc_domain_unpause.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
                    xc.xc_domain_unpause.restype = ctypes.c_int
                    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
                    self._xs, self._xc, self._libc = xs, xc, libc
        if self._xs is None or self._xc is None or self._libc is None:
            raise Unavailable("libxenstore or libxenctrl cannot be loaded")
        return self._xs, self._xc, self._libc

    def domid(self, name: str) -> int | None:
        """The id of the domain called ``name`` (xenstore's ``/local/domain/ID/name``), or None.

        :raises Unavailable: xenstore cannot be reached.
        """
        xs, _, libc = self._libs()
        with self._xenstore() as h:
            count = ctypes.c_uint(0)
            listing = xs.xs_directory(h, _XBT_NULL, b"/local/domain", ctypes.byref(count))
            if not listing:
                raise Unavailable(f"cannot list /local/domain in xenstore (errno {ctypes.get_errno()})")
            try:
                ids = ctypes.cast(listing, ctypes.POINTER(ctypes.c_char_p))
                wanted = name.encode()
                for i in range(count.value):
                    entry = ids[i] or b""
                    # None: a domain being made or torn down has no name (yet)
                    if self._read(h, b"/local/domain/" + entry + b"/name") == wanted and entry.isdigit():
                        return int(entry)
            finally:
                libc.free(listing)  # one block: the array and its strings
        return None

    def read(self, path: str) -> bytes | None:
        """A xenstore value, or None where there is none.

        :raises Unavailable: xenstore cannot be reached.
        """
        with self._xenstore() as h:
            return self._read(h, path.encode())

    @contextlib.contextmanager
    def _xenstore(self) -> Iterator[int]:
        xs, _, _ = self._libs()
        h = xs.xs_open(0)
        if not h:
            raise Unavailable(f"cannot reach xenstore (errno {ctypes.get_errno()})")
        try:
            yield h
        finally:
            xs.xs_close(h)

    def _read(self, h: int, path: bytes) -> bytes | None:
        xs, _, libc = self._libs()
        length = ctypes.c_uint(0)
        value = xs.xs_read(h, _XBT_NULL, path, ctypes.byref(length))
        if not value:
            return None
        try:
            return ctypes.string_at(value, length.value)
        finally:
            libc.free(value)

    def unpause(self, domid: int) -> None:
        """Unpause a domain (what ``xl unpause`` does for a PV or PVH domain).

        :raises Unavailable: libxenctrl cannot be used here.
        :raises OSError: Xen refused (no such domain, say).
        """
        _, xc, _ = self._libs()
        handle = xc.xc_interface_open(None, None, 0)
        if not handle:
            raise Unavailable(f"cannot open libxenctrl (errno {ctypes.get_errno()})")
        try:
            if xc.xc_domain_unpause(handle, domid) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"xc_domain_unpause({domid}) failed")
        finally:
            xc.xc_interface_close(handle)
