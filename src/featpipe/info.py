"""`featpipe info PATH`: describe a cache or a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from featpipe.errors import CacheError, FeatpipeError


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
            raise FeatpipeError(f"--verify checks a cache file; '{path}' is a run directory. "
                                "Pass the cache it was trained on (`featpipe info RUN` names it).")
        return _run_lines(path)
    return _cache_lines(path, verify)


def _cache_lines(path: Path, verify: bool) -> list[str]:
    from featpipe.cache import DamagedCacheError, missing_parts, summarize, verify_cache

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


def _run_lines(path: Path) -> list[str]:
    from featpipe.train import resolve_run

    run = resolve_run(path)
    try:
        data = json.loads((run / "run.json").read_text())
    except ValueError as exc:
        raise FeatpipeError(f"'{run / 'run.json'}' is not valid JSON ({exc}); the run directory is damaged.") from exc
    pre, cfg, head = data.get("preprocessing", {}), data.get("config", {}), data.get("head", {})
    lines = [
        f"Run {run}: head {head.get('head')} (units {head.get('units')}, layers {head.get('layers')}, "
        f"dropout {head.get('dropout')}), trained {data.get('created', '?')} with featpipe {data.get('featpipe_version')}, "
        f"keras {data.get('keras_version')} ({data.get('keras_backend')})",
        f"  classes ({len(data.get('class_names', []))}): {', '.join(data.get('class_names', []))}",
        f"  preprocessing: backbone {pre.get('backbone')} ({pre.get('weights')}, fingerprint {pre.get('weights_fingerprint')}), "
        f"input {pre.get('input_size')}px, {pre.get('frames')} frames ({pre.get('sampling')})",
        f"  cache: {data.get('cache')} (fingerprint {data.get('cache_fingerprint')}); validation: {data.get('validation')}",
        f"  training: epochs {data.get('epochs_run')} (best {data.get('best_epoch')}), batch {cfg.get('batch_size')}, "
        f"lr {cfg.get('lr')}, seed {cfg.get('seed')}, class weight {cfg.get('class_weight')}, "
        f"{'streamed' if data.get('streamed') else 'in memory'}, {data.get('seconds')}s"
        + (" (interrupted)" if data.get("interrupted") else ""),
    ]
    for split, m in data.get("metrics", {}).items():
        auc = m.get("roc_auc")
        lines.append(f"  {split}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
                     f"ROC AUC {auc:.3f}" if auc is not None else f"  {split}: accuracy {m['accuracy']:.3f}, "
                     f"macro F1 {m['macro_f1']:.3f}, ROC AUC n/a")
    return lines
