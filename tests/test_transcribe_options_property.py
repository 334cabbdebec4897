"""A Hypothesis property over ``transcribe``'s options: any values give a result or whisper_lens' one-line error.

For arbitrary values of arbitrary options (finite and non-finite floats, numbers written as text,
None, negative and huge ints, tuples, booleans), ``transcribe`` on a short clip with the shipped
toy either returns a transcript with finite numbers, or raises a ``ValueError`` / ``TypeError``
from whisper_lens' own code, in one line naming the keyword. Never another exception (torch's,
numpy's), never NaN in the result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import whisper_lens as wl
from whisper_lens.loading import SHIPPED
from whisper_lens.options import TRANSCRIBE

PACKAGE = Path(wl.__file__).resolve().parent
SKIPPED = {"trace", "edits", "verbose", "progress", "batch_size"}  # tried elsewhere (test_bad_input, test_trace)
NAMES = [o.name for o in TRANSCRIBE if o.name not in SKIPPED]

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4),
    st.sampled_from([2**70, -(2**70), 10**3]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["0.5", "-1", "", "en", "transcribe", "pass", "0,0.5", "1:0", "nan", "None"]),
    st.tuples(st.floats(0, 1, width=16), st.floats(0, 1, width=16)),
    st.lists(st.integers(-2, 300), max_size=3),
    st.sampled_from([[(3, 1)], [(0, 1), (2, 2)], [(4, 0)], [(1.5, 0)], ((3, 1),), np.float32(0.5)]),
)


@pytest.fixture(scope="module")
def toy_and_clip():
    audio = wl.load_audio(SHIPPED["toy"] / "samples" / "sample1.wav")[:16000]  # 1 s: one window of the toy
    return wl.load_model("toy"), audio


def finite(t) -> bool:
    numbers = [x for s in t.segments for x in (s.start, s.end, s.avg_logprob, s.compression_ratio, s.no_speech_prob)]
    numbers += [x for s in t.segments for w in s.words for x in (w.start, w.end, w.probability)]
    return all(math.isfinite(x) for x in numbers)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(NAMES), VALUES, min_size=1, max_size=3))
@example(options={"suppress_tokens": True})  # found by this property: "'bool' object is not iterable"
@example(options={"seed": 2**70, "temperature": 0.5})  # torch's "Overflow when unpacking long long"
@example(options={"best_of": 2**70, "temperature": 0.5})  # a list of 2**70 decoder rows
def test_any_options_give_a_result_or_a_one_line_error(toy_and_clip, options):
    model, audio = toy_and_clip
    try:
        t = model.transcribe(audio, **options)
    except (ValueError, TypeError) as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = Path(tb.tb_frame.f_code.co_filename).resolve()
        assert where.is_relative_to(PACKAGE), f"{type(e).__name__} raised from {where}: {e}"
        message = str(e)
        assert "\n" not in message.strip(), message
        assert any(name in message for name in options), (options, message)  # names the keyword at fault
        return
    assert isinstance(t.text, str) and finite(t), (options, t)
