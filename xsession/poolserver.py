"""dom0 serves the medium's package pool over HTTP, on the internal network only.

Bound to dom0's address on the bridge, so nothing outside the internal network
can ask; read-only files of the medium; no directory listings. Python's own
``http.server`` in a thread: apt asks for a few index files and the .debs a
person installs, nothing that needs a web server of its own.
"""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path
from typing import Any

from .errors import PoolError

__all__ = ["PoolServer", "POOL_RELPATH"]

log = logging.getLogger(__name__)

#: where a mastered medium keeps its pool, relative to the medium's root
POOL_RELPATH = "xenubuntu/pool"
#: what makes a pool folder a repository (the signed index)
_SIGNED_INDEX = "dists/xenubuntu/InRelease"


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_version = "xenubuntu-pool"
    sys_version = ""

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "no listings")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.info("pool: %s %s", self.address_string(), format % args)


class PoolServer:
    """The pool's HTTP server on ``address:port``; :meth:`close` ends it."""

    def __init__(self, root: Path, address: str, port: int):
        if not (root / _SIGNED_INDEX).is_file():
            raise PoolError(str(root), "is not a signed package pool (no dists/xenubuntu/InRelease)")
        handler = functools.partial(_Handler, directory=str(root))
        try:
            self._server = http.server.ThreadingHTTPServer((address, port), handler)
        except OSError as e:
            raise PoolError(f"serve on {address}:{port}", e.strerror or str(e)) from e
        self._server.daemon_threads = True
        self.address, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="pool-http", daemon=True)
        self._thread.start()
        log.info("package pool served on http://%s:%s/", self.address, self.port)

    @classmethod
    def for_medium(cls, medium: Path, address: str, port: int) -> PoolServer | None:
        """The medium's pool served, or None when the medium has none."""
        root = medium / POOL_RELPATH
        if not (root / _SIGNED_INDEX).exists():
            return None
        return cls(root, address, port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
