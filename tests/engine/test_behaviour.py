"""Engine behaviour: batch invariance, seeds, page accounting, compile guard, bad input."""
import numpy as np
import pytest

from ferry import SamplingParams

PROMPTS = ["Tell me a joke about cats.", "List the planets of the solar system:",
           "The best way to learn programming is", "Q: What is 12 times 7?\nA:",
           "In 1969, the first humans", "Here is a recipe for pancakes:"]


def _pages_free(engine):
    s = engine.scheduler.stats()
    return s["device_pages_used"] == 0 and s["host_pages_used"] == 0


def test_batch_invariance_with_staggered_arrivals(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate(p, greedy)[0].token_ids for p in PROMPTS]
    eng = llm.engine
    for i in range(3):                                  # first three start alone...
        eng.add_request(f"stag-{i}", PROMPTS[i], greedy)
    got, step = {}, 0
    while eng.has_unfinished_requests():
        if step == 3:                                   # ...the rest join mid-flight
            for i in range(3, len(PROMPTS)):
                eng.add_request(f"stag-{i}", PROMPTS[i], greedy)
        for out in eng.step():
            if out.finished:
                got[out.request_id] = out.token_ids
        step += 1
    assert [got[f"stag-{i}"] for i in range(len(PROMPTS))] == alone
    assert _pages_free(eng)


def test_seeded_sampling_reproducible(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS[:1], p)[0].token_ids
    b = llm.generate(PROMPTS[:3], p)[0].token_ids       # batched with others
    assert a == b
    c = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20,
                                                 seed=4321, ignore_eos=True))[0].token_ids
    assert a != c


def test_abort_frees_pages_and_engine_keeps_serving(llm):
    eng = llm.engine
    for i in range(4):
        eng.add_request(f"ab-{i}", PROMPTS[i], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step(); eng.step()
    assert not _pages_free(eng)
    for i in range(4):
        eng.abort_request(f"ab-{i}")
    finals = eng.step()
    assert sorted(o.request_id for o in finals) == [f"ab-{i}" for i in range(4)]
    assert all(o.finished and o.finish_reason == "abort" for o in finals)
    assert _pages_free(eng) and not eng.has_unfinished_requests()
    assert llm.generate("Hello", SamplingParams(max_tokens=3))[0].finished


@pytest.mark.parametrize("bad, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
])
def test_bad_sampling_params(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_bad_requests_raise_and_engine_keeps_serving(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="exceeds the context"):
        llm.generate("word " * 300, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="exceeds the context"):
        llm.generate("hi", SamplingParams(max_tokens=eng.max_model_len))
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt must be"):
        eng.add_request("x", 3.5, SamplingParams())
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="length_hint"):
            eng.add_request("hinted", "The capital of France is", SamplingParams(), length_hint=bad)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids
    assert _pages_free(eng)
    # The same id after the refusals: nothing was half-added. A hint orders work; it never changes tokens.
    eng.add_request("hinted", "The capital of France is", SamplingParams(temperature=0, max_tokens=5), length_hint=3)
    assert eng.scheduler.jobs["hinted"].length_hint == 3
    final = None
    while final is None:
        final = next((o for o in eng.step() if o.request_id == "hinted" and o.finished), None)
    assert final.token_ids == out.token_ids
    assert _pages_free(eng)


def test_generate_takes_priorities_and_length_hints(llm, monkeypatch):
    """``LLM.generate(priority=, length_hints=)``: one per prompt, passed to each request; a bad one
    raises before anything runs and the engine keeps serving."""
    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(PROMPTS[:3], greedy)]
    with pytest.raises(ValueError, match="2 length hints for 3 prompts"):
        llm.generate(PROMPTS[:3], greedy, length_hints=[4, 5])
    with pytest.raises(ValueError, match="1 priorities for 3 prompts"):
        llm.generate(PROMPTS[:3], greedy, priority=[1])
    with pytest.raises(ValueError, match="length_hint"):
        llm.generate(PROMPTS[:3], greedy, length_hints=[4, 0, 5])
    with pytest.raises(ValueError, match="priority must be an int"):
        llm.generate(PROMPTS[:3], greedy, priority=[0, "high", 1])
    assert not eng.has_unfinished_requests() and _pages_free(eng)
    seen = {}
    add = eng.add_request

    def spy(rid, prompt, params=None, priority=0, now=None, length_hint=None):
        seen[rid] = (priority, length_hint)
        return add(rid, prompt, params, priority=priority, now=now, length_hint=length_hint)

    monkeypatch.setattr(eng, "add_request", spy)
    outs = llm.generate(PROMPTS[:3], greedy, priority=[0, 2, 1], length_hints=[6, None, 3])
    assert [seen[o.request_id] for o in outs] == [(0, 6), (2, None), (1, 3)]
    assert [o.token_ids for o in outs] == plain          # order of work changes, tokens do not
    chat = llm.chat([{"role": "user", "content": "Say hi."}], greedy, priority=[3], length_hints=[2])[0]
    assert seen[chat.request_id] == (3, 2)
    assert _pages_free(eng)


def test_finish_reasons_stop_strings_and_lengths(llm):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    full = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].text
    stop = full.strip()[:3].strip() or full[:2]
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                         stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=60))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.tokenizer.eos_token_ids


def test_streaming_deltas_concatenate_to_text(llm):
    p = SamplingParams(temperature=0.7, seed=7, max_tokens=30, ignore_eos=True, stop=["\n\n"])
    streamed = "".join(llm.stream("Write about rivers.", p))
    assert streamed == llm.generate("Write about rivers.", p)[0].text


def test_logprobs(llm):
    out = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok
        assert lp.logprob <= 0 and abs(lp.logprob - lp.top[0][1]) < 1e-5


def test_no_compile_after_warmup_mixed_shapes(llm):
    """Mixed prompt lengths and batch sizes after warm-up: the strict guard raises on any compile."""
    eng = llm.engine
    rng = np.random.default_rng()
    before = eng.guard.violations
    reqs = []
    for i in range(11):
        n = int(rng.integers(1, 150))
        ids = rng.integers(5, eng.model_config.vocab_size, n).tolist()
        sp = SamplingParams(temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 40)),
                            top_k=int(rng.choice([0, 20])), presence_penalty=float(rng.choice([0.0, 0.5])),
                            ignore_eos=True, logprobs=int(rng.choice([0, 5])))
        reqs.append((ids, sp))
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs])
    assert [len(o.token_ids) for o in outs] == [r[1].max_tokens for r in reqs]
    assert eng.guard.violations == before == 0 and eng.guard.armed and eng.guard.strict
    assert _pages_free(eng)
