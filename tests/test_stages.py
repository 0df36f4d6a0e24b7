"""The stages extract, predict and the Ray engine share: a clip's error is a record, with its reason."""

from __future__ import annotations

from featpipe.errors import VideoError
from featpipe.extraction.stages import decode


def test_a_clip_the_file_system_refuses_is_an_error_with_its_reason_and_the_others_go_on():
    def read(item):
        if item == "denied.mp4":
            raise PermissionError(13, "Permission denied", "/data/denied.mp4")
        if item == "silent.mp4":
            raise VideoError("")
        return []

    done = list(decode(["denied.mp4", "silent.mp4", "ok.mp4"], read, 2))
    assert [d.item for d in done] == ["denied.mp4", "silent.mp4", "ok.mp4"]
    assert done[0].error == "cannot read video file /data/denied.mp4: permission denied."
    assert done[1].error, "a failed clip is never listed with an empty reason"
    assert done[2].error is None
