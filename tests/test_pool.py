"""The medium's package pool: built with Debian's tools, signed, served, and checked
by the real apt (with a private state folder, against the server on loopback)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.errors import PoolError
from xsession.mastering.pool import KEY_NAME, PackageId, Pool, guest_apt_script, parse_installed
from xsession.poolserver import PoolServer


def deb_id(path: Path) -> PackageId:
    name, version, arch = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture"],
                                         capture_output=True, text=True, check=True).stdout.split("\n")[:3]
    return PackageId(name.split(": ")[1], version.split(": ")[1], arch.split(": ")[1])


def listing(*packages: PackageId) -> bytes:
    return "".join(f"{p.name}\t{p.version}\t{p.arch}\tii \n" for p in packages).encode()


@pytest.fixture(scope="module")
def debs(demo_medium: Path) -> Path:
    """The demo guests' package cache: busybox-static and a kernel, from Debian."""
    return demo_medium.parent / "guests" / "debs"


@pytest.fixture(scope="module")
def busybox(debs: Path) -> PackageId:
    return deb_id(next(debs.glob("busybox-static_*.deb")))


def make_pool(root: Path, debs: Path, flavours: dict[str, bytes]) -> tuple[Pool, dict]:
    pool = Pool(root, debs)
    try:
        pool.make_key()
        for name, text in flavours.items():
            pool.add_flavour(name, text)
        return pool, pool.build()
    finally:
        pool.close()


@pytest.fixture
def served(tmp_path: Path, debs: Path, busybox: PackageId) -> Iterator[tuple[Path, str, dict]]:
    """A pool of two flavours sharing busybox-static, served on loopback."""
    root = tmp_path / "pool"
    _, report = make_pool(root, debs, {"a": listing(busybox), "b": listing(busybox)})
    server = PoolServer(root, "127.0.0.1", 0)
    try:
        yield root, f"http://127.0.0.1:{server.port}/", report
    finally:
        server.close()


def apt(tmp_path: Path, url: str, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's apt with its own sources, lists and cache: the pool is its only source."""
    state = tmp_path / "apt"
    for d in ("lists/partial", "cache/archives/partial", "parts", "trusted.d"):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb [signed-by={key}] {url} xenubuntu main\n")
    opts = [f"Dir::Etc::SourceList={state / 'sources.list'}", f"Dir::Etc::SourceParts={state / 'parts'}",
            f"Dir::State::Lists={state / 'lists'}", f"Dir::Cache={state / 'cache'}",
            f"Dir::Etc::TrustedParts={state / 'trusted.d'}", f"Dir::Etc::Trusted={state / 'trusted.gpg'}",
            "Debug::NoLocking=1", "APT::Sandbox::User=root", "Acquire::Languages=none"]
    argv = ["apt-get", "-q", *[a for o in opts for a in ("-o", o)], *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=state)


def test_packages_shared_by_flavours_are_stored_once_and_apt_verifies_the_signed_pool(
        served, tmp_path: Path, busybox: PackageId):
    root, url, report = served
    assert report["packages"] == 1 and list(root.rglob("*.deb")) == [root / "main" / "b" / busybox.filename]
    assert report["bytes_without_sharing"] == 2 * report["bytes"]
    for f in ("InRelease", "Release", "Release.gpg"):
        assert (root / "dists" / "xenubuntu" / f).is_file()
    update = apt(tmp_path, url, root / KEY_NAME, "update")
    assert update.returncode == 0 and "W:" not in update.stdout + update.stderr, update.stdout + update.stderr
    download = apt(tmp_path, url, root / KEY_NAME, "download", f"{busybox.name}={busybox.version}")
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "apt" / busybox.filename).read_bytes() == (root / "main" / "b" / busybox.filename).read_bytes()
    missing = apt(tmp_path, url, root / KEY_NAME, "download", "no-such-package")
    assert missing.returncode != 0 and "Unable to locate package no-such-package" in missing.stderr


def _tamper(path: Path) -> None:
    text = path.read_text()
    path.write_text(text.replace("Label: XenUbuntu medium pool", "Label: XenUbuntu medium poo1"))


@pytest.mark.parametrize("how", ["InRelease changed", "Packages changed", "signed by another key"])
def test_a_tampered_pool_is_refused_by_apt(served, tmp_path: Path, debs: Path, busybox: PackageId, how: str):
    root, url, _ = served
    dists = root / "dists" / "xenubuntu"
    if how == "InRelease changed":
        _tamper(dists / "InRelease")
        (dists / "Release.gpg").unlink()  # apt would try the other signature next
    elif how == "Packages changed":
        packages = dists / "main" / "binary-amd64"
        for name in ("Packages", "Packages.gz"):
            (packages / name).unlink()
        (packages / "Packages").write_text(f"Package: {busybox.name}\nVersion: 99\nArchitecture: amd64\n"
                                           f"Filename: main/b/{busybox.filename}\nSize: 1\n")
    else:
        other, _ = make_pool(tmp_path / "other", debs, {"a": listing(busybox)})
        for name in ("InRelease", "Release", "Release.gpg"):
            (dists / name).write_bytes((tmp_path / "other" / "dists" / "xenubuntu" / name).read_bytes())
    update = apt(tmp_path, url, root / KEY_NAME, "update")
    said = update.stdout + update.stderr
    assert update.returncode != 0 or "W: " in said, said
    assert any(w in said for w in ("BADSIG", "NO_PUBKEY", "not signed", "Hash Sum mismatch", "File has unexpected size",
                                   "signatures were invalid", "Signature by key")), said
    assert not list((tmp_path / "apt" / "lists").glob("*Packages")), "apt kept the index of a tampered pool"


def test_a_package_missing_from_the_builds_cache_is_a_named_error(tmp_path: Path, debs: Path, busybox: PackageId):
    ghost = PackageId("ghost", "1.0", "amd64")
    with pytest.raises(PoolError, match="1 installed package.*ghost_1.0_amd64.deb"):
        make_pool(tmp_path / "pool", debs, {"a": listing(busybox, ghost)})


def test_a_server_without_a_signed_pool_is_refused(tmp_path: Path):
    with pytest.raises(PoolError, match="not a signed package pool"):
        PoolServer(tmp_path, "127.0.0.1", 0)
    assert PoolServer.for_medium(tmp_path, "127.0.0.1", 0) is None


def test_the_guest_script_makes_the_pool_the_only_source(tmp_path: Path):
    script = guest_apt_script("10.77.0.1", b"\x99key'bytes")
    root = tmp_path / "root"
    (root / "etc" / "apt").mkdir(parents=True)
    (root / "etc" / "apt" / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    done = subprocess.run(["sh", "-c", script.replace("/etc/apt", str(root / "etc" / "apt"))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (root / "etc/apt/keyrings/xenubuntu-pool.gpg").read_bytes() == b"\x99key'bytes"
    sources = (root / "etc/apt/sources.list.d/xenubuntu-pool.sources").read_text()
    assert "URIs: http://10.77.0.1/" in sources and "/etc/apt/keyrings/xenubuntu-pool.gpg\n" in sources
    assert "deb http" not in (root / "etc/apt/sources.list").read_text()
    assert "deb.debian.org" in (root / "etc/apt/sources.list.internet").read_text()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20),
                                                    st.sampled_from(["amd64", "all", "i386", ""]),
                                                    st.sampled_from(["ii ", "rc ", "iU ", "x"])), max_size=8)
       .map(lambda rows: "".join("\t".join(r) + "\n" for r in rows).encode()))
def test_a_guests_package_list_is_parsed_strictly(untrusted: bytes):
    try:
        found = parse_installed(untrusted, "guest")
    except PoolError as e:
        assert str(e).startswith("package pool: guest:")
        return
    for p in found:
        assert "/" not in p.filename and not p.filename.startswith(".") and p.arch in ("amd64", "all")
