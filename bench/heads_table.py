"""Train every head over several seeds at several train-set sizes of one cache; print docs/results.md's table.

    featpipe sample-data data-hard --difficulty hard --train 48 --val 8 --test 16
    featpipe extract --backbone vgg16 --size 64 --weights none --data data-hard --output cache/hard.h5
    python bench/heads_table.py --cache cache/hard.h5 --sizes 16,48 --seeds 5 [--tune-best models/tune-hard/best.json]

For each size N, the cache is copied with all but N train clips per class (a seeded choice, the same
for every head and seed) moved out of the train split; val and test stay whole. Every head is trained
with `featpipe train` defaults (plus ``--tune-best``'s configuration, and featpipe.linear_probe: logistic
regression on the means of 4 temporal segments of the standardised real frames), once per seed, and
the table shows test accuracy mean +/- std over the seeds and "order pairs": on the sample data's
time-reversed class pairs, the share of a pair's clips given the right direction among those predicted
inside the pair. 0.5 is chance: an order-blind model (mean) must sit there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

PAIRS = (("blue_to_red", "red_to_blue"), ("grow", "shrink"))
HEADS = "gru,lstm,bilstm,attention,transformer,mean,segments"


def order_pair_accuracy(metrics: dict) -> float | None:
    names = metrics["class_names"]
    cm = np.array(metrics["confusion_matrix"])
    right = total = 0
    for a, b in PAIRS:
        if a not in names or b not in names:
            return None
        idx = [names.index(a), names.index(b)]
        block = cm[np.ix_(idx, idx)]
        right += np.trace(block)
        total += block.sum()
    return right / total if total else None


def subset_cache(src: Path, dst: Path, per_class: int, seed: int = 0) -> Path:
    """A copy of ``src`` whose train split keeps ``per_class`` clips per class (others become 'unused')."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        split = f["split"].asstr()[:].astype(str)
        label = f["label"][:]
        rng = np.random.default_rng(seed)
        new = split.copy()
        for c in np.unique(label):
            rows = np.flatnonzero((split == "train") & (label == c))
            new[rng.permutation(rows)[per_class:]] = "unused"
        f["split"][...] = new.astype(object)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--sizes", default="16,48", help="train clips per class, comma-separated")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--heads", default=HEADS)
    ap.add_argument("--tune-best", type=Path, help="best.json of `featpipe tune`: its configuration gets a row")
    ap.add_argument("--no-linear-probe", action="store_true")
    ap.add_argument("--json", type=Path, help="also write every result here")
    args = ap.parse_args()

    from featpipe.training.baselines import linear_probe
    from featpipe.training.train import train

    configs = [(h, {"rnn": h}) for h in args.heads.split(",") if h]
    if args.tune_best:
        best = json.loads(args.tune_best.read_text())["best"]["params"]
        configs.append(("tune best", dict(best)))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            cache = subset_cache(args.cache, Path(tmp) / f"n{size}.h5", size)
            jobs = list(configs) + ([] if args.no_linear_probe else [("linear probe", None)])
            for name, cfg in jobs:
                accs, pairs, secs = [], [], []
                for seed in range(args.seeds):
                    started = time.perf_counter()
                    if cfg is None:
                        test = linear_probe(cache)  # deterministic: the same for every seed
                    else:
                        r = train(cache=cache, seed=seed, out=Path(tmp) / f"{name}-{size}-{seed}", quiet=True, **cfg)
                        test = r.metrics["test"]
                        shutil.rmtree(r.run_dir, ignore_errors=True)
                    secs.append(time.perf_counter() - started)
                    accs.append(test["accuracy"])
                    pairs.append(order_pair_accuracy(test))
                results[(name, size)] = (accs, pairs, secs)
                print(
                    f"{name} n={size}: {np.mean(accs):.3f} +- {np.std(accs):.3f} {[round(a, 3) for a in accs]}",
                    flush=True,
                )
    sizes = sorted({s for _, s in results})
    print()
    print(
        "| head | "
        + " | ".join(f"test accuracy, {s} train/class" for s in sizes)
        + " | order pairs (smallest size) | train time (largest size) |"
    )
    print("|---|" + "---:|" * len(sizes) + "---:|---:|")
    for name in dict.fromkeys(n for n, _ in results):
        cells = []
        for s in sizes:
            accs = results[(name, s)][0]
            cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f}")
        pairs = [p for p in results[(name, sizes[0])][1] if p is not None]
        pair_s = f"{np.mean(pairs):.2f}" if pairs else "n/a"
        secs = np.mean(results[(name, sizes[-1])][2])
        label = f"`{name}`" if name in HEADS.split(",") else name
        print(f"| {label} | " + " | ".join(cells) + f" | {pair_s} | {secs:.0f} s |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {f"{n}@{s}": {"accuracy": v[0], "order_pairs": v[1], "seconds": v[2]} for (n, s), v in results.items()},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
