"""Whisper's audio front end: 16 kHz mono waveforms in, log-mel spectrograms out.

Whisper never sees a waveform. Its encoder reads a log-mel spectrogram: the audio is cut into
25 ms windows every 10 ms (N_FFT = 400 and HOP_LENGTH = 160 samples at 16 kHz), each window's
power spectrum is pooled into 80 (or, for large-v3, 128) mel bands, and the result is put on a
log10 scale, floored at 8 decades (80 dB) below the loudest value and rescaled by (x + 4) / 4 so
that typical speech lands roughly in [-1, 1]. A 30-second chunk (N_SAMPLES) gives N_FRAMES = 3000
frames, which the encoder's stride-2 convolution halves to its 1500 positions.

The numbers here equal openai-whisper's `log_mel_spectrogram` (within float32 rounding, checked in
tests/test_audio.py) with one deliberate difference: in a batch every clip is floored against its
own maximum, so putting a clip in a batch never changes its features.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import warnings

import librosa
import numpy as np
import torch

SAMPLE_RATE = 16000  # samples per second everything is resampled to
N_FFT = 400  # STFT window: 25 ms
HOP_LENGTH = 160  # STFT hop: 10 ms, so 100 frames per second
# the file endings taken as audio when a folder is searched (libsndfile's formats, and the containers PyAV reads)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au", ".caf", ".w64", ".m4a",
                  ".mp4", ".webm", ".mkv", ".aac", ".wma", ".mov")  # fmt: skip
CHUNK_LENGTH = 30  # seconds of audio in one encoder input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a chunk

MAX_SAMPLE_RATE = 384_000  # the highest rate audio hardware records at; more would only exhaust memory
MAX_MELS = 128  # Whisper uses 80 mel bands (128 from large-v3 on); 201 FFT bins support up to 128

AudioInput = str | os.PathLike | np.ndarray | torch.Tensor


def load_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as a mono float32 waveform at `sr` Hz, samples in [-1, 1].

    wav, flac, ogg and mp3 are read by libsndfile (through librosa): several channels are
    averaged to one and other sample rates are resampled (soxr, high quality). Every other
    container people have (m4a, mp4, webm, opus, mkv, aac ...) is decoded by PyAV, FFmpeg's
    libraries bundled in a wheel, as faster-whisper does: no ``ffmpeg`` program is needed.
    openai-whisper shells out to ffmpeg instead; the resamplers differ in the last bits, so
    compare features on 16 kHz files when exact parity matters.
    """
    if isinstance(sr, bool) or not isinstance(sr, int) or not 0 < sr <= MAX_SAMPLE_RATE:
        raise ValueError(f"sr must be an integer sample rate from 1 to {MAX_SAMPLE_RATE} Hz, got {sr!r}")
    path = _regular_file(path)
    check_complete_wav(path)
    if not _sndfile_reads(path):
        with native_stderr_quiet():  # FFmpeg's own warnings too
            audio = _decode_with_pyav(path, sr)
        if not np.isfinite(audio).all():
            raise ValueError(f"audio file {path} contains NaN or infinite samples")
        return audio
    try:
        with warnings.catch_warnings():
            # librosa warns before falling back from libsndfile to audioread; the outcome is
            # reported below either way.
            warnings.simplefilter("ignore")
            with native_stderr_quiet():  # libmpg123 and friends write warnings straight to fd 2
                audio, _ = librosa.load(path, sr=sr, mono=True, dtype=np.float32)
    except librosa.util.exceptions.ParameterError as error:  # decoded, but librosa rejects the samples
        raise ValueError(f"audio in {path} is not usable: {error} (NaN or infinite samples?)") from None
    except Exception as error:
        raise ValueError(
            f"could not decode {path} as audio ({type(error).__name__}: {error}); wav, flac, ogg and mp3 are supported"
        ) from None
    if not np.isfinite(audio).all():
        raise ValueError(f"audio file {path} contains NaN or infinite samples")
    return audio


def probe_audio(path: str | os.PathLike) -> None:
    """Fail (one line naming the file and the reason) unless ``path`` is a readable file holding audio.

    Only the header is read (and, for PyAV's containers, the first packets): the check before any work.
    """
    path = _regular_file(path)
    check_complete_wav(path)
    if _sndfile_reads(path):
        return
    try:
        import av
    except ImportError:
        return  # load_audio says why later
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError(f"{path} holds no audio stream")
            next(container.decode(container.streams.audio[0]))
    except av.error.FFmpegError as error:  # FFmpeg's errors (some of them are ValueErrors too)
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"could not decode {path} as audio: {reason}") from None
    except ValueError:
        raise
    except StopIteration:
        raise ValueError(f"{path} holds an audio stream with no samples") from None
    except Exception as error:
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"could not decode {path} as audio: {reason}") from None


def _sndfile_reads(path: str) -> bool:
    """Whether libsndfile recognises the file (wav, flac, ogg, mp3 ...)."""
    import soundfile

    try:
        with native_stderr_quiet():  # libmpg123 warns on fd 2 while it probes
            soundfile.info(path)
    except Exception:
        return False
    return True


def _decode_with_pyav(path: str, sr: int) -> np.ndarray:
    """The first audio stream of any container FFmpeg reads, as mono float32 at ``sr`` Hz (PyAV's resampler)."""
    try:
        import av
    except ImportError:
        raise ValueError(f"cannot read {path}: it is not wav, flac, ogg or mp3, and PyAV (pip install av) is "
                         "needed for other formats") from None  # fmt: skip
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError(f"{path} holds no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            chunks = []
            for frame in container.decode(stream):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # what the resampler holds
    except ValueError as error:
        if not isinstance(error, av.error.FFmpegError):  # ours above; FFmpeg's InvalidDataError is a ValueError too
            raise
        raise ValueError(f"could not decode {path} as audio: {str(error).strip()}") from None
    except Exception as error:  # FFmpeg's errors: invalid data, unknown format, truncated file ...
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"could not decode {path} as audio: {reason}") from None
    if not chunks:
        raise ValueError(f"{path} holds an audio stream with no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


@contextlib.contextmanager
def native_stderr_quiet():
    """Keep what C libraries (libmpg123's "warning: ID3v2: ...") write to file descriptor 2 off the terminal
    while a file is decoded: the outcome is reported in one line, decoded or not. Python's own stderr is
    untouched (sys.stderr writes go through the same descriptor, so the block must not print)."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a daemon, an embedded interpreter): nothing to hide
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def check_complete_wav(path: str) -> None:
    """Refuse a WAV file whose data chunk announces more audio than the file holds (a copy or download cut
    short): decoders read what is there and say nothing, so the recording would silently end early."""
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = f.seek(0, 2)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    at, rate, align = 12, None, None
    while at + 8 <= len(head):
        chunk, length = head[at : at + 4], struct.unpack("<I", head[at + 4 : at + 8])[0]
        if chunk == b"fmt " and at + 22 <= len(head):
            rate, align = struct.unpack_from("<I", head, at + 12)[0], struct.unpack_from("<H", head, at + 20)[0]
        if chunk == b"data":
            held = size - (at + 8)
            if length in (0, 0xFFFFFFFF) or length <= held or not rate or not align:  # 0 / ~0: a streamed WAV
                return
            said, got = length / (rate * align), held / (rate * align)
            raise ValueError(f"{path} is cut short: its header announces {said:.2f} s of audio, the file holds only "
                             f"{got:.2f} s (an interrupted copy or download?)")  # fmt: skip
        at += 8 + length + (length & 1)
    return


def _regular_file(path: str | os.PathLike) -> str:
    """``path`` as a string, if it names a readable regular file (a named pipe or device would block or never end)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"an audio path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"audio file not found: {path}") from None
    except OSError as e:
        raise OSError(f"cannot read audio file {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"expected an audio file, got a directory: {path}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a named pipe, socket or device); give an audio file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read audio file {path}: permission denied")
    return path


MAX_PEAK = 2.0  # float samples are in [-1, 1]; a little above is resampling's overshoot, far above is not audio


def check_peak(audio: np.ndarray | torch.Tensor, where: str) -> None:
    """Refuse float samples far outside [-1, 1] (int16 values given as floats, a gain gone wrong): the spectrogram
    would be all loudness and the encoder overflow (NaN) on them."""
    x = torch.as_tensor(audio)
    if x.numel() and x.is_floating_point():
        peak = float(x.abs().max())
        if peak > MAX_PEAK:
            raise ValueError(f"{where} has samples up to {peak:.4g}, far outside [-1, 1]: float audio must be in "
                             "[-1, 1] (16-bit integer samples? divide them by 32768)")  # fmt: skip


def pad_or_trim(array: np.ndarray | torch.Tensor, length: int = N_SAMPLES, axis: int = -1):
    """Cut `array` to `length` along `axis`, or pad it with zeros at the end up to `length`.

    Whisper's encoder always reads exactly 30 s, so waveforms are padded or trimmed to
    N_SAMPLES (or, equivalently, mels to N_FRAMES). Works for numpy arrays and torch tensors
    and returns the same kind.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    if not isinstance(array, np.ndarray | torch.Tensor):
        raise TypeError(f"pad_or_trim takes a numpy array or torch tensor, got {type(array).__name__}")
    if array.ndim == 0:
        raise ValueError("pad_or_trim needs an array with at least one dimension, got a scalar")
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {array.ndim} dimensions")
    axis = axis % array.ndim
    size = array.shape[axis]
    if size > length:
        keep = (slice(None),) * axis + (slice(0, length),)
        return array[keep]
    if size < length:
        missing = length - size
        if isinstance(array, torch.Tensor):
            # F.pad lists (left, right) pairs starting from the last dimension.
            dims_after = array.ndim - 1 - axis
            return torch.nn.functional.pad(array, [0, 0] * dims_after + [0, missing])
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, missing)
        return np.pad(array, widths)
    return array


@functools.cache
def _mel_filters_cpu(n_mels: int) -> torch.Tensor:
    """The (n_mels, N_FFT // 2 + 1) triangular mel filterbank, Slaney-style, as openai-whisper uses.

    Each row is a triangle over FFT bins that is area-normalized ("slaney" norm), so bands of
    different widths carry comparable energy. Computed once per n_mels from librosa's
    definition instead of being shipped as a data file.
    """
    filters = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)
    return torch.from_numpy(filters.astype(np.float32))


MelBlocks = tuple[tuple[torch.Tensor, int, int], ...]
MEL_ROWS_PER_BLOCK = 10  # measured fastest on CPU for 80 mels; any value gives the same numbers


@functools.cache
def _mel_filter_blocks(n_mels: int, device: torch.device) -> MelBlocks:
    """The filterbank cut into bands of MEL_ROWS_PER_BLOCK filters, each with only the FFT bins it touches.

    A mel filter is a triangle over a few neighbouring FFT bins and is zero everywhere else,
    so the dense (n_mels, 201) matrix is mostly zeros (80 mels: 391 of 16080 entries are not).
    Applying it as a few smaller (rows, bins) @ (bins, T) products, one per band of filters,
    skips most of those zeros and gives the same sums: about half the time of one dense product.
    Returns (block, first_bin, end_bin) triples in filter order.
    """
    filters = _mel_filters_cpu(n_mels)
    blocks = []
    for start in range(0, n_mels, MEL_ROWS_PER_BLOCK):
        rows = filters[start : start + MEL_ROWS_PER_BLOCK]  # (rows, F)
        used = rows.ne(0).any(dim=0).nonzero()
        lo, hi = (int(used.min()), int(used.max()) + 1) if len(used) else (0, 1)
        blocks.append((rows[:, lo:hi].contiguous().to(device), lo, hi))
    return tuple(blocks)


@functools.cache
def _hann_window(device: torch.device) -> torch.Tensor:
    # Periodic Hann (torch's default), the window openai-whisper's torch.stft call uses.
    return torch.hann_window(N_FFT, periodic=True, device=device)


def _as_float_waveform(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn an array of samples into a float32 tensor in [-1, 1] (integer PCM is rescaled)."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind not in "iuf":
            raise TypeError(f"audio must hold real samples, got a numpy array of dtype {audio.dtype}")
        native = audio.astype(audio.dtype.newbyteorder("="), copy=False)  # torch needs native byte order
        audio = torch.from_numpy(np.ascontiguousarray(native))
    dtype = audio.dtype
    if dtype == torch.float32:
        return audio
    if dtype.is_floating_point:
        return audio.float()
    # Integer PCM: 8-bit WAV is unsigned around 128, wider formats are signed.
    if dtype == torch.uint8:
        return (audio.float() - 128.0) / 128.0
    if dtype == torch.int16:
        return audio.float() / 32768.0
    if dtype == torch.int32:
        return (audio.double() / 2147483648.0).float()
    raise TypeError(
        f"audio must be float or int16/int32/uint8 PCM samples, got dtype {dtype}; convert it to float32 first"
    )


def _log_mel(audio: torch.Tensor, blocks: MelBlocks, window: torch.Tensor) -> torch.Tensor:
    """Log-mel features (B, n_mels, T) of equal-length clips (B, N), each floored at its own peak.

    Written without in-place steps, so gradients flow back to the waveform.
    """
    spectrum = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, return_complex=True)
    # (B, F, T + 1) with F = N_FFT // 2 + 1 = 201; the last frame only sees the reflected tail.
    spectrum = spectrum[..., :-1]  # (B, F, T)
    power = torch.addcmul(spectrum.real.square(), spectrum.imag, spectrum.imag)  # (B, F, T): |X|^2
    mel = torch.cat([block @ power[:, lo:hi] for block, lo, hi in blocks], dim=1)  # (B, n_mels, T)
    log_mel = mel.clamp(min=1e-10).log10()  # (B, n_mels, T)
    peak = log_mel.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    log_mel = torch.maximum(log_mel, peak - 8.0)  # floor 8 decades (80 dB) below the clip's peak
    return (log_mel + 4.0) / 4.0


def log_mel_spectrogram(
    audio: AudioInput,
    n_mels: int = 80,
    padding: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper's input features: log10 mel power spectrogram, floored and rescaled.

    audio: a path (read with `load_audio`), or 16 kHz samples as a numpy array or torch tensor,
        one clip [N] or an equal-length batch [B, N]. Float samples are taken as they are;
        int16 / int32 / uint8 PCM is rescaled to [-1, 1]. For stereo, average the channels first.
    n_mels: number of mel bands, 80 for most Whisper models and 128 for large-v3.
    padding: zero samples appended to each clip before the STFT (openai-whisper's transcribe
        appends N_SAMPLES so the last window is complete).
    device: where to compute ("cuda", ...); by default where the tensor already is.

    Returns float32 [n_mels, (N + padding) // HOP_LENGTH] for one clip, or
    [B, n_mels, (N + padding) // HOP_LENGTH] for a batch. Each clip is floored 8 decades below its
    own maximum, so a clip's features do not depend on what else is in the batch.
    """
    if isinstance(audio, str | os.PathLike):
        audio = load_audio(audio)
    if not isinstance(audio, np.ndarray | torch.Tensor):
        raise TypeError(f"audio must be a path, numpy array or torch tensor, got {type(audio).__name__}")
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or not 1 <= n_mels <= MAX_MELS:
        raise ValueError(f"n_mels must be an integer from 1 to {MAX_MELS} (Whisper uses 80 or 128), got {n_mels!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative number of samples, got {padding!r}")
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be one clip [N] or a batch [B, N], got shape {tuple(audio.shape)}")

    waveform = _as_float_waveform(audio)
    if device is not None:
        waveform = waveform.to(device)
    single = waveform.ndim == 1
    batch = waveform.unsqueeze(0) if single else waveform  # (B, N)
    if padding > 0:
        batch = torch.nn.functional.pad(batch, (0, padding))  # (B, N + padding)

    n_samples = batch.shape[-1]
    if n_samples <= N_FFT // 2:
        hint = (
            " A 2-D array is read as a batch [B, N]; for stereo [N, channels], average the channels first."
            if not single and n_samples <= 8
            else ""
        )
        raise ValueError(
            f"audio has {n_samples} samples per clip (after padding); the STFT needs more than "
            f"{N_FFT // 2}. Pad it (e.g. pad_or_trim(audio) to 30 s, or padding=N_SAMPLES).{hint}"
        )

    blocks = _mel_filter_blocks(n_mels, batch.device)
    window = _hann_window(batch.device)  # (N_FFT,)
    if batch.shape[0] == 0:
        return torch.empty(0, n_mels, n_samples // HOP_LENGTH, device=batch.device)
    if batch.device.type == "cpu":
        # On a CPU one clip's spectrogram (~5 MB for 30 s) stays in cache through the power,
        # mel and log steps; a whole batch at once does not and runs about twice slower.
        features = torch.cat([_log_mel(clip, blocks, window) for clip in batch.split(1)])  # (B, n_mels, T)
    else:
        features = _log_mel(batch, blocks, window)  # (B, n_mels, T)

    # NaN or inf anywhere in a clip makes its peak, and so every one of its values, NaN or inf.
    if not torch.isfinite(features[:, 0, 0]).all():
        raise ValueError("audio contains NaN or infinite samples (or values so large their power overflows float32)")
    return features[0] if single else features


def load_mel(audio, model=None, *, n_mels: int | None = None) -> torch.Tensor:
    """Whisper's input for a clip: the log-mel of its first window, the audio padded with silence to the window.

    audio: a path, or a 16 kHz waveform [N] (numpy or torch); or a list of them.
    model: a loaded Whisper, whose mel bands and window it follows (``2 * dims.n_audio_ctx`` frames:
        30 s for OpenAI's models, 4 s for the shipped toy). Without one: ``n_mels`` bands (default 80)
        and Whisper's 30 s window.

    Returns float32 [n_mels, frames] for one clip, [B, n_mels, frames] for a list: what ``model.run``
    and ``model.generate`` take. As openai-whisper's ``log_mel_spectrogram(pad_or_trim(audio))``, the
    audio is padded with zeros, or cut, to the window before the spectrogram; what lies past the
    window is not read (a longer recording is ``model.transcribe``'s job).
    """
    if model is not None:
        dims = getattr(model, "dims", None)
        if dims is None or not hasattr(dims, "n_audio_ctx"):
            raise TypeError(f"model must be a loaded Whisper (wl.load_model), got {type(model).__name__}")
        if n_mels is not None and n_mels != dims.n_mels:
            raise ValueError(f"n_mels={n_mels!r} but the model reads {dims.n_mels} mel bands; give one or the other")
        n_mels, frames = dims.n_mels, 2 * dims.n_audio_ctx
    else:
        n_mels, frames = (80 if n_mels is None else n_mels), N_FRAMES
    if isinstance(audio, list | tuple):
        if not audio:
            raise ValueError("load_mel was given an empty list of clips")
        return torch.stack([_window_mel(item, n_mels, frames) for item in audio])  # (B, n_mels, frames)
    return _window_mel(audio, n_mels, frames)  # (n_mels, frames)


def _window_mel(audio, n_mels: int, frames: int) -> torch.Tensor:
    """The log-mel [n_mels, frames] of one clip (a path or a 16 kHz waveform) padded or cut to ``frames``."""
    waveform = load_audio(audio) if isinstance(audio, str | os.PathLike) else audio
    is_array = isinstance(waveform, np.ndarray | torch.Tensor)
    if not is_array or waveform.ndim != 1:
        got = f"shape {tuple(waveform.shape)}" if is_array else type(audio).__name__
        raise ValueError(f"load_mel takes a path or a 1-D 16 kHz waveform, got {got}; for stereo, average the channels")
    return log_mel_spectrogram(pad_or_trim(waveform, frames * HOP_LENGTH), n_mels=n_mels)  # (n_mels, frames)


def load_windows(audios, n_mels: int, frames: int) -> tuple[torch.Tensor, list[float]]:
    """Log-mels of audio files or 16 kHz arrays, padded to a window of ``frames``: ([B, n_mels, frames], seconds).

    As Whisper does, the *audio* is padded with silence before the spectrogram (so padding frames
    sit at the clip's floor, not at zero). A clip longer than the window is an error, never
    silently truncated.
    """
    if isinstance(audios, str | os.PathLike):
        raise TypeError(f"load_windows takes a list of audio files or arrays, got the single path {audios!r}")
    if len(audios) == 0:
        raise ValueError("no audio files given")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive number of mel frames, got {frames!r}")
    mels, seconds = [], []
    for i, item in enumerate(audios):  # read everything first, so a bad file fails before any work
        audio = load_audio(item) if isinstance(item, str | os.PathLike) else item
        is_array = isinstance(audio, np.ndarray | torch.Tensor)
        if not is_array or audio.ndim != 1:
            got = f"shape {tuple(audio.shape)}" if is_array else type(audio).__name__
            raise ValueError(
                f"audio {i} must be a 1-D 16 kHz waveform (or a path), got {got}; for stereo, average the channels"
            )
        check_peak(audio, str(item) if isinstance(item, str | os.PathLike) else f"audio {i}")
        if len(audio) > frames * HOP_LENGTH:
            raise ValueError(
                f"{item if isinstance(item, str | os.PathLike) else 'audio'} is {len(audio) / SAMPLE_RATE:.1f} s "
                f"long, longer than the model's {frames * HOP_LENGTH / SAMPLE_RATE:g} s window that this study reads: "
                "`whisper-lens transcribe` takes recordings of any length (in Python, model.transcribe(audio, "
                "trace=...) records every window's activations), or cut the file into windows"
            )
        mel = log_mel_spectrogram(audio, n_mels=n_mels, padding=frames * HOP_LENGTH - len(audio))
        mels.append(mel)  # (n_mels, frames)
        seconds.append(len(audio) / SAMPLE_RATE)
    return torch.stack(mels), seconds


# ----------------------------------------------------------------------------- long files, one window at a time

TIME_PRECISION = 2 * HOP_LENGTH / SAMPLE_RATE  # 0.02 s: one encoder position (2 frames), a timestamp token's step


def mel_peak(audio: torch.Tensor, n_mels: int, chunk_frames: int = 6000) -> float:
    """The loudest log10 mel value of a whole recording: what every window of it is floored against.

    openai-whisper's ``transcribe`` computes one log-mel of the whole file (with 30 s of silence
    appended) and floors it 8 decades below that file's peak; a window cut from it therefore
    depends on the loudest moment anywhere in the file. This first pass finds that peak
    ``chunk_frames`` frames (60 s) at a time, so its memory is bounded by the chunk, not the file.
    ``audio``: float32 samples [N] at 16 kHz. Frames that touch no audio are -10 (silence's clamp).
    """
    n_frames = (len(audio) + N_FFT // 2) // HOP_LENGTH + 1  # every frame whose window touches a sample
    filters = _mel_filters_cpu(n_mels).to(audio.device)  # (n_mels, F)
    peak = -10.0  # log10 of the 1e-10 clamp: the value of a frame of pure silence
    for first in range(0, n_frames, chunk_frames):
        power = _frame_power(audio, first, min(chunk_frames, n_frames - first))  # (F, frames)
        mel = filters @ power  # (n_mels, frames)
        peak = max(peak, float(mel.clamp(min=1e-10).log10().max()))  # as the whole-file computation rounds it
    return peak


def mel_frames(audio: torch.Tensor, first: int, count: int, n_mels: int, peak: float) -> torch.Tensor:
    """Frames ``first .. first + count`` of a whole recording's log-mel, floored against its ``peak``.

    Equal to ``log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, first : first + count]``
    (openai-whisper's whole-file features) when ``peak = mel_peak(audio, n_mels)``, but computed
    from only the samples those frames see: each frame's 400-sample window, reflected at the
    file's start as the centred STFT does and silent past its end. [n_mels, count].
    """
    power = _frame_power(audio, first, count)  # (F, count), F contiguous: one dense product beats the bands here
    mel = _mel_filters_cpu(n_mels).to(audio.device) @ power  # (n_mels, count)
    log_mel = torch.maximum(mel.clamp(min=1e-10).log10(), torch.tensor(peak - 8.0))  # (n_mels, count)
    return (log_mel + 4.0) / 4.0


def _frame_power(audio: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """|STFT|^2 of frames ``first .. first + count`` (frame f centred on sample f * HOP_LENGTH): (F, count)."""
    half = N_FFT // 2
    start, stop = first * HOP_LENGTH - half, (first + count - 1) * HOP_LENGTH + half  # samples the frames read
    lead = max(0, -start)  # samples before the file's start: its reflection
    if lead > 0:
        reflected = pad_or_trim(audio[1 : lead + 1], lead).flip(0)  # x[lead], ..., x[1] (silence past the end)
    else:
        reflected = audio[:0]
    body = audio[max(0, start) : max(0, stop)]
    tail = torch.zeros(stop - max(start, 0) - len(body), dtype=audio.dtype, device=audio.device)  # past the end
    samples = torch.cat([reflected, body, tail])  # ((count - 1) * HOP_LENGTH + N_FFT,)
    spectrum = torch.stft(samples, N_FFT, HOP_LENGTH, window=_hann_window(audio.device), center=False,
                          return_complex=True)  # fmt: skip
    return torch.addcmul(spectrum.real.square(), spectrum.imag, spectrum.imag)  # (F, count)
