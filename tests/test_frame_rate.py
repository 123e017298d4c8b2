"""Video clips are resampled in time to the family's training rate (LTX-Video 25 fps,
HunyuanVideo and Cosmos 24), so a 60 fps source is not trained as slow motion: real clips
encoded at 12/30/60 fps, decoded with PyAV."""
import math

import pytest

from kubelora_trainer.data import load_clip, pick_frames
from kubelora_trainer.families import RULES
from kubelora_trainer.synthetic import write_video

LEVEL0, STEP = 10, 8  # frame i of a source clip is a flat grey of LEVEL0 + STEP * i


def _graded_clip(path, n: int, fps: int):
    import numpy as np
    return write_video(path, [np.full((32, 32, 3), LEVEL0 + STEP * i, dtype=np.uint8) for i in range(n)], fps=fps)


def _source_index(clip, k: int) -> int:
    level = (float(clip[:, k].mean()) + 1.0) * 127.5
    return round((level - LEVEL0) / STEP)


def _nearest(x: float) -> int:
    return math.floor(x) if x - math.floor(x) <= 0.5 else math.ceil(x)


def test_family_training_rates():
    assert {t: RULES[t].fps for t in ("ltx-video", "hunyuan-video", "cosmos")} == \
        {"ltx-video": 25, "hunyuan-video": 24, "cosmos": 24}


@pytest.mark.parametrize("src_fps", [12, 30, 60])
@pytest.mark.parametrize("model_type", ["ltx-video", "hunyuan-video"])
def test_clip_resampled_to_the_training_rate(tmp_path, src_fps, model_type):
    fps, frames = RULES[model_type].fps, 9
    n_src = math.ceil(frames / fps * src_fps) + 2
    clip = load_clip(_graded_clip(tmp_path / "c.mp4", n_src, src_fps), 32, 32, frames, fps=fps)
    assert tuple(clip.shape) == (3, frames, 32, 32)
    got = [_source_index(clip, k) for k in range(frames)]
    assert got == [_nearest(k * src_fps / fps) for k in range(frames)], (src_fps, fps, got)
    # the clip spans the same time as at the source: (frames - 1) / fps seconds
    assert abs(got[-1] / src_fps - (frames - 1) / fps) <= 0.5 / src_fps


def test_too_short_after_resampling_names_the_field_and_duration(tmp_path):
    path = _graded_clip(tmp_path / "short.mp4", 10, 60)  # 1/6 s: 5 frames at 25 fps
    with pytest.raises(ValueError, match=r"dataset.frames.*0.36 s at the model's 25 fps"):
        load_clip(path, 32, 32, 9, fps=25)


def test_pick_frames_is_lazy_and_handles_variable_frame_rate():
    consumed = []

    def frames():
        for i, t in enumerate([0.0, 0.03, 0.05, 0.09, 0.2, 0.21, 0.4, 0.5, 0.6, 0.7]):
            consumed.append(i)
            yield t, i

    assert list(pick_frames(frames(), 3, fps=10)) == [0, 3, 4]  # at 0, 0.1, 0.2 s
    assert consumed == [0, 1, 2, 3, 4]  # stops at the frame that settles the last pick
    assert list(pick_frames(iter([(0.0, "a"), (0.5, "b")]), 2, fps=None)) == ["a", "b"]
    # the last frame stays on screen for one frame period
    assert list(pick_frames(iter([(0.0, "a"), (0.04, "b")]), 3, fps=25)) == ["a", "b"]
