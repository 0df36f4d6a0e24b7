"""`featpipe info PATH`: describe a cache or a run directory."""

from __future__ import annotations

from pathlib import Path

from featpipe.errors import FeatpipeError


def info(path: str | Path) -> list[str]:
    """Describe a cache (.h5) or a run directory (or models/latest). Returns a list of text lines."""
    path = Path(path)
    if path.is_dir() or path.name == "latest":
        return _run_lines(path)
    from featpipe.cache import summarize

    return summarize(path).lines()


def _cache_status(data) -> str:
    """Whether the run's training cache is still the one it was trained on (by fingerprint)."""
    from featpipe.data import cache_fingerprint

    cache = Path(data.cache)
    if not cache.is_file():
        return "no longer there"
    try:
        now = cache_fingerprint(cache)
    except FeatpipeError as exc:
        return f"unreadable now ({exc})"
    return "unchanged since training" if now == data.cache_fingerprint else f"CHANGED since training (now {now})"


def _run_lines(path: Path) -> list[str]:
    from featpipe.runs import check_model_file, read_run

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
        f"  preprocessing: backbone {pre.get('backbone')} ({pre.get('weights')}, fingerprint {pre.get('weights_fingerprint')}), "
        f"input {pre.get('input_size')}px, {pre.get('frames')} frames ({pre.get('sampling')})",
        f"  cache: {data.cache} (fingerprint {data.cache_fingerprint}, {_cache_status(data)}); "
        f"validation: {data.validation}",
        f"  identity: run {data.run_id or 'n/a'}, model sha256 {(data.model_sha256 or 'not recorded')[:16]}, "
        f"trained on {identity}",
        f"  training: epochs {data.epochs_run} (best {data.best_epoch}), batch {cfg.get('batch_size')}, "
        f"lr {cfg.get('lr')}, seed {cfg.get('seed')}, class weight {cfg.get('class_weight')}, "
        f"{'streamed' if data.streamed else 'in memory'}, {data.seconds}s"
        + (" (interrupted)" if data.interrupted else ""),
    ]
    for split, m in data.metrics.items():
        auc = m.get("roc_auc")
        lines.append(f"  {split}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
                     f"ROC AUC {auc:.3f}" if auc is not None else f"  {split}: accuracy {m['accuracy']:.3f}, "
                     f"macro F1 {m['macro_f1']:.3f}, ROC AUC n/a")
    return lines
