#!/usr/bin/env python3
"""Keep DEST a copy of the repository's tracked (and untracked, not ignored) files.

Used by scripts/cuda_build.sh: the CUDA build lives in its own copy so that its in-place
extension (fastreg/_C*.so) never replaces the CPU build of the checkout. Files whose size or
modification time differ are copied (with their times, so ninja rebuilds only what changed);
files of DEST that are no longer in the tree are removed, except build outputs (build/,
the extension, egg-info, caches), so a deleted source is not compiled by the glob in setup.py.

    python3 scripts/mirror_tree.py DEST
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths of DEST (relative, '/'-separated) that hold build outputs: never removed.
KEEP_PREFIXES = ("build/", "fastreg.egg-info/", ".pytest_cache/", ".hypothesis/", "benchmarks/results/")


def tree_files() -> list[str]:
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def is_build_output(rel: str) -> bool:
    name = os.path.basename(rel)
    return (rel.startswith(KEEP_PREFIXES) or "/__pycache__/" in "/" + rel
            or (rel.startswith("fastreg/_C") and name.endswith(".so")))


def mirror(dest: str) -> tuple[int, int]:
    """Copies changed files into dest and removes stale ones; returns (copied, removed)."""
    files = tree_files()
    wanted = set(files)
    copied = removed = 0
    for rel in files:
        src, dst = os.path.join(ROOT, rel), os.path.join(dest, rel)
        s = os.stat(src)
        try:
            d = os.stat(dst)
            if d.st_size == s.st_size and int(d.st_mtime) == int(s.st_mtime):
                continue
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    for dirpath, _, names in os.walk(dest):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), dest).replace(os.sep, "/")
            if rel not in wanted and not is_build_output(rel):
                os.remove(os.path.join(dest, rel))
                removed += 1
    return copied, removed


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    copied, removed = mirror(os.path.abspath(sys.argv[1]))
    print(f"[mirror] {sys.argv[1]}: {copied} files copied, {removed} stale files removed")
