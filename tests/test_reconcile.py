"""The pure step of finalize: what the final cache holds, from plain data (no HDF5, no files)."""

from __future__ import annotations

from featpipe.cache.reconcile import CHANGED, GONE, Existing, Record, plan

OLD, NEW = (100, 1), (120, 2)  # (size, mtime_ns) identities of a clip file
ONE_FILE = {"row_bytes": 10, "one_file_limit": 1 << 30}  # the features fit one file: rows sorted by key
PARTS = {"row_bytes": 10, "one_file_limit": 0}  # a cache in part files: old rows stay first


def existing(rows: dict, failed: dict | None = None, stale: dict | None = None) -> Existing:
    """A cache file holding ``rows`` (key -> identity) in that order, and ``failed`` (key -> (reason, identity))."""
    failed = failed or {}
    identity = {**rows, **{k: ident for k, (_, ident) in failed.items()}}
    return Existing(
        {k: i for i, k in enumerate(rows)}, {k: why for k, (why, _) in failed.items()}, identity, stale or {}
    )


def test_a_resumed_run_keeps_the_old_rows_and_adds_the_journal_rows():
    p = plan(existing({"a": OLD, "b": OLD}), [Record("c", None, OLD), Record("d", None, OLD)], **ONE_FILE)
    assert p.kept == {"a": 0, "b": 1} and p.new == ["c", "d"]
    assert p.order == ["a", "b", "c", "d"] and p.one_file
    assert p.failed == {} and p.stale == {} and p.dropped == {}
    assert p.identity == dict.fromkeys("abcd", OLD)


def test_a_clip_whose_file_changed_is_dropped_not_reused_and_its_re_extraction_is_taken():
    old = existing({"a": OLD, "b": OLD})
    p = plan(old, [], {"a": NEW, "b": OLD}, **ONE_FILE)
    assert p.order == ["b"] and p.dropped == {"a": CHANGED} and p.stale == {"a": CHANGED}
    assert (p.n_changed, p.n_dropped) == (1, 0)
    redone = plan(old, [Record("a", None, NEW)], {"a": NEW, "b": OLD}, **ONE_FILE)
    assert redone.order == ["a", "b"] and redone.new == ["a"] and "a" not in redone.kept
    assert redone.identity["a"] == NEW and redone.stale == {} and redone.dropped == {}


def test_a_clip_removed_from_the_dataset_is_dropped_and_its_failure_forgotten():
    old = existing({"a": OLD, "b": OLD}, failed={"x": ("no decodable frame", OLD), "y": ("too short", OLD)})
    p = plan(old, [], {"a": OLD, "y": OLD}, **ONE_FILE)
    assert p.order == ["a"] and p.dropped == {"b": GONE} and p.stale == {"b": GONE}
    assert (p.n_changed, p.n_dropped) == (0, 1)
    assert p.failed == {"y": "too short"}


def test_without_the_current_dataset_nothing_is_dropped():
    p = plan(existing({"a": OLD}, stale={"gone": GONE}), [Record("b", "no decodable frame", OLD)], **ONE_FILE)
    assert p.order == ["a"] and p.failed == {"b": "no decodable frame"} and p.stale == {"gone": GONE}


def test_an_interrupted_runs_duplicates_resolve_to_the_newest_record():
    journal = [
        Record("c", "no decodable frame", OLD),
        Record("d", None, OLD),
        Record("c", None, NEW),  # the resumed run extracted it
        Record("d", "no decodable frame", NEW),  # ... and this one failed the second time
    ]
    p = plan(existing({"a": OLD, "d": OLD}), journal, **ONE_FILE)
    assert p.order == ["a", "c"] and p.new == ["c"] and p.kept == {"a": 0}
    assert p.failed == {"d": "no decodable frame"} and p.identity["c"] == NEW and p.identity["d"] == NEW


def test_a_journal_row_replaces_an_old_failure_and_a_clip_that_has_a_row_again_is_not_stale():
    old = existing({"a": OLD}, failed={"b": ("no decodable frame", OLD)}, stale={"c": CHANGED})
    p = plan(old, [Record("b", None, NEW), Record("c", None, NEW)], {"a": OLD, "b": NEW, "c": NEW}, **ONE_FILE)
    assert p.order == ["a", "b", "c"] and p.failed == {} and p.stale == {}


def test_a_version_1_row_of_unknown_identity_is_trusted_and_takes_the_identity_it_has_now():
    p = plan(existing({"a": None, "b": None}), [], {"a": NEW, "b": None}, **ONE_FILE)
    assert p.order == ["a", "b"] and p.identity == {"a": NEW, "b": None} and p.dropped == {}


def test_rows_are_sorted_by_key_in_one_file_and_old_rows_keep_their_order_first_in_part_files():
    old = existing({"z": OLD, "b": OLD, "m": OLD})  # a cache in part files: rows in part order, not key order
    journal = [Record("y", None, OLD), Record("a", None, OLD), Record("m", None, NEW)]
    current = {k: OLD for k in "zbya"} | {"m": NEW}
    one = plan(old, journal, current, **ONE_FILE)
    assert one.one_file and one.order == ["a", "b", "m", "y", "z"]
    parted = plan(old, journal, current, **PARTS)
    assert not parted.one_file
    assert parted.order == ["z", "b", "a", "m", "y"], "old rows in their old order, then the journal's sorted"
    assert parted.kept == {"b": 1, "z": 0} and parted.new == ["a", "m", "y"]


def test_the_layout_is_one_file_while_the_rows_features_fit_the_limit():
    rows = {k: OLD for k in "abcd"}
    assert plan(existing(rows), [], row_bytes=10, one_file_limit=40).one_file
    assert not plan(existing(rows), [], row_bytes=10, one_file_limit=39).one_file
