"""Commands in a root file system (chroot), with the API file systems mounted.

Every call runs in a mount namespace of its own (``unshare --mount``): the
mounts it makes (proc, sys, dev, the shared package cache, an overlay) vanish
with it, whatever happens, and are never seen by the rest of the machine.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .steps import StepContext

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _mounts(root: Path, debs: Path | None) -> list[str]:
    r = shlex.quote(str(root))
    lines = [
        f"mount -t proc proc {r}/proc",
        f"mount -t sysfs sysfs {r}/sys",
        f"mount --bind /dev {r}/dev",
        f"mount -t devpts devpts {r}/dev/pts -o newinstance,ptmxmode=0666",
        f"mount -t tmpfs tmpfs {r}/tmp",
    ]
    if debs is not None:
        lines.append(f"mount --bind {shlex.quote(str(debs))} {r}/var/cache/apt/archives")
    return lines


def script(root: Path, commands: list[str], *, debs: Path | None = None,
           overlay: tuple[Path, Path, Path] | None = None, binds: list[tuple[Path, str]] = ()) -> str:
    """The shell script that mounts everything and runs ``commands`` in the chroot at ``root``.

    ``overlay``: (lower, upper, work) folders mounted as an overlay on ``root``
    first, so that the chroot's changes land in ``upper`` only. ``binds``:
    (folder, path inside) pairs, bound read-only.
    """
    pre = ["set -e", "mount --make-rprivate /"]
    if overlay is not None:
        lower, upper, work = (shlex.quote(str(p)) for p in overlay)
        pre.append(f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} "
                   f"{shlex.quote(str(root))}")
    env = f"env -i PATH={PATH} HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive"
    post = []
    for src, inside in binds:
        dest = shlex.quote(str(root) + inside)
        post.append(f"mkdir -p {dest} && mount --bind -o ro {shlex.quote(str(src))} {dest}")
    body = [f"chroot {shlex.quote(str(root))} {env} sh -ec {shlex.quote(c)}" for c in commands]
    return "\n".join(pre + _mounts(root, debs) + post + body) + "\n"


def run(ctx: StepContext, root: Path, commands: list[str], *, what: str, debs: Path | None = None,
        overlay: tuple[Path, Path, Path] | None = None, binds: list[tuple[Path, str]] = (),
        timeout: float = 3600) -> None:
    """Run ``commands`` (shell lines) in the chroot at ``root``, in a mount namespace of their own."""
    ctx.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
             script(root, commands, debs=debs, overlay=overlay, binds=binds)], what=what, timeout=timeout)
