"""The built-in synthetic dataset: small real MP4 clips whose classes differ only in frame order.

Four classes in two time-reversed pairs:

* ``grow`` / ``shrink``: a filled disc whose radius goes from small to large (``grow``) or
  from large to small (``shrink``);
* ``red_to_blue`` / ``blue_to_red``: a large disc whose colour fades from red to blue or
  from blue to red.

Within a pair every clip's parameters come from the same distribution and the second class is
the first one played backwards, so the *set* of frames of a clip has the same distribution in
both classes: a model that ignores frame order sits at chance within each pair (about 50 %
over the four classes), while a sequence model can learn all four. The disc is big (up to
about half of the centre square) so colour and area changes survive a CNN with global average
pooling.

Clips vary in length (6 to 80 frames: shorter and several times longer than the default
sequence length of 20), resolution and aspect ratio (160x120, 120x160 portrait, 192x108 wide,
128x128) and frame rate (10, 15, 24, 30 fps); every class gets a mix. Everything is drawn from
``numpy.random.default_rng(seed)``, so the same arguments give the same clips.

Layout: ``root/{train,val,test}/<class>/<class>_<split>_<NNN>.mp4`` plus the marker file
``root/.featpipe-sample.json`` that records the parameters and the files written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from featpipe.errors import DatasetError, FeatpipeError, NoSampleClips, OptionError, VideoError
from featpipe.names import DIFFICULTIES, SPLITS
from featpipe.options import check_int
from featpipe.runtime.atomic import write_text
from featpipe.video.decode import count_frames

__all__ = [
    "MARKER_NAME",
    "SAMPLE_CLASSES",
    "SPLITS",
    "ClipSpec",
    "DIFFICULTIES",
    "HardClipSpec",
    "hard_clip_specs",
    "SampleData",
    "render_clip",
    "sample_clip_specs",
    "write_sample_data",
]

SAMPLE_CLASSES = ("blue_to_red", "grow", "red_to_blue", "shrink")
MARKER_NAME = ".featpipe-sample.json"
GENERATOR = "featpipe.sample_data"
GENERATOR_VERSION = 1

# (width, height): landscape 4:3, portrait 3:4, wide 16:9, square. All even (the MPEG-4
# writer rounds odd sizes down).
RESOLUTIONS = ((160, 120), (120, 160), (192, 108), (128, 128))
FRAME_RATES = (10.0, 15.0, 24.0, 30.0)
# Inclusive length ranges. None contains 20 (the default sequence length), so every clip is
# clearly shorter or longer than it; 2 of the 5 buckets are shorter.
LENGTH_BUCKETS = ((6, 12), (13, 19), (21, 34), (35, 54), (55, 80))

# Which class plays the other one's clips backwards, and what varies.
_FORWARD = {"grow": "size", "shrink": "size", "red_to_blue": "colour", "blue_to_red": "colour"}
_REVERSED = {"shrink", "blue_to_red"}
_FOURCC = "mp4v"


@dataclass(frozen=True)
class SampleData:
    """What :func:`write_sample_data` wrote (or found already written)."""

    root: Path
    n_clips: int
    class_names: tuple[str, ...]
    counts: dict[str, int]  # split -> number of clips in that split (all classes)


@dataclass(frozen=True)
class _ClipBase:
    """The fields both presets' clips start with: the slot :func:`_clip_slots` gives (split,
    class, name, length, size, frame rate), then the target disc :func:`_draw_target` draws
    (radii as fractions of the centre square's side, colours BGR, in forward time)."""

    split: str
    class_name: str
    index: int  # within (split, class)
    relpath: str  # relative to the dataset root, with "/" separators
    n_frames: int
    width: int
    height: int
    fps: float
    radius_start: float
    radius_end: float
    color_start: tuple[int, int, int]
    color_end: tuple[int, int, int]


@dataclass(frozen=True)
class ClipSpec(_ClipBase):
    """Every parameter of one synthetic clip. Sizes are fractions of the centre square's side;
    colours are BGR. The clip is rendered "forward" (small to large, red to blue) and played
    backwards when ``reverse`` is set. The fields of :class:`_ClipBase` come first."""

    offset: tuple[float, float]  # disc centre offset (x, y) from the frame centre
    background: tuple[int, int, int]
    noise: float  # standard deviation of the per-frame Gaussian noise, in grey levels
    noise_seed: int
    reverse: bool


# Clips per class and split: a bound so that a typo (``--train 1000000000``) is refused at once
# instead of growing memory with no output (10,000 is 120,000 clips, about 10 GB of video).
MAX_CLIPS_PER_CLASS = 10_000


def _check_counts(train: int, val: int, test: int, seed: int = 0) -> None:
    """Every option of the generator, checked once (API and CLI alike) before anything is written."""
    for name, value in (("train", train), ("val", val), ("test", test)):
        check_int(name, value, 0, MAX_CLIPS_PER_CLASS, hint="It counts clips per class in that split.")
    check_int("seed", seed, 0)
    if train + val + test == 0:
        raise NoSampleClips()


def _hue_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated BGR colour that is neither red nor blue (hue 25..190 degrees)."""
    hue = rng.uniform(25.0, 190.0) / 2.0  # OpenCV hue is 0..180
    sat = rng.uniform(0.65, 1.0) * 255.0
    val = rng.uniform(0.8, 1.0) * 255.0
    hsv = np.array([[[hue, sat, val]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


@dataclass(frozen=True)
class _TargetRanges:
    """A preset's ranges for the target disc: radii as fractions of the centre square's side,
    colour channels as ``rng.integers`` bounds (low inclusive, high exclusive)."""

    grow_start: tuple[float, float]  # radius at the small end of grow/shrink
    grow_end: tuple[float, float]  # radius at the large end of grow/shrink
    fade_radius: tuple[float, float]  # the constant radius of red_to_blue/blue_to_red
    dim: tuple[int, int]  # the weak channels of the red and the blue end
    bright: tuple[int, int]  # the strong channel of the red and the blue end


_EASY_TARGET = _TargetRanges(
    grow_start=(0.08, 0.14), grow_end=(0.38, 0.45), fade_radius=(0.30, 0.42), dim=(0, 41), bright=(200, 256)
)
_HARD_TARGET = _TargetRanges(
    grow_start=(0.06, 0.12), grow_end=(0.26, 0.34), fade_radius=(0.18, 0.28), dim=(0, 71), bright=(170, 256)
)


def _draw_target(rng: np.random.Generator, class_name: str, ranges: _TargetRanges) -> tuple:
    """``(radius_start, radius_end, color_start, color_end)`` of one clip's disc, in forward time.

    :func:`_clip_slots` draws these for both presets right after a clip's length, with the same
    calls in the same order; only the ranges differ.
    """
    if _FORWARD[class_name] == "size":
        radius_start = float(rng.uniform(*ranges.grow_start))
        radius_end = float(rng.uniform(*ranges.grow_end))
        color_start = color_end = _hue_colour(rng)
    else:
        radius_start = radius_end = float(rng.uniform(*ranges.fade_radius))
        red = rng.integers(*ranges.dim), rng.integers(*ranges.dim), rng.integers(*ranges.bright)
        blue = rng.integers(*ranges.bright), rng.integers(*ranges.dim), rng.integers(*ranges.dim)
        color_start = tuple(int(v) for v in red)
        color_end = tuple(int(v) for v in blue)
    return radius_start, radius_end, color_start, color_end


def _clip_slots(
    rng: np.random.Generator, counts: tuple[int, int, int], length_buckets, target: _TargetRanges
) -> Iterator[dict]:
    """The fields of :class:`_ClipBase` for every clip of a preset, one dict a clip.

    ``counts`` are clips per class in train, val and test. For each class, resolution, frame rate
    and length bucket cycle through all their values in a seeded random order (so even 4 clips
    per class mix them); the exact length and then the target disc (:func:`_draw_target`) are
    drawn at random. A generator: the caller draws its own parameters from ``rng`` before asking
    for the next clip, so every preset keeps one fixed order of draws.
    """
    per_split = dict(zip(SPLITS, (int(n) for n in counts)))
    for class_name in SAMPLE_CLASSES:
        res_order = rng.permutation(len(RESOLUTIONS))
        fps_order = rng.permutation(len(FRAME_RATES))
        len_order = rng.permutation(len(length_buckets))
        j = 0  # clip counter within the class, across splits
        for split in SPLITS:
            for index in range(per_split[split]):
                width, height = RESOLUTIONS[res_order[j % len(RESOLUTIONS)]]
                fps = FRAME_RATES[fps_order[j % len(FRAME_RATES)]]
                low, high = length_buckets[len_order[j % len(length_buckets)]]
                slot = dict(
                    split=split,
                    class_name=class_name,
                    index=index,
                    relpath=f"{split}/{class_name}/{class_name}_{split}_{index:03d}.mp4",
                    n_frames=int(rng.integers(low, high + 1)),
                    width=width,
                    height=height,
                    fps=fps,
                )
                radius_start, radius_end, color_start, color_end = _draw_target(rng, class_name, target)
                yield dict(
                    slot, radius_start=radius_start, radius_end=radius_end, color_start=color_start, color_end=color_end
                )
                j += 1


def sample_clip_specs(train: int = 16, val: int = 6, test: int = 6, seed: int = 0) -> list[ClipSpec]:
    """The parameters of every clip :func:`write_sample_data` writes, without writing anything.

    Deterministic in its arguments (see :func:`_clip_slots` for sizes, rates and lengths); the
    drawing parameters are drawn at random. Both classes of a pair use the same procedure, so
    their parameters have the same distribution.
    """
    _check_counts(train, val, test, seed)
    rng = np.random.default_rng(seed)
    specs: list[ClipSpec] = []
    for common in _clip_slots(rng, (train, val, test), LENGTH_BUCKETS, _EASY_TARGET):
        # Keep the whole disc inside the centre square (what the centre crop keeps).
        jitter = max(0.0, 0.48 - max(common["radius_start"], common["radius_end"]))
        offset = (float(rng.uniform(-jitter, jitter)), float(rng.uniform(-jitter, jitter)))
        grey = rng.uniform(35.0, 95.0)
        background = tuple(int(np.clip(grey + rng.uniform(-20.0, 20.0), 0, 255)) for _ in range(3))
        specs.append(
            ClipSpec(
                **common,
                offset=offset,
                background=background,
                noise=float(rng.uniform(1.5, 4.0)),
                noise_seed=int(rng.integers(0, 2**31 - 1)),
                reverse=common["class_name"] in _REVERSED,
            )
        )
    return specs


def render_clip(spec: ClipSpec) -> Iterator[np.ndarray]:
    """Yield the BGR uint8 frames of ``spec`` (a :class:`ClipSpec` or :class:`HardClipSpec`) in playing order."""
    if isinstance(spec, HardClipSpec):
        yield from _render_hard(spec)
        return
    side = min(spec.width, spec.height)
    shift = 4  # sub-pixel precision for cv2.circle: smooth radius and position
    scale = 1 << shift
    cx = (spec.width / 2.0 + spec.offset[0] * side) * scale
    cy = (spec.height / 2.0 + spec.offset[1] * side) * scale
    centre = (int(round(cx)), int(round(cy)))
    start, end = np.array(spec.color_start, float), np.array(spec.color_end, float)
    background = np.empty((spec.height, spec.width, 3), np.float32)
    background[...] = spec.background
    last = max(spec.n_frames - 1, 1)
    for t in range(spec.n_frames):
        # ``tau`` is the forward time of the frame shown at ``t``; the noise belongs to ``tau``
        # too, so a reversed clip is exactly its forward clip played backwards.
        tau = spec.n_frames - 1 - t if spec.reverse else t
        a = tau / last
        rng = np.random.default_rng([spec.noise_seed, tau])
        radius = (spec.radius_start + (spec.radius_end - spec.radius_start) * a) * side
        colour = tuple(float(v) for v in start + (end - start) * a)
        frame = background.copy()
        cv2.circle(frame, centre, int(round(radius * scale)), colour, -1, cv2.LINE_AA, shift)
        frame += rng.normal(0.0, spec.noise, size=frame.shape).astype(np.float32)
        yield np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def _write_clip(spec: ClipSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*_FOURCC), spec.fps, (spec.width, spec.height))
    if not writer.isOpened():
        raise FeatpipeError(
            f"cannot write the sample clip {path}: OpenCV's video writer did not open with the "
            f"{_FOURCC!r} codec. Install an OpenCV build with FFmpeg (opencv-python-headless) "
            "and check that the folder is writable."
        )
    try:
        for frame in render_clip(spec):
            writer.write(frame)
    finally:
        writer.release()
    try:
        decoded = count_frames(path)
    except VideoError as exc:
        raise FeatpipeError(f"the sample clip just written cannot be read back: {exc}") from exc
    if decoded != spec.n_frames:
        raise FeatpipeError(
            f"the sample clip {path} was written with {spec.n_frames} frames but {decoded} "
            "decode; this OpenCV build's MPEG-4 writer is not usable for the sample data."
        )


def _params(train: int, val: int, test: int, seed: int) -> dict:
    return {"train": int(train), "val": int(val), "test": int(test), "seed": int(seed)}


def _read_marker(root: Path) -> dict | None:
    """The marker's content when it is a featpipe sample marker, else None."""
    marker = root / MARKER_NAME
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("generator") != GENERATOR:
        return None
    return content


def _write_marker(root: Path, params: dict, specs: list[ClipSpec], complete: bool, folders: list[str]) -> None:
    """``files`` and ``folders`` are what :func:`_remove_owned` may delete later: the clips the
    generator writes and the folders it created for them (never one that existed before)."""
    content = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": params,
        "classes": list(SAMPLE_CLASSES),
        "complete": complete,
        "files": [spec.relpath for spec in specs],
        "folders": folders,
        "clips": [asdict(spec) for spec in specs] if complete else [],
    }
    write_text(root / MARKER_NAME, json.dumps(content, indent=1) + "\n", tmp=root / (MARKER_NAME + ".tmp"))


def _is_complete(root: Path, marker: dict, params: dict) -> bool:
    if marker.get("version") != GENERATOR_VERSION or marker.get("params") != params:
        return False
    if marker.get("complete") is not True:
        return False
    files = marker.get("files")
    if not isinstance(files, list):
        return False
    for rel in files:
        path = root / rel
        if not path.is_file() or path.stat().st_size == 0:
            return False
    return True


# The only paths the generator ever writes: a marker naming anything else (edited, or not ours)
# never makes it delete that.
_OWNED_FILE = re.compile(rf"^({'|'.join(SPLITS)})/({'|'.join(SAMPLE_CLASSES)})/\2_\1_[0-9]{{3,}}\.mp4$")
_OWNED_FOLDER = re.compile(rf"^({'|'.join(SPLITS)})(/({'|'.join(SAMPLE_CLASSES)}))?$")


def _remove_owned(root: Path, marker: dict | None) -> None:
    """Delete exactly what the marker says the generator wrote: its clips, then the folders it
    created for them once they are empty, then the marker. A file or folder of the user's (a
    class folder of their own, notes beside the clips) is never touched, even inside a split
    folder of the generator's: that folder then stays."""
    files = marker.get("files") if marker else None
    for rel in files if isinstance(files, list) else []:
        if not isinstance(rel, str) or not _OWNED_FILE.match(rel):
            continue
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
    folders = marker.get("folders") if marker else None
    if not isinstance(folders, list):  # a marker of featpipe <= 0.x: the folders of its files
        owned = [rel for rel in files or [] if isinstance(rel, str) and _OWNED_FILE.match(rel)]
        folders = sorted({str(Path(rel).parent) for rel in owned} | {rel.split("/")[0] for rel in owned})
    for rel in sorted((f for f in folders if isinstance(f, str) and _OWNED_FOLDER.match(f)), key=len, reverse=True):
        path = root / rel
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    if marker is not None:
        for name in (MARKER_NAME, MARKER_NAME + ".tmp"):
            if (root / name).is_file():
                (root / name).unlink()


def _folders_to_create(root: Path, specs: list[ClipSpec]) -> list[str]:
    """The folders (relative, "/"-separated) that writing ``specs`` creates: the ones not there yet."""
    wanted = set()
    for spec in specs:
        split, class_name, _ = spec.relpath.split("/")
        wanted.update((split, f"{split}/{class_name}"))
    return sorted(rel for rel in wanted if not (root / rel).exists())


def write_sample_data(
    root: str | Path = "data",
    *,
    train: int = 16,
    val: int = 6,
    test: int = 6,
    seed: int = 0,
    overwrite: bool = False,
    difficulty: str = "easy",
) -> SampleData:
    """Write the synthetic dataset to ``root`` (``train``/``val``/``test`` clips per class).

    Returns at once, rewriting nothing, when ``root`` already holds complete sample data
    written with the same parameters. Raises :class:`DatasetError` when ``root`` is a file, or
    a non-empty folder that is not sample data or holds sample data with other parameters,
    unless ``overwrite`` is set. Only what the marker lists is ever deleted: the clips the
    generator wrote and the folders it created for them once they are empty; a file or folder
    of the user's (a class folder of their own, notes) is never deleted or replaced, and a
    file of theirs where a clip would go is refused with :class:`DatasetError`. A folder whose
    marker says an earlier write did not finish is rewritten without ``overwrite``: its files
    are the generator's. Raises :class:`~featpipe.errors.OptionError` (a ``ValueError``) for a
    negative or too large count (at most ``MAX_CLIPS_PER_CLASS``), all-zero counts or a
    negative seed, before anything is written.
    """
    specs = _specs_for(difficulty, train, val, test, seed)
    params = _params(train, val, test, seed)
    if difficulty != "easy":  # easy markers stay as they were: existing sample folders are still recognised
        params["difficulty"] = difficulty
    root = Path(root)
    result = SampleData(
        root=root,
        n_clips=len(specs),
        class_names=SAMPLE_CLASSES,
        counts={split: params[split] * len(SAMPLE_CLASSES) for split in SPLITS},
    )

    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: choose another folder for the sample data.")
    if root.is_dir() and any(root.iterdir()):
        marker = _read_marker(root)
        if marker is not None and _is_complete(root, marker, params):
            return result
        finished_elsewhere = marker is not None and marker.get("complete") is True and marker.get("params") != params
        if marker is None or finished_elsewhere:
            if not overwrite:
                if marker is None:
                    what = "is not empty and does not hold featpipe sample data"
                    how = "write the sample data beside its files"
                else:
                    what = f"holds featpipe sample data written with other parameters ({marker.get('params')})"
                    how = f"replace the clips {MARKER_NAME} lists"
                raise DatasetError(
                    f"{root} {what}; choose another folder, or pass --overwrite to {how} (featpipe deletes "
                    "or replaces only files it wrote, never yours)."
                )
        _remove_owned(root, marker)
        for spec in specs:  # a file of the user's where a clip goes is never replaced
            path = root / spec.relpath
            if path.exists() or path.is_symlink():
                raise DatasetError(
                    f"{path} is in the way of a sample clip and featpipe did not write it (it is not listed in "
                    f"{root / MARKER_NAME}); move it away or choose another folder."
                )

    root.mkdir(parents=True, exist_ok=True)
    folders = _folders_to_create(root, specs)
    _write_marker(root, params, specs, complete=False, folders=folders)
    for spec in specs:
        _write_clip(spec, root / spec.relpath)
    _write_marker(root, params, specs, complete=True, folders=folders)
    return result


# --------------------------------------------------------------------------------------------
# The hard preset (`featpipe sample-data --difficulty hard`): the same four classes in the same
# time-reversed pairs, made hard the way real footage is hard. Quality claims in the tests and
# the head table in docs/results.md are measured on it; the easy set above stays the demo's.
# --------------------------------------------------------------------------------------------

# 6 to 150 frames: short clips (fewer real frames than the default 20) up to clips 7x longer.
HARD_LENGTH_BUCKETS = ((6, 12), (13, 24), (25, 50), (51, 100), (101, 150))


@dataclass(frozen=True)
class HardClipSpec(_ClipBase):
    """Every parameter of one clip of the hard preset. Positions and sizes are fractions of the
    centre square's side (positions relative to the frame centre); colours are BGR. As in
    :class:`ClipSpec`, the clip is rendered forward and played backwards when ``reverse`` is set:
    every moving part (target path, background drift, distractors) is reversed with it, so the
    SET of frames of a clip has the same distribution in both classes of a pair. The fields of
    :class:`_ClipBase` come first."""

    path_start: tuple[float, float]  # the target moves in a straight line from here ...
    path_end: tuple[float, float]  # ... to here over the clip (forward time)
    background: tuple[int, int, int]  # base colour of a smooth random texture
    texture: float  # texture amplitude in grey levels
    drift: tuple[float, float]  # background shift over the whole clip (fractions of the side)
    distractors: tuple  # ((size, colour_a, colour_b, start xy, end xy), ...): moving squares
    noise: float  # per-frame Gaussian noise (grey levels)
    flicker: float  # per-frame brightness gain jitter (standard deviation of the gain)
    noise_seed: int
    reverse: bool


def _any_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(30, 256, size=3))


def hard_clip_specs(train: int = 16, val: int = 6, test: int = 6, seed: int = 0) -> list[HardClipSpec]:
    """The parameters of every clip of the hard preset (deterministic in its arguments)."""
    _check_counts(train, val, test, seed)
    rng = np.random.default_rng([seed, 2])  # a different stream from the easy set's
    specs: list[HardClipSpec] = []
    for common in _clip_slots(rng, (train, val, test), HARD_LENGTH_BUCKETS, _HARD_TARGET):
        reach = max(0.0, 0.48 - max(common["radius_start"], common["radius_end"]))
        path_start = tuple(float(v) for v in rng.uniform(-reach, reach, size=2))
        path_end = tuple(float(v) for v in rng.uniform(-reach, reach, size=2))
        grey = rng.uniform(30.0, 150.0)
        background = tuple(int(np.clip(grey + rng.uniform(-35.0, 35.0), 0, 255)) for _ in range(3))
        distractors = tuple(
            (
                float(rng.uniform(0.07, 0.16)),
                _any_colour(rng),
                _any_colour(rng),
                tuple(float(v) for v in rng.uniform(-0.45, 0.45, size=2)),
                tuple(float(v) for v in rng.uniform(-0.45, 0.45, size=2)),
            )
            for _ in range(int(rng.integers(1, 4)))
        )
        specs.append(
            HardClipSpec(
                **common,
                path_start=path_start,
                path_end=path_end,
                background=background,
                texture=float(rng.uniform(10.0, 35.0)),
                drift=tuple(float(v) for v in rng.uniform(-0.15, 0.15, size=2)),
                distractors=distractors,
                noise=float(rng.uniform(6.0, 14.0)),
                flicker=float(rng.uniform(0.02, 0.06)),
                noise_seed=int(rng.integers(0, 2**31 - 1)),
                reverse=common["class_name"] in _REVERSED,
            )
        )
    return specs


def _specs_for(difficulty: str, train: int, val: int, test: int, seed: int) -> list:
    """The clip parameters of a preset: ``easy`` (the demo's) or ``hard``."""
    if difficulty not in DIFFICULTIES:
        raise OptionError("difficulty", f"must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}.")
    if difficulty == "hard":
        return hard_clip_specs(train, val, test, seed)
    return sample_clip_specs(train, val, test, seed)


def _render_hard(spec: HardClipSpec) -> Iterator[np.ndarray]:
    """Yield the BGR uint8 frames of a hard-preset clip in playing order."""
    side = min(spec.width, spec.height)
    shift = 4
    scale = 1 << shift
    texture_rng = np.random.default_rng([spec.noise_seed, 1 << 20])
    margin = int(np.ceil(0.16 * side)) + 1  # room for the drift
    coarse = texture_rng.normal(0.0, 1.0, size=(6, 6, 3)).astype(np.float32)
    big = cv2.resize(coarse, (spec.width + 2 * margin, spec.height + 2 * margin), interpolation=cv2.INTER_CUBIC)
    big = np.asarray(spec.background, np.float32) + spec.texture * big
    start, end = np.array(spec.color_start, float), np.array(spec.color_end, float)
    last = max(spec.n_frames - 1, 1)

    def point(xy) -> tuple[int, int]:
        return (
            int(round((spec.width / 2.0 + xy[0] * side) * scale)),
            int(round((spec.height / 2.0 + xy[1] * side) * scale)),
        )

    for t in range(spec.n_frames):
        tau = spec.n_frames - 1 - t if spec.reverse else t
        a = tau / last
        rng = np.random.default_rng([spec.noise_seed, tau])
        dx, dy = (int(round(margin + spec.drift[k] * side * (a - 0.5))) for k in range(2))
        frame = np.ascontiguousarray(big[dy : dy + spec.height, dx : dx + spec.width])
        centre = point(np.array(spec.path_start) + (np.array(spec.path_end) - np.array(spec.path_start)) * a)
        radius = (spec.radius_start + (spec.radius_end - spec.radius_start) * a) * side
        colour = tuple(float(v) for v in start + (end - start) * a)
        cv2.circle(frame, centre, int(round(radius * scale)), colour, -1, cv2.LINE_AA, shift)
        for size, colour_a, colour_b, xy0, xy1 in spec.distractors:  # drawn over the target: occlusions
            c = np.array(xy0) + (np.array(xy1) - np.array(xy0)) * a
            x0, y0 = point(c - size / 2.0)
            x1, y1 = point(c + size / 2.0)
            col = tuple(float(v) for v in np.array(colour_a, float) + (np.array(colour_b, float) - colour_a) * a)
            cv2.rectangle(frame, (x0, y0), (x1, y1), col, -1, cv2.LINE_AA, shift)
        gain = 1.0 + spec.flicker * float(rng.normal())
        frame = frame * gain + rng.normal(0.0, spec.noise, size=frame.shape).astype(np.float32)
        yield np.clip(frame + 0.5, 0, 255).astype(np.uint8)
