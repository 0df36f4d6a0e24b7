"""Train every head on the same cache and print the README's accuracy table.

    python bench/heads_table.py --cache cache/inceptionv3.h5 --raw-cache cache/raw.h5

Feature heads (gru, lstm, bilstm, attention, transformer, mean) train on ``--cache``; the
end-to-end ``cnn-lstm`` trains on ``--raw-cache`` (``featpipe extract --backbone raw --size 64``).
Besides accuracy and macro F1 on the test split, the table shows "order pairs": on the sample
data's time-reversed class pairs (grow/shrink, red_to_blue/blue_to_red), the share of a pair's
clips that were given the right direction among those predicted inside the pair. 0.5 is
chance: an order-blind model (mean) must sit there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

PAIRS = (("blue_to_red", "red_to_blue"), ("grow", "shrink"))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--raw-cache", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default="gru,lstm,bilstm,attention,transformer,mean")
    args = ap.parse_args()

    from featpipe.cache import read_config
    from featpipe.train import train

    jobs = [(h, args.cache) for h in args.heads.split(",")]
    if args.raw_cache:
        jobs.append(("cnn-lstm", args.raw_cache))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for head, cache in jobs:
            r = train(cache=cache, rnn=head, seed=args.seed, out=Path(tmp) / head, quiet=True)
            test = r.metrics["test"]
            cfg = read_config(cache)
            pair = order_pair_accuracy(test)
            rows.append((head, f"{cfg.backbone} {cfg.input_size}px", test["accuracy"], test["macro_f1"],
                         pair, r.best_epoch, r.epochs_run, r.seconds))
            print(f"{head}: test accuracy {test['accuracy']:.3f}", flush=True)
    print()
    print("| head | features | test accuracy | macro F1 | order pairs | best epoch / run | train time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for head, feats, acc, f1, pair, best, run, secs in rows:
        pair_s = f"{pair:.2f}" if pair is not None else "n/a"
        print(f"| `{head}` | {feats} | {acc:.3f} | {f1:.3f} | {pair_s} | {best} / {run} | {secs:.0f} s |")


if __name__ == "__main__":
    main()
