"""Stops: every stop id honoured or refused, stop strings checked on every text the user gets, in linear time.

Host-level tests on ``Request`` with a tiny byte tokenizer (no engine build):
token ids 0..255 are bytes, a few ids are multi-byte tokens (one holds a stop
string followed by the first byte of a 2-byte character, so the detokenizer
holds it back until the final flush), EOS is 300.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.engine import request as request_mod
from ferry.engine.request import Request, find_stop_string
from ferry.engine.sampling_params import MAX_STOP_IDS, SamplingParams
from ferry.models.detokenizer import IncrementalDetokenizer

EOS = 300
MULTI = {256: b"ab", 257: b"STOP\xc3", 258: b"cd\xc3", 259: b"\xa9", 260: b"ST", 261: b"OP"}


class BytesTok:
    eos_token_ids = (EOS,)

    def piece(self, i: int) -> bytes:
        return MULTI.get(i, bytes([i]) if 0 <= i < 256 else b"")

    def decode(self, ids, skip_special_tokens=True) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")


TOK = BytesTok()


def ids_of(text: str) -> list[int]:
    return list(text.encode())


def make(params: SamplingParams, eos=(EOS,)) -> Request:
    return Request("r", None, [1, 2, 3], params, 0, params.device_stop_ids(eos), IncrementalDetokenizer(TOK))


def run(req: Request, tokens, device_done_at=None) -> str:
    """Feed tokens until the request finishes; return the concatenated streamed deltas."""
    streamed = ""
    for k, t in enumerate(tokens):
        req.append(t, None, device_done=(k == device_done_at))
        streamed += req.output().delta_text
        if req.finished:
            break
    return streamed


# -- stop token ids ---------------------------------------------------------------------------------

def test_every_stop_id_up_to_the_limit_is_honoured():
    ids = tuple(range(10, 10 + MAX_STOP_IDS - 1))                # + EOS = MAX_STOP_IDS in all
    params = SamplingParams(max_tokens=50, stop_token_ids=ids)
    assert params.device_stop_ids((EOS,)) == (EOS,) + ids
    for stop in (EOS,) + ids:
        req = make(params)
        run(req, ids_of("hello") + [stop] + ids_of("never"))
        assert (req.finish_reason, req.text, req.out_ids[-1]) == ("stop", "hello", stop), stop
    control = make(params)                                         # positive control: 9 is not a stop id
    run(control, ids_of("hel") + [9] + ids_of("lo"))
    assert control.finish_reason is None and len(control.out_ids) == 6


def test_over_the_limit_is_refused_never_truncated():
    ids = tuple(range(10, 10 + MAX_STOP_IDS))                     # MAX_STOP_IDS + EOS: one too many
    params = SamplingParams(stop_token_ids=ids)
    with pytest.raises(ValueError, match=rf"9 distinct stop ids; at most {MAX_STOP_IDS}"):
        params.device_stop_ids((EOS,))
    with pytest.raises(ValueError, match="stop_token_ids"):
        params.device_stop_ids((EOS, 301))
    # positive controls: the same ids fit without EOS, and an EOS listed again is not counted twice
    assert SamplingParams(stop_token_ids=ids, ignore_eos=True).device_stop_ids((EOS,)) == ids
    assert len(SamplingParams(stop_token_ids=ids[:-1] + (EOS,)).device_stop_ids((EOS,))) == MAX_STOP_IDS
    with pytest.raises(ValueError, match="stop_token_ids has 9 distinct ids"):
        SamplingParams(stop_token_ids=tuple(range(MAX_STOP_IDS + 1)), ignore_eos=True)
    with pytest.raises(ValueError, match="stop ids exceed the device limit"):
        Request("r", None, [1], SamplingParams(), 0, tuple(range(MAX_STOP_IDS + 1)), IncrementalDetokenizer(TOK))


@pytest.mark.parametrize("bad", [[1.5], [True], ["3"], [-1]])
def test_stop_token_ids_must_be_token_ids(bad):
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=bad)
    assert SamplingParams(stop_token_ids=[3]).stop_token_ids == (3,)     # positive control


def test_add_request_refuses_instead_of_truncating():
    """engine/llm_engine.py builds the device stop ids with ``device_stop_ids`` (no slice left)."""
    import pathlib

    src = (pathlib.Path(request_mod.__file__).parent / "llm_engine.py").read_text()
    assert "device_stop_ids(" in src and "[:MAX_STOP_IDS]" not in src


# -- stop strings ---------------------------------------------------------------------------------

def test_stop_string_across_tokens_is_cut_and_never_streamed():
    req = make(SamplingParams(max_tokens=50, stop=("STOP",)))
    streamed = run(req, ids_of("xy") + [260, 261] + ids_of("zz"))
    assert (req.finish_reason, req.text, streamed) == ("stop", "xy", "xy")
    control = make(SamplingParams(max_tokens=6))                   # positive control: no stop string
    assert run(control, ids_of("xy") + [260, 261] + ids_of("zz")) == "xySTOPzz"


def test_final_flush_on_length_finish_is_checked():
    tokens = [256, 257]                                            # "ab", then "STOP" + half a character
    req = make(SamplingParams(max_tokens=2, stop=("STOP",)))
    streamed = run(req, tokens)
    assert (req.finish_reason, req.text, streamed) == ("stop", "ab", "ab")
    control = make(SamplingParams(max_tokens=2))                   # positive control: the flush holds STOP
    assert run(control, tokens) == "abSTOP\ufffd" and control.finish_reason == "length"


def test_final_flush_on_device_done_is_checked():
    req = make(SamplingParams(max_tokens=50, stop=("STOP",)))
    run(req, [256, 257, 256], device_done_at=1)
    assert (req.finish_reason, req.text) == ("stop", "ab")


def test_stop_token_finish_flushes_and_checks_the_held_text():
    req = make(SamplingParams(max_tokens=50, stop=("zzz",)))
    streamed = run(req, [256, 258, EOS])                          # "ab", "cd" + half a character, EOS
    assert (req.finish_reason, req.text, streamed) == ("stop", "abcd\ufffd", "abcd\ufffd")
    req = make(SamplingParams(max_tokens=50, stop=("STOP",)))
    assert run(req, [256, 257, EOS]) == "ab" and req.text == "ab"
    req = make(SamplingParams(max_tokens=50, stop=("zzz",)))       # a completed character is kept whole
    assert run(req, [256, 258, 259, EOS]) == "abcd\u00e9"


def test_abort_keeps_its_reason_but_the_flush_is_still_checked():
    req = make(SamplingParams(max_tokens=50, stop=("STOP",)))
    run(req, [256, 257])
    req.finish("abort")
    assert (req.finish_reason, req.text) == ("abort", "ab")


def test_scan_is_linear_in_the_new_text(monkeypatch):
    """Each check scans only the new text plus max(len(stop)) - 1 characters before it."""
    scanned = []

    def spy(text, stops, start=0):
        scanned.append(len(text) - start)
        return find_stop_string(text, stops, start)

    monkeypatch.setattr(request_mod, "find_stop_string", spy)
    stops = ("never-appears", "STOP")
    req = make(SamplingParams(max_tokens=5000, stop=stops))
    run(req, ids_of("x" * 3000) + [260, 261])
    hold = max(map(len, stops)) - 1
    assert req.finish_reason == "stop" and req.text == "x" * 3000     # positive control: found across tokens
    assert len(scanned) == 3002 and max(scanned) <= 2 + hold
    assert sum(scanned) <= 3002 * (2 + hold)                          # not ~3000**2 / 2


def test_find_stop_string_earliest_from_start():
    assert find_stop_string("a STOP b END", ("END", "STOP")) == 2
    assert find_stop_string("a STOP b END", ("END", "STOP"), 3) == 9
    assert find_stop_string("abc", ("x",)) is None


_PIECES = st.sampled_from(list(range(97, 100)) + [0xC3, 0xA9, 256, 257, 258, 259, 260, 261])


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(_PIECES, min_size=1, max_size=30),
       stops=st.lists(st.sampled_from(["a", "bc", "STOP", "OPa", "\ufffd", "cd\u00e9", "zz"]), max_size=3),
       max_tokens=st.integers(1, 40), eos_at=st.one_of(st.none(), st.integers(0, 30)))
def test_matches_a_reference_on_any_token_stream(tokens, stops, max_tokens, eos_at):
    """Final text = decode(tokens before the stop) cut at the earliest stop string; deltas concatenate to it."""
    if eos_at is not None:
        tokens = tokens[:eos_at] + [EOS] + tokens[eos_at:]
    req = make(SamplingParams(max_tokens=max_tokens, stop=tuple(stops)))
    streamed = run(req, tokens)
    used = req.out_ids
    assert len(used) == min(len(tokens), max_tokens) or req.finish_reason == "stop"
    full = TOK.decode([t for t in used if t != EOS])
    cut = find_stop_string(full, stops) if stops else None
    expect = full if cut is None else full[:cut]
    if not req.finished:                                            # ran out of tokens: end like the engine
        req.finish("length")
        streamed += req.output().delta_text
    assert req.text == expect and streamed == expect
    if cut is not None:
        assert req.finish_reason == "stop"
    elif used[-1] != EOS:
        assert req.finish_reason == "length"


def test_detokenizer_window_stays_short_across_invisible_tokens():
    """Tokens that decode to nothing (skipped special tokens) must not grow the decode window."""
    decoded = []

    class Counting(BytesTok):
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Counting())
    n = 2000
    text = detok.add(ord("a")) + "".join(detok.add(299) for _ in range(n)) + detok.add(ord("b")) + detok.flush()
    assert text == "ab"                                                  # positive control: the text is intact
    assert max(decoded) <= 8 and sum(decoded) <= 16 * (n + 2)            # not ~n**2 / 2 tokens decoded
    detok = IncrementalDetokenizer(Counting())                           # a split character is still held back
    assert detok.add(0xC3) == "" and detok.add(299) == "" and detok.add(0xA9) == "\u00e9"
