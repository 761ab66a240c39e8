"""Atomic writes: a file (or folder) appears whole under its name, or not at all.

Every file this project writes (checkpoints, converted weights, exported models, configs, label maps, the
digits data set, the compiled CPU kernels) goes through `atomic_path`: it is written under a temporary
name in the same folder and renamed into place, so a crash, a kill or a concurrent reader sees the old
file or the new one, never half of one, and a failure leaves nothing behind. What it writes gets the
permissions of a file opened for writing (0666, or 0777 for a folder or an executable, less the umask: 0644
under umask 022), whatever the writer chose: MindSpore makes its checkpoints and exports read-only (0400).
"""
import contextlib
import os
import shutil
import stat
import threading


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed.

    The temporary name ends with `path`'s own name, so tools that add or check a suffix (MindSpore's
    checkpoint and export functions) keep working.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.getpid()}-{threading.get_ident()}.{os.path.basename(path)}")
    try:
        yield tmp
        os.chmod(tmp, _ordinary_mode(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def _ordinary_mode(path):
    """0666 (0777 for a folder or an executable) less this process's umask."""
    executable = os.path.isdir(path) or os.stat(path).st_mode & stat.S_IXUSR
    return (0o777 if executable else 0o666) & ~_umask()


def _umask():
    """The umask, read from /proc on Linux; elsewhere read by setting it (other threads creating files in that
    instant would see 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
