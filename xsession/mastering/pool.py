"""The medium's package pool: every flavour's installed packages, stored once, as a
signed apt repository that dom0 serves on its internal network.

At mastering, while each flavour runs (before it is saved):

1. its apt is pointed at the pool (``http://DOM0/``, suite ``xenubuntu``, signed by
   the pool's key, no other source), through the guest agent, so the saved guest
   installs from dom0 with no internet;
2. its installed packages are listed (``dpkg-query``; the guest's words are
   untrusted and parsed strictly).

Then the union of those lists is collected once from the build's package cache
(one file per name, version and architecture), indexed with Debian's
``apt-ftparchive`` and signed with a key made for this medium alone (its
secret half is thrown away once the Release is signed). Layout::

    xenubuntu/pool/xenubuntu-pool.gpg                      the public key
    xenubuntu/pool/dists/xenubuntu/{Release,InRelease,Release.gpg}
    xenubuntu/pool/dists/xenubuntu/main/binary-amd64/Packages{,.gz}
    xenubuntu/pool/main/<initial>/<file>.deb
    xenubuntu/pool/report.json                             sizes, with and without sharing
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PoolError

__all__ = ["PackageId", "parse_installed", "guest_apt_script", "Pool", "SUITE", "KEY_NAME", "QUERY"]

SUITE = "xenubuntu"
COMPONENT = "main"
ARCH = "amd64"
KEY_NAME = "xenubuntu-pool.gpg"
GUEST_KEYRING = "/etc/apt/keyrings/xenubuntu-pool.gpg"
GUEST_SOURCES = "/etc/apt/sources.list.d/xenubuntu-pool.sources"
#: the guest's installed packages, one a line (fields apart by tabs)
QUERY = ["dpkg-query", "-W", "-f=${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\n"]
#: Debian policy's syntax (5.6.1, 5.6.12) and the architectures a pool can hold
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}")
_VERSION_RE = re.compile(r"(?:[0-9]{1,9}:)?[0-9A-Za-z.+~-]{1,127}")
_ARCHES = ("amd64", "all")
_MAX_PACKAGES = 20000
TOOL_TIMEOUT_S = 600.0


@dataclass(frozen=True, order=True)
class PackageId:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        """The name Debian's tools give the file (an epoch's colon is written ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_installed(untrusted: bytes, source: str) -> frozenset[PackageId]:
    """A guest's ``dpkg-query`` output: installed packages only, every field checked.

    :raises PoolError: a line that is not a package (the guest's output is refused whole).
    """
    try:
        text = untrusted.decode("ascii")
    except UnicodeDecodeError as e:
        raise PoolError(source, "its package list is not ASCII") from e
    found: set[PackageId] = set()
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 4:
            raise PoolError(source, f"line {n} of its package list has {len(parts)} fields, not 4")
        name, version, arch, status = parts
        if not status.startswith("ii"):
            continue  # removed, half-installed, config-files only: not on the system
        if not _NAME_RE.fullmatch(name) or not _VERSION_RE.fullmatch(version) or arch not in _ARCHES:
            raise PoolError(source, f"line {n} of its package list is not a package: {line[:80]!r}")
        found.add(PackageId(name, version, arch))
        if len(found) > _MAX_PACKAGES:
            raise PoolError(source, f"lists more than {_MAX_PACKAGES} packages")
    return frozenset(found)


def guest_apt_script(address: str, keyring: bytes) -> str:
    """Shell run in a flavour at mastering: the pool is its only apt source."""
    key = base64.b64encode(keyring).decode()
    sources = (f"Types: deb\nURIs: http://{address}/\nSuites: {SUITE}\nComponents: {COMPONENT}\n"
               f"Signed-By: {GUEST_KEYRING}\n")
    return (
        "set -e; mkdir -p /etc/apt/keyrings /etc/apt/sources.list.d; "
        f"echo {key} | base64 -d > {GUEST_KEYRING}; chmod 644 {GUEST_KEYRING}; "
        f"printf %s {_shell_quote(sources)} > {GUEST_SOURCES}; "
        "if [ -s /etc/apt/sources.list ]; then mv /etc/apt/sources.list /etc/apt/sources.list.internet; fi; "
        "printf '# the medium'\"'\"'s package pool, served by dom0: %s\\n' "
        f"{GUEST_SOURCES} > /etc/apt/sources.list"
    )


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _run(argv: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         stdout: Any = subprocess.PIPE) -> bytes:
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
                              timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PoolError(what, f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        raise PoolError(what, f"{' '.join(argv[:3])} said: {done.stderr.decode(errors='replace').strip()[-300:]}")
    return done.stdout or b""


@dataclass
class Pool:
    """One medium's pool while it is mastered: the key, the flavours' package lists,
    then the repository. ``close`` forgets the secret key."""

    root: Path  # MEDIUM/xenubuntu/pool
    debs: Path  # the builds' package cache
    flavours: dict[str, frozenset[PackageId]] = field(default_factory=dict)
    _home: Path | None = None

    def make_key(self) -> bytes:
        """A signing key for this medium alone; returns its public half (also written to the pool)."""
        self._home = Path(tempfile.mkdtemp(prefix="xsm-gpg-"))
        os.chmod(self._home, 0o700)
        self._gpg("--quick-generate-key", "XenUbuntu medium package pool <pool@xenubuntu.internal>",
                  "ed25519", "sign", "never")
        public = self._gpg("--export")
        if not public:
            raise PoolError("the signing key", "gpg exported nothing")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / KEY_NAME).write_bytes(public)
        return public

    def _gpg(self, *args: str, stdout: Any = subprocess.PIPE) -> bytes:
        assert self._home is not None, "make_key first"
        return _run(["gpg", "--homedir", str(self._home), "--batch", "--yes", "--quiet", "--pinentry-mode",
                     "loopback", "--passphrase", "", *args], "sign the pool", stdout=stdout)

    def add_flavour(self, name: str, untrusted_list: bytes) -> int:
        """Record a flavour's installed packages; returns how many."""
        self.flavours[name] = parse_installed(untrusted_list, name)
        return len(self.flavours[name])

    def build(self) -> dict[str, Any]:
        """Collect, index and sign; returns the report (also written as ``report.json``).

        :raises PoolError: a package missing from the build cache, or a tool failed.
        """
        wanted = sorted(set().union(*self.flavours.values())) if self.flavours else []
        missing = [p for p in wanted if not (self.debs / p.filename).is_file()]
        if missing:
            shown = ", ".join(p.filename for p in missing[:5])
            raise PoolError(str(self.debs), f"{len(missing)} installed package(s) are not in it: {shown}")
        sizes: dict[PackageId, int] = {}
        for p in wanted:
            dest = self.root / COMPONENT / p.name[0] / p.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(self.debs / p.filename, dest)  # read-only input, stored once on the medium
            except OSError:
                shutil.copyfile(self.debs / p.filename, dest)
            sizes[p] = dest.stat().st_size
        dists = self.root / "dists" / SUITE
        binary = dists / COMPONENT / f"binary-{ARCH}"
        binary.mkdir(parents=True, exist_ok=True)
        packages = _run(["apt-ftparchive", "packages", COMPONENT], "index the pool", cwd=self.root)
        self._check_index(packages, wanted)
        (binary / "Packages").write_bytes(packages)
        (binary / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
        release = _run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=XenUbuntu",
                        "-o", "APT::FTPArchive::Release::Label=XenUbuntu medium pool",
                        "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
                        "-o", f"APT::FTPArchive::Release::Codename={SUITE}",
                        "-o", f"APT::FTPArchive::Release::Architectures={ARCH} all",
                        "-o", f"APT::FTPArchive::Release::Components={COMPONENT}",
                        "release", "."], "write the Release file", cwd=dists)
        for stale in ("Release", "InRelease", "Release.gpg"):
            (dists / stale).unlink(missing_ok=True)
        (dists / "Release").write_bytes(release)
        self._gpg("--clearsign", "--output", str(dists / "InRelease"), str(dists / "Release"))
        self._gpg("--armor", "--detach-sign", "--output", str(dists / "Release.gpg"), str(dists / "Release"))
        report = self._report(wanted, sizes)
        (self.root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        return report

    @staticmethod
    def _check_index(packages: bytes, wanted: list[PackageId]) -> None:
        """Every file is what its name says (apt-ftparchive read its control data)."""
        indexed = set()
        for stanza in packages.decode(errors="replace").split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
            if "Package" in fields:
                indexed.add(PackageId(fields["Package"], fields.get("Version", ""), fields.get("Architecture", "")))
        wrong = set(wanted) - indexed
        if wrong:
            shown = ", ".join(p.filename for p in sorted(wrong)[:5])
            raise PoolError("the index", f"{len(wrong)} file(s) do not hold the package their name says: {shown}")

    def _report(self, wanted: list[PackageId], sizes: dict[PackageId, int]) -> dict[str, Any]:
        per_flavour = {name: sum(sizes[p] for p in pkgs) for name, pkgs in sorted(self.flavours.items())}
        sha = hashlib.sha256()
        for p in wanted:
            sha.update(f"{p.filename}\n".encode())
        return {
            "packages": len(wanted),
            "bytes": sum(sizes.values()),
            "per_flavour_packages": {n: len(p) for n, p in sorted(self.flavours.items())},
            "per_flavour_bytes": per_flavour,
            "bytes_without_sharing": sum(per_flavour.values()),
            "contents_sha256": sha.hexdigest(),
        }

    def close(self) -> None:
        """Forget the secret key: nobody signs for this medium again."""
        if self._home is not None:
            # gpg started an agent for this home: it ends with it
            subprocess.run(["gpgconf", "--homedir", str(self._home), "--kill", "gpg-agent"],
                           capture_output=True, timeout=30, check=False)
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
