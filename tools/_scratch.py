"""Scratch space of the sandbox zygote: private tmp mounts (unshare tier), privilege drops, and a clean-up that
removes any tree a program can build.

Standalone and stdlib-only like `_zygote.py`, which imports it from its own folder (inside bwrap it is bound at
/sandbox/_scratch.py); `align.tools.sandbox` uses `remove_tree` for the rlimits tier's host scratch directory.

The clean-up never recurses and never builds paths: it holds one directory fd at a time, walks down by name
(openat with O_NOFOLLOW, so a symlink is unlinked, never followed) and back up through "..", checking the
parent's (device, inode) on the way up. A 100,000-deep tree costs no stack, no PATH_MAX and one fd; a
directory the program chmod-ed 000 (or 0500) is re-opened for its owner; a different device (a mount point)
is never entered.
"""
import ctypes
import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------------------------------- clean-up
def _unlink(name, dir_fd):
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return True
    except PermissionError:  # the directory is not writable (the program chmod-ed it): open it up, retry
        try:
            os.chmod(dir_fd, 0o700)
            os.unlink(name, dir_fd=dir_fd)
            return True
        except OSError:
            return False
    except OSError:
        return False


def _rmdir(name, dir_fd):
    for attempt in (0, 1):
        try:
            os.rmdir(name, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return True
        except PermissionError:
            if attempt:
                return False
            try:
                os.chmod(dir_fd, 0o700)
            except OSError:
                return False
        except OSError:
            return False
    return False


def _scan(fd, dev, keep):
    """Unlink every non-directory in `fd`; return the names of its sub-directories to descend into and the
    number of entries that could not be removed."""
    subdirs, left = [], 0
    try:
        entries = list(os.scandir(fd))
    except PermissionError:  # chmod 000: we own it (or are root), so open it up and list again
        try:
            os.chmod(fd, 0o700)
            entries = list(os.scandir(fd))
        except OSError:
            return [], 1
    except OSError:
        return [], 1
    for entry in entries:
        name = entry.name
        if name in keep:
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            subdirs.append(name)
        elif not _unlink(name, fd):
            left += 1
    return subdirs, left


def _open_subdir(name, fd, dev):
    try:
        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
    except PermissionError:  # mode 000 directory of the program's uid: we may chmod it (owner / CAP_FOWNER)
        try:
            # follows symlinks, but `name` was just seen as a real directory and the program is dead
            os.chmod(name, 0o700, dir_fd=fd)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None
    except OSError:
        return None
    if os.fstat(child).st_dev != dev:  # a mount point: never enter (nor remove) another file system
        os.close(child)
        return None
    return child


def clear_dir(path, keep=()):
    """Remove everything inside directory `path` except the top-level names in `keep`.

    Returns the number of entries left behind (0: clean). Never raises for what it finds inside."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return 0
    left = 0
    try:
        st = os.fstat(fd)
        dev = st.st_dev
        pending, left = _scan(fd, dev, set(keep))
        stack = []  # (name in parent, the parent's pending sub-directories, the parent's (dev, ino))
        while True:
            if pending:
                name = pending.pop()
                here = os.fstat(fd)
                child = _open_subdir(name, fd, dev)
                if child is None:
                    left += 1
                    continue
                os.close(fd)
                fd = child
                stack.append((name, pending, (here.st_dev, here.st_ino)))
                pending, n = _scan(fd, dev, ())
                left += n
                continue
            if not stack:
                break
            name, pending, parent_id = stack.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != parent_id:  # the tree moved under us: stop rather than guess
                raise OSError(errno.ESTALE, f"scratch tree under {path} changed during clean-up")
            if not _rmdir(name, fd):
                left += 1
    except OSError:
        left += 1
    finally:
        os.close(fd)
    return left


def tree_usage(path, max_bytes, max_entries=20000, max_depth=64):
    """Bytes allocated under `path` (st_blocks), or None when over `max_bytes`, `max_entries` or `max_depth`:
    the rlimits tier's scratch is host disk, so the zygote measures it while the program runs."""
    total, entries = 0, 0
    stack = [(path, 0)]
    while stack:
        d, depth = stack.pop()
        if depth > max_depth:
            return None
        try:
            with os.scandir(d) as it:
                for e in it:
                    entries += 1
                    if entries > max_entries:
                        return None
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if total > max_bytes:
                        return None
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((e.path, depth + 1))
        except OSError:  # vanished, or chmod 000 by the program: its contents are unknowable, count it as over
            if d == path and not os.path.exists(path):
                continue
            return None
    return total


def remove_tree(path):
    """Remove directory `path` and everything in it; True when it is gone."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
    clear_dir(path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def remove_owned(dirs, uid):
    """Remove every top-level entry of `dirs` owned by `uid` (the rlimits tier's dropped uid, as root: what a
    program left in the host's world-writable tmp directories). Returns how many could not be removed."""
    left = 0
    for d in dirs:
        try:
            fd = os.open(d, _DIR_FLAGS)
        except OSError:
            continue
        try:
            for entry in list(os.scandir(fd)):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_uid != uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    child = os.path.join(d, entry.name)  # d is a fixed host path; entry is a plain name
                    if not remove_tree(child):
                        left += 1
                elif not _unlink(entry.name, fd):
                    left += 1
        finally:
            os.close(fd)
    return left


# --------------------------------------------------------------------------------------------------- mounts
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
_ATIME = {"noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}


def _mount(src, dst, fstype, flags, data):
    if _libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                   flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {dst}: {os.strerror(err)}")


def _traversable(path):
    parts = path.strip("/").split("/")
    return all(os.stat("/" + "/".join(parts[:k])).st_mode & 0o001 for k in range(1, len(parts) + 1))


def private_tmp(roots, size_mb, tmp_dirs, as_root):
    """unshare tier, as PID 1 of a private mount namespace: one tmpfs of `size_mb` covers /tmp, and the other
    host tmp directories are binds of it (one size limit for all, one clean-up). The Python install (`roots`)
    is staged first and bound back on top when the tmpfs (or, as root, a closed ancestor like /root 0700)
    would hide it from the dropped uid. Host mounts are untouched (propagation is private)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    real_tmp = [os.path.realpath(d) for d in tmp_dirs if os.path.isdir(d) and not os.path.islink(d)]
    hidden = [r for r in roots
              if any(r == t or r.startswith(t.rstrip("/") + "/") for t in real_tmp) or (as_root and not _traversable(r))]
    staged = []
    if hidden:
        # an existing directory covered by a tmpfs in OUR namespace only: nothing is created on the host
        stage = next(d for d in ("/mnt", "/media", "/srv", "/opt", "/home") if os.path.isdir(d))
        _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=1m")
        for i, root in enumerate(hidden):
            d = os.path.join(stage, str(i))
            os.mkdir(d)
            _mount(root, d, None, MS_BIND | MS_REC, None)
            staged.append((d, root))
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={int(size_mb)}m")
    for d in real_tmp:
        if d != "/tmp":
            _mount("/tmp", d, None, MS_BIND, None)
    covered = set()
    for _, root in staged:
        if not as_root:
            break
        parts = root.strip("/").split("/")
        for k in range(1, len(parts)):
            anc = "/" + "/".join(parts[:k])
            if not os.path.exists(anc):
                break  # under our fresh /tmp tmpfs: makedirs below creates it (and what follows) 0755
            if anc in covered or os.stat(anc).st_mode & 0o001:
                continue
            _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            covered.add(anc)
            break
    for d, root in staged:
        os.makedirs(root, mode=0o755, exist_ok=True)
        _mount(d, root, None, MS_BIND | MS_REC, None)


def readonly_host(writable):
    """unshare tier without root (a user namespace, where the program is uid 0 of the namespace and owns
    whatever the trainer's user owns): remount every host mount read-only except `writable` (our tmpfs) and
    the kernel's pseudo file systems. The flags the kernel locked (nosuid, nodev, noexec, atime) are kept."""
    with open("/proc/self/mountinfo") as fh:
        lines = fh.read().splitlines()
    skip = {os.path.realpath(w) for w in writable}
    for line in reversed(lines):  # deepest last-mounted first does not matter for remounts, but is cheap
        fields = line.split(" ")
        mnt = fields[4].encode().decode("unicode_escape")
        opts = fields[5].split(",")
        if mnt in skip or mnt.startswith(("/proc", "/sys", "/dev")) or "ro" in opts:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= (MS_NOSUID if "nosuid" in opts else 0) | (MS_NODEV if "nodev" in opts else 0)
        flags |= (MS_NOEXEC if "noexec" in opts else 0) | sum(v for k, v in _ATIME.items() if k in opts)
        _mount(None, mnt, None, flags, None)


def drop_capabilities():
    """Leave the program no capability at all, now or after an execve (bounding set, ambient set, no new
    privileges): used where it stays uid 0 of a user namespace (the unshare tier without root)."""
    for cap in range(64):
        if _libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:  # PR_CAPBSET_DROP
            break
    _libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if _libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
