"""Atomic writes: a file (or folder) appears whole under its name, or not at all.

Every file this project writes (checkpoints, converted weights, exported models, configs, label maps, the
digits data set, the compiled CPU kernels) goes through `atomic_path`: it is written under a temporary
name in the same folder and renamed into place, so a crash, a kill or a concurrent reader sees the old
file or the new one, never half of one, and a failure leaves nothing behind.
"""
import contextlib
import os
import shutil
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
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
