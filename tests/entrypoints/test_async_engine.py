"""AsyncEngine over the deterministic FakeEngine: loop thread, abort, overload, errors, shutdown."""
import asyncio
import threading
import time

import pytest

from ferry.engine.entrypoints.async_engine import AsyncEngine, EngineClosed, EngineOverloaded, EngineStepError
from ferry.engine.sampling_params import SamplingParams
from tests.entrypoints.fake_engine import FakeEngine


def _wait(cond, timeout=10.0):
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def fake():
    eng = FakeEngine()
    aeng = AsyncEngine(eng, max_waiting=32, idle_poll_s=0.05)
    yield eng, aeng
    aeng.shutdown(timeout=1.0)


async def _collect(aeng, prompt, params, **kw):
    return [o async for o in aeng.generate(prompt, params, **kw)]


def test_generate_streams_deltas_that_add_up(fake):
    eng, aeng = fake
    outs = asyncio.run(_collect(aeng, "hello", SamplingParams(max_tokens=7, seed=3, ignore_eos=True)))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert [o.finished for o in outs[:-1]] == [False] * (len(outs) - 1)
    assert "".join(o.delta_text for o in outs) == outs[-1].text and len(outs[-1].token_ids) == 7
    assert len(eng.threads) == 1 and threading.get_ident() not in eng.threads   # only the loop thread
    assert _wait(lambda: aeng.stats()["in_flight"] == 0)


def test_concurrent_requests_from_two_event_loops(fake):
    eng, aeng = fake
    results = {}

    def client(name):
        async def many():
            return await asyncio.gather(*[_collect(aeng, f"{name}{i}", SamplingParams(max_tokens=5, seed=i))
                                          for i in range(6)])
        results[name] = asyncio.run(many())

    threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in ("a", "b"):
        assert all(outs[-1].finished and len(outs[-1].token_ids) == 5 for outs in results[name])
    assert len(eng.threads) == 1
    assert _wait(lambda: aeng.stats()["in_flight"] == 0 and eng.stats()["device_pages_used"] == 0)


def test_bad_request_raises_value_error_and_engine_keeps_serving(fake):
    eng, aeng = fake
    with pytest.raises(ValueError, match="context length"):
        asyncio.run(_collect(aeng, "x" * 100, SamplingParams(max_tokens=100)))
    with pytest.raises(ValueError, match="out of range"):
        asyncio.run(_collect(aeng, [1, 5000], SamplingParams(max_tokens=2)))
    assert aeng.stats()["in_flight"] == 0
    assert asyncio.run(_collect(aeng, "ok", SamplingParams(max_tokens=2)))[-1].finished


def test_closing_the_generator_aborts_and_frees_pages(fake):
    eng, aeng = fake
    eng.step_delay = 0.01

    async def first_then_leave():
        gen = aeng.generate("abcdefgh", SamplingParams(max_tokens=100, ignore_eos=True), request_id="r1")
        async for out in gen:
            assert not out.finished
            break
        await gen.aclose()

    asyncio.run(first_then_leave())
    assert _wait(lambda: "r1" in eng.aborted)
    assert _wait(lambda: aeng.stats()["in_flight"] == 0 and aeng.stats()["device_pages_used"] == 0)
    assert aeng.stats()["finished_by_reason"]["abort"] == 1


def test_cancelled_task_aborts_its_request(fake):
    eng, aeng = fake
    eng.step_delay = 0.01

    async def main():
        task = asyncio.ensure_future(_collect(aeng, "zz", SamplingParams(max_tokens=100, ignore_eos=True),
                                              request_id="c1"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait(lambda: "c1" in eng.aborted and aeng.stats()["in_flight"] == 0)


def test_full_waiting_room_raises_overloaded():
    eng = FakeEngine(max_batch=1, step_delay=0.01)
    aeng = AsyncEngine(eng, max_waiting=2, retry_after=3.0)

    async def main():
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        streams = [await aeng.add_request("p0", params)]
        for _ in range(200):                              # wait until the first one is running
            if aeng.stats().get("running", 0) >= 1:
                break
            await asyncio.sleep(0.01)
        streams += [await aeng.add_request(f"p{i}", params) for i in (1, 2)]   # 1 running + 2 waiting
        await asyncio.sleep(0.1)
        with pytest.raises(EngineOverloaded) as ei:
            await aeng.add_request("one too many", params)
        assert ei.value.retry_after == 3.0
        for s in streams:
            async for _ in s:
                pass
        # room again once they are done
        return [o async for o in aeng.generate("later", SamplingParams(max_tokens=2))]

    try:
        assert asyncio.run(main())[-1].finished
        assert aeng.stats()["rejected_total"] == 1
    finally:
        aeng.shutdown(timeout=1.0)


def test_step_error_fails_in_flight_requests_and_loop_survives(fake):
    eng, aeng = fake

    async def main():
        stream = await aeng.add_request("boom", SamplingParams(max_tokens=50, ignore_eos=True))
        eng.fail_steps = 1
        with pytest.raises(EngineStepError, match="injected"):
            async for _ in stream:
                pass

    eng.step_delay = 0.01
    asyncio.run(main())
    assert _wait(lambda: aeng.stats()["in_flight"] == 0 and eng.stats()["device_pages_used"] == 0)
    assert aeng.stats()["step_errors_total"] == 1
    assert asyncio.run(_collect(aeng, "after", SamplingParams(max_tokens=3)))[-1].finish_reason == "length"


def test_shutdown_lets_short_requests_finish_and_aborts_long_ones():
    eng = FakeEngine(max_batch=4, step_delay=0.01)
    aeng = AsyncEngine(eng, max_waiting=8)
    got = {}

    async def main():
        short = await aeng.add_request("s", SamplingParams(max_tokens=3, ignore_eos=True))
        long = await aeng.add_request("l", SamplingParams(max_tokens=120, ignore_eos=True))
        await asyncio.sleep(0.05)
        await aeng.shutdown_async(timeout=0.3)
        got["short"] = [o async for o in short]
        got["long"] = [o async for o in long]
        with pytest.raises(EngineClosed):
            await aeng.add_request("new", SamplingParams(max_tokens=2))

    asyncio.run(main())
    assert got["short"][-1].finish_reason == "length"
    assert got["long"][-1].finished and got["long"][-1].finish_reason == "abort"
    assert len(got["long"][-1].token_ids) < 120
    assert not aeng.is_alive and eng.stats()["device_pages_used"] == 0 and not eng.has_unfinished_requests()


def test_latency_histograms_are_recorded(fake):
    eng, aeng = fake
    asyncio.run(_collect(aeng, "hist", SamplingParams(max_tokens=6, ignore_eos=True)))
    assert _wait(lambda: aeng.latency()["jct"].count == 1)
    lat = aeng.latency()
    assert lat["ttft"].count == 1 and lat["itl"].count == 5
    assert lat["jct"].total >= lat["ttft"].total > 0


def test_invalid_max_waiting():
    with pytest.raises(ValueError, match="max_waiting"):
        AsyncEngine(FakeEngine(), max_waiting=0)


def test_loop_crash_fails_waiters_instead_of_hanging():
    eng = FakeEngine(step_delay=0.01)
    aeng = AsyncEngine(eng, idle_poll_s=0.05)

    def boom():
        raise RuntimeError("a bug in the engine loop")

    async def main():
        stream = await aeng.add_request("x", SamplingParams(max_tokens=100, ignore_eos=True))
        eng.has_unfinished_requests = boom
        with pytest.raises(EngineClosed):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosed):
            await aeng.add_request("y", SamplingParams(max_tokens=2))

    asyncio.run(asyncio.wait_for(main(), 10))
    assert _wait(lambda: not aeng.is_alive) and aeng.stats()["in_flight"] == 0
