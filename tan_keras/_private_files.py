"""Files that hold secrets or noiseless private statistics: owner-only.

A checkpoint holds the noise key and the sampler's key (whoever reads them can
subtract the noise and knows which examples each step used); a run's logs
and metrics hold statistics computed on private examples without noise. So
the directories tan_keras creates for them are 0700 and the checkpoint files
0600, whatever the process umask. Remote paths (gs://, ...) have no POSIX
permissions: their access is the bucket's, left to its owner.
"""

import os
import stat

OWNER_DIR = 0o700
OWNER_FILE = 0o600


def is_local(path: str) -> bool:
    """Whether `path` is on the local file system (no `scheme://`)."""
    return "://" not in str(path)


def make_private_dir(path: str) -> None:
    """Creates `path` (and parents) if needed; makes `path` itself owner-only.

    Args:
      path: A directory path.
    """
    if not is_local(path):
        return
    os.makedirs(path, mode=OWNER_DIR, exist_ok=True)
    os.chmod(path, OWNER_DIR)


def restrict(path: str) -> None:
    """Makes a file owner-only (read and write), a directory owner-only, recursively.

    Args:
      path: A file or directory; nothing happens if it does not exist.
    """
    if not is_local(path) or not os.path.exists(path):
        return
    if os.path.isdir(path):
        os.chmod(path, OWNER_DIR)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), OWNER_DIR)
            for name in files:
                os.chmod(os.path.join(root, name), OWNER_FILE)
    else:
        os.chmod(path, OWNER_FILE)


def readable_by_others(path: str) -> bool:
    """Whether the group or other users may read (or write) `path`."""
    if not is_local(path):
        return False
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
