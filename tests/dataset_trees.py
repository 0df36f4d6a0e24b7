"""Dataset trees for the indexing tests: zero-byte placeholder clips (indexing never decodes)."""

from __future__ import annotations

from pathlib import Path

from featpipe.video.records import Dataset


def touch(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def class_tree(root: Path, sizes: dict[str, int], ext: str = ".mp4") -> Path:
    for label, n in sizes.items():
        touch(root, *(f"{label}/{label}_{i:03d}{ext}" for i in range(n)))
    return root


def splits_of(ds: Dataset) -> dict[str, str]:
    return {r.video: r.split for r in ds.records}


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def ucf_tree(base: Path, *, lists_dir: str = ".", video_dir: str = ".", folds: tuple[int, ...] = (1,)) -> Path:
    """A miniature UCF101: 2 classes, 4 groups each, 3 clips per group; g01 is the test group."""
    classes = ["ApplyEyeMakeup", "Basketball"]
    lists = base / lists_dir
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(classes, 1)))
    train_lines, test_lines = [], []
    for number, cls in enumerate(classes, 1):
        for g in range(1, 5):
            for c in range(1, 4):
                rel = f"{cls}/v_{cls}_g{g:02d}_c{c:02d}.avi"
                touch(base / video_dir, rel)
                if g == 1:
                    test_lines.append(f"{rel}\r\n")
                else:
                    train_lines.append(f"{rel} {number}\r\n")
    for fold in folds:
        (lists / f"trainlist{fold:02d}.txt").write_text("".join(train_lines))
        (lists / f"testlist{fold:02d}.txt").write_text("".join(test_lines))
    return base
