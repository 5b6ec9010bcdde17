#!/usr/bin/env python3
"""Keeps a small corpus: at most MAX_FILES files and MAX_BYTES bytes, chosen greedily for coverage.

Usage: python3 fuzz/pick_corpus.py TARGET [MAX_FILES] [MAX_BYTES]

Runs the target's libFuzzer binary (built by `cargo +nightly fuzz build TARGET`) in set-cover merge mode over
fuzz/corpus/TARGET to learn which features each file covers (`-merge_control_file`), then keeps the file that adds the
most features not covered yet, again and again, until the budget is spent or nothing new is added, and deletes the
rest. Run `cargo +nightly fuzz cmin TARGET` first: it is faster on a large corpus and this script only trims further.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def features(binary, corpus):
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control")
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        # A set-cover merge records every feature of each file; a plain merge only those no smaller file had.
        args = ["-set_cover_merge=1", "-merge_control_file=" + control, "-rss_limit_mb=2048", "-timeout=5"]
        subprocess.run([binary, *args, out, corpus], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = open(control).read().splitlines()
    n = int(lines[0])
    files = lines[2:2 + n]
    ft = {}
    for line in lines[2 + n:]:
        parts = line.split()
        if parts and parts[0] == "FT":
            ft[files[int(parts[1])]] = set(map(int, parts[2:]))
    return ft


def main():
    target = sys.argv[1]
    max_files = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 200 * 1024
    binary = os.path.join(HERE, "target", "x86_64-unknown-linux-gnu", "release", target)
    corpus = os.path.join(HERE, "corpus", target)
    ft = features(binary, corpus)
    all_features = set().union(*ft.values()) if ft else set()
    covered, kept, used = set(), [], 0
    candidates = set(ft)

    def gain(p):
        # New features first, then the smaller file.
        return (len(ft[p] - covered), -os.path.getsize(p))

    while candidates and len(kept) < max_files:
        fitting = [p for p in candidates if used + os.path.getsize(p) <= max_bytes]
        if not fitting:
            break
        path = max(fitting, key=gain)
        if gain(path)[0] == 0:
            break
        kept.append(path)
        used += os.path.getsize(path)
        candidates.remove(path)
        covered |= ft[path]
    for name in os.listdir(corpus):
        p = os.path.join(corpus, name)
        if p not in kept:
            os.remove(p)
    print(f"{target}: kept {len(kept)} files, {used} bytes, {len(covered)} of {len(all_features)} features")


if __name__ == "__main__":
    main()
