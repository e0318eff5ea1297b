"""A tuning split that never touches the dev photos: WORK's train photos split again into train
and val, its val photos renamed test (never read while tuning).

    python bench/tuning_split.py data/scale/6000/work data/tune/work --val 1000
    python cli.py train data/tune/work --run data/tune/run --epochs 8     # then --resume --epochs 10, 12, ...

The new manifest keeps WORK's rows in order, and its feature store is linked, not copied: a
store's identity is its images, not their split. The vocabulary is rebuilt from the new train
split, as `prepare` builds it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store.manifest import VOCAB_NAME, Record, read_manifest, write_manifest  # noqa: E402
from store.text import Vocabulary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="a prepared and featurized WORKDIR")
    p.add_argument("out", type=Path, help="the tuning WORKDIR to write")
    p.add_argument("--val", type=int, default=1000, help="train photos that become the tuning val split")
    p.add_argument("--min-word-count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    records = read_manifest(a.work)
    train = sorted(
        (r.id for r in records if r.split == "train"),
        key=lambda i: hashlib.sha256(f"{a.seed}:{i}".encode()).digest(),  # a fixed shuffle
    )
    val = set(train[: a.val])
    split = {r.id: "test" if r.split != "train" else "val" if r.id in val else "train" for r in records}
    tuned = [Record(r.id, r.path, split[r.id], r.captions) for r in records]
    write_manifest(a.out, tuned)
    captions = (c.split() for r in tuned if r.split == "train" for c in r.captions)
    Vocabulary.build(captions, a.min_word_count).save(a.out / VOCAB_NAME)
    (a.out / "features").mkdir(parents=True, exist_ok=True)
    for store in (a.work / "features").glob("*.h5"):
        link = a.out / "features" / store.name
        if not link.exists():
            link.symlink_to(store.resolve())
    print({s: sum(r.split == s for r in tuned) for s in ("train", "val", "test")})


if __name__ == "__main__":
    main()
