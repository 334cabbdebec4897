"""Batched decoding for Whisper: greedy, temperature sampling and beam search over a static KV cache.

How Whisper decodes
-------------------
The decoder is a language model conditioned on the audio. It is started with a short *prompt*
of special tokens, the "start of transcript" (sot) sequence, which tells it what to do::

    [<|startofprev|> previous text ...]  <|startoftranscript|> <|fr|> <|transcribe|> [<|notimestamps|>] [prefix ...]

- ``<|startofprev|>`` + text (optional): the transcript of the previous 30 s window, so that the
  model keeps names and style consistent. It may use at most half the text context.
- ``<|startoftranscript|>`` (sot): where the transcript begins. The token predicted *at* sot is the
  language token, so the distribution there, restricted to language tokens, is Whisper's language
  identification; the probability of ``<|nospeech|>`` there is its voice-activity detector
  (``no_speech_prob``).
- the language and the task (``<|transcribe|>`` or ``<|translate|>`` into English); English-only
  models (``*.en``) have neither slot.
- ``<|notimestamps|>`` asks for text only. Without it the model writes segment timestamps
  ``<|1.24|>`` (20 ms steps) around pieces of text.
- a prefix (optional): text the transcript is forced to begin with.

Then tokens are chosen one by one until ``<|endoftext|>`` (EOT). Before choosing, *logit filters*
forbid tokens the model must not emit:

- suppress tokens: special tokens that are prompts, not outputs (sot, the task tokens, startofprev,
  startoflm, nospeech), and with ``"-1"`` the non-speech symbols (speaker tags, music notes,
  brackets) so that only what is said is written.
- suppress blank: at the first step, a lone space or EOT. A transcript that is empty or starts with
  a bare space is a degenerate answer the model gives a high probability to on hard audio.
- timestamp rules (timestamp mode): timestamps come in pairs (end of one segment, start of the next)
  except directly before EOT, so after one timestamp that closes a pair no second may follow, and
  after a lone timestamp only another timestamp or EOT may follow; timestamps never decrease and a
  segment cannot be empty; the first token must be a timestamp no later than
  ``max_initial_timestamp``; and when the total probability of all timestamps exceeds that of the
  single most likely text token, a timestamp is forced (the model is sure a segment ends even if
  it spreads its belief over many times).

Greedy takes the argmax; sampling draws from softmax(logits / temperature); beam search keeps the
``beam_size`` most probable sequences, collects finished ones until it has ``beam_size * patience``
of them, and returns the best by sum of log-probabilities divided by the length (or by the
Google NMT length penalty ((5 + length) / 6) ** alpha). These are the rules of openai-whisper's
``whisper.decoding``, reproduced from its documented behaviour; its tokens are matched exactly in
tests/test_decoding.py.

How this implementation runs
----------------------------
``generate`` checks its options once (``DecodingOptions``, ``make_plan``), then:

1. prefill: the audio is encoded once and every decoder layer's cross-attention keys/values are
   computed once (``new_cache``); the language is identified where it is not given;
   the prompts run in one pass. Self-attention keys/values go into a static ``KVCache`` per
   layer, ``prompt + max_new_tokens`` positions long, written in place: every step has one shape
   and takes its positions as a tensor (torch.compile and CUDA graphs can capture it).
2. select: the logit filters and the choice (greedy, sampled, or beams) as tensor operations over
   all rows, so the host waits on the device only for the "is everything finished?" check.
3. step: each row's new token through the decoder at its position.
4. finish: the search comes to the host once; each clip's best sequence and its result.

Beams are rows of the batch (``batch * beam_size`` rows). A clip's beams, and the rows of a clip
decoded several times (``clips=``), share its audio keys and values. Clips may have prompts of different
lengths (``prompt=`` and ``language=`` take one entry per clip): each row's tokens then sit at
its own positions (the prompt first, padded at the end to the longest), and the mask lets e

The modules, one idea each: ``options`` (what generate takes, checked; the plan), ``cache`` (the
keys and values attended over), ``filters`` and ``search`` (choosing tokens), ``rows`` (rows that
are done leave the batch), ``depths`` (clips at different decoder depths), ``packed`` (the fast
unembedding), ``traces`` (recording steps), ``results`` and ``loop`` (``generate`` itself).
"""

from .cache import DecoderCache, KVCache, new_cache
from .filters import filter_logits
from .loop import Decoding, forward, generate
from .options import DEFAULT_MAX_NEW, DecodingOptions, Plan, Prompt, check_number, make_plan
from .packed import Kernels, onednn_available
from .results import DecodingResult, compression_ratio, rank_score, segments
from .search import Search

__all__ = [
    "DEFAULT_MAX_NEW",
    "DecoderCache",
    "Decoding",
    "DecodingOptions",
    "DecodingResult",
    "KVCache",
    "Kernels",
    "Plan",
    "Prompt",
    "Search",
    "check_number",
    "compression_ratio",
    "filter_logits",
    "forward",
    "generate",
    "make_plan",
    "new_cache",
    "onednn_available",
    "rank_score",
    "segments",
]
