"""`featpipe info PATH`: describe a cache or a run directory."""

from __future__ import annotations

from pathlib import Path

from featpipe.cache.reader import summarize
from featpipe.cache.verify import missing_parts, verify_cache
from featpipe.errors import CacheError, DamagedCacheError, FeatpipeError
from featpipe.runs.rundir import check_model_file, read_run
from featpipe.training.inputs import cache_fingerprint


def info(path: str | Path, verify: bool = False) -> list[str]:
    """Describe a cache (.h5) or a run directory (or models/latest). Returns a list of text lines.

    With ``verify`` (caches only), every row of the features is read back and its checksum
    checked: the last line says "all N rows verified", or :class:`DamagedCacheError` (exit
    status 1) names the damaged clips. A cache written before checksums existed is read whole
    all the same, and the last line says it carries no checksum.
    """
    path = Path(path)
    if path.is_dir() or path.name == "latest":
        if verify:
            raise FeatpipeError(
                f"--verify checks a cache file; '{path}' is a run directory. "
                "Pass the cache it was trained on (`featpipe info RUN` names it)."
            )
        return _run_lines(path)
    return _cache_lines(path, verify)


def _cache_lines(path: Path, verify: bool) -> list[str]:
    if not path.exists():
        raise FeatpipeError(f"'{path}' does not exist; pass a cache file (.h5), a run directory or models/latest.")
    missing = missing_parts(path)  # also refuses a file that is not a featpipe cache, in one sentence
    if missing:
        raise CacheError(
            f"'{path}' is an incomplete featpipe cache: it lacks {', '.join(missing)}, which every cache "
            "featpipe finishes has; it was not written by `featpipe extract` or was damaged since. "
            "Re-extract into a new --output file."
        )
    lines = summarize(path).lines()
    if verify:
        report = verify_cache(path)
        if report.damaged:
            raise DamagedCacheError(report.line())
        lines.append("  " + report.line())
    return lines


def _cache_status(data) -> str:
    """Whether the run's training cache is still the one it was trained on (by fingerprint)."""
    cache = Path(data.cache)
    if not cache.is_file():
        return "no longer there"
    try:
        now = cache_fingerprint(cache)
    except FeatpipeError as exc:
        return f"unreadable now ({exc})"
    return "unchanged since training" if now == data.cache_fingerprint else f"CHANGED since training (now {now})"


def _run_lines(path: Path) -> list[str]:
    run, data = read_run(path)
    check_model_file(run, data)  # missing, or another run's model: one sentence, as for evaluate and predict
    pre, cfg, head = data.preprocessing, data.config, data.head
    if data.train_clips is None:
        identity = "not recorded (trained before run identity)"
    else:
        identity = f"{len(data.train_clips)} train clips, {len(data.val_clips or ())} validation clips"
    lines = [
        f"Run {run}: head {head.get('head')} (units {head.get('units')}, layers {head.get('layers')}, "
        f"dropout {head.get('dropout')}), trained {data.created or '?'} with featpipe {data.featpipe_version}, "
        f"keras {data.keras_version} ({data.keras_backend})",
        f"  classes ({len(data.class_names)}): {', '.join(data.class_names)}",
        f"  preprocessing: backbone {pre.get('backbone')} ({pre.get('weights')}, fingerprint "
        f"{pre.get('weights_fingerprint')}), "
        f"input {pre.get('input_size')}px, {pre.get('frames')} frames ({pre.get('sampling')})",
        f"  cache: {data.cache} (fingerprint {data.cache_fingerprint}, {_cache_status(data)}); "
        f"validation: {data.validation}",
        f"  identity: run {data.run_id or 'n/a'}, model sha256 {(data.model_sha256 or 'not recorded')[:16]}, "
        f"trained on {identity}",
        f"  training: epochs {data.epochs_run} (best {data.best_epoch}), batch {cfg.get('batch_size')}, "
        f"lr {cfg.get('lr')}, seed {cfg.get('seed')}, class weight {cfg.get('class_weight')}, "
        f"{'streamed' if data.streamed else 'in memory'}, {data.seconds}s"
        + (" (interrupted)" if data.interrupted else "")
        + (f" (stopped: {data.diverged})" if data.diverged else ""),
    ]
    for split, m in data.metrics.items():
        auc = m.get("roc_auc")
        lines.append(
            f"  {split}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, ROC AUC {auc:.3f}"
            if auc is not None
            else f"  {split}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, ROC AUC n/a"
        )
    return lines
