"""How `score` calls a reward function (RewardCallConfig): time limits, the failure policy,
chunks on worker threads, bisection to a failing sample, and what counts as a reward.
Host-only (no JAX); the whole file runs in a few seconds."""
import math
import threading
import time

import numpy as np
import pytest

from rljax.rewards import RewardCallConfig, RewardError, score, score_with_failures

PROMPTS = [f"p{i}" for i in range(4)]


def lengths(prompts, completions, **_):
    return [float(len(c)) for c in completions]


@pytest.fixture
def release():
    """An event that hanging reward functions wait on; set at teardown so no thread outlives the test."""
    ev = threading.Event()
    yield ev
    ev.set()


def hangs_on(word, release):
    def judge(prompts, completions, **_):
        if word in completions:
            release.wait()  # a remote judge that never answers
        return lengths(prompts, completions)
    return judge


def test_default_is_one_call_on_the_whole_batch_in_the_callers_thread():
    seen = []

    def fn(prompts, completions, **meta):
        seen.append((threading.current_thread(), list(completions), meta))
        return lengths(prompts, completions)

    s = score_with_failures(fn, PROMPTS, ["a", "bb", "ccc", ""], tag=[1, 2, 3, 4])
    np.testing.assert_array_equal(s.rewards, [1, 2, 3, 0])
    assert s.calls == 1 and not s.failed.any()
    assert seen == [(threading.main_thread(), ["a", "bb", "ccc", ""], {"tag": [1, 2, 3, 4]})]


def test_a_hanging_sample_raises_naming_it_within_the_time_limit(release):
    cfg = RewardCallConfig(timeout_s=0.3, batch_size=1, workers=4)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"reward function judge did not return within 0.3 s on sample 2: "
                                          r"prompt 'p2', completion 'hang'.*background thread"):
        score(hangs_on("hang", release), PROMPTS, ["a", "bb", "hang", "d"], call_config=cfg)
    assert time.perf_counter() - t0 < 0.3 + 0.4
    # one call on the whole batch: the range is named, with the way to name the sample
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"within 0.2 s on samples 0..3 \(RewardCallConfig.batch_size=1"):
        score(hangs_on("hang", release), PROMPTS, ["a", "bb", "hang", "d"],
              call_config=RewardCallConfig(timeout_s=0.2))
    assert time.perf_counter() - t0 < 0.2 + 0.4


def test_a_hanging_sample_scores_the_failure_value_and_is_counted_while_the_rest_score(release):
    cfg = RewardCallConfig(timeout_s=0.3, batch_size=1, workers=2, on_failure="value", failure_value=-1.0)
    completions = ["a", "hang", "ccc", "dddd"]
    t0 = time.perf_counter()
    s = score_with_failures(hangs_on("hang", release), PROMPTS, completions, call_config=cfg)
    # one worker is held by the hang for 0.3 s; the other scores the remaining three meanwhile
    assert time.perf_counter() - t0 < 0.3 + 0.4
    np.testing.assert_array_equal(s.rewards, [1.0, -1.0, 3.0, 4.0])
    np.testing.assert_array_equal(s.failed, [False, True, False, False])
    assert s.calls == 4


def test_a_raising_chunk_scores_the_failure_value_for_its_samples():
    def breaks_on_x(prompts, completions, **_):
        return [1.0 / (0 if "x" in c else 1) for c in completions]

    cfg = RewardCallConfig(on_failure="value", failure_value=0.5, batch_size=2)
    s = score_with_failures(breaks_on_x, PROMPTS * 2, ["a", "b", "c", "x", "e", "f", "x", "h"], call_config=cfg)
    # chunks {0,1} {2,3} {4,5} {6,7}: the 2nd and 4th hold an "x"; all their samples take the value
    np.testing.assert_array_equal(s.rewards, [1, 1, 0.5, 0.5, 1, 1, 0.5, 0.5])
    assert s.failed.sum() == 4 and s.calls == 4


def test_chunks_run_concurrently_on_workers_and_keep_their_order():
    got = []

    def slow_judge(prompts, completions, *, ids, **_):
        got.append(list(ids))
        time.sleep(0.3)  # waiting on a service releases the GIL, like a network call
        return [10.0 * i for i in ids]

    ids = list(range(8))
    cfg = RewardCallConfig(batch_size=2, workers=4)
    t0 = time.perf_counter()
    r = score(slow_judge, [""] * 8, [str(i) for i in ids], call_config=cfg, ids=ids)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.9, elapsed  # serially 4 × 0.3 = 1.2 s
    np.testing.assert_array_equal(r, [10.0 * i for i in ids])
    assert sorted(got) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_bisection_finds_the_failing_sample_in_logarithmically_many_calls():
    calls = []

    def fails_on_37(prompts, completions, **_):
        calls.append(len(completions))
        if "37" in completions:
            raise KeyError("37")
        return [0.0] * len(completions)

    B = 64
    completions = [str(i) for i in range(B)]
    with pytest.raises(RewardError,
                       match=r"fails_on_37 raised KeyError: '37' \(sample 37: prompt 'p', completion '37'\)"):
        score(fails_on_37, ["p"] * B, completions)
    # independently: each halving calls the first half, and the second too when the culprit is there
    expected, lo, n = 1, 0, B
    while n > 1:
        n //= 2
        expected += 1 if 37 < lo + n else 2
        lo = lo if 37 < lo + n else lo + n
    assert len(calls) == expected == 10 and len(calls) <= 1 + 2 * math.ceil(math.log2(B))  # was 1 + 38


def test_a_function_that_fails_only_on_the_whole_batch_is_reported_as_the_batch():
    calls = []

    def too_big(prompts, completions, **_):
        calls.append(len(completions))
        if len(completions) > 40:
            raise MemoryError("batch too large for the judge")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"too_big raised MemoryError: batch too large for the judge on the batch "
                                          r"of 64 \(each half alone scores"):
        score(too_big, ["p"] * 64, ["c"] * 64)
    assert calls == [64, 32, 32]  # was 1 + 64 calls, none of which failed


@pytest.mark.parametrize("out, said", [
    (["1.0", "0.0"], r"returned list whose element 0 is str '1.0', not a real number: list \['1.0', '0.0'\]"),
    (None, r"returned NoneType None; expected a list or array of 2 real numbers"),
    ("1.0", r"returned str '1.0'; expected a list or array"),
    (np.array(["1", "0"]), r"returned an array of dtype <U1, not real numbers"),
    ([1.0, 2j], r"returned list whose element 1 is complex 2j, not a real number"),
    ((x for x in [1.0, 0.0]), r"returned generator <generator object"),
    ([[1.0], [0.0]], r"returned list whose element 0 is list \[1.0\], not a real number"),
    ({"a": 1.0, "b": 0.0}, r"returned dict \{'a': 1.0, 'b': 0.0\}"),
])
def test_results_that_are_not_real_numbers_are_rejected_saying_what_came_back(out, said):
    def judge(prompts, completions, **_):
        return out

    with pytest.raises(RewardError, match=r"reward function judge " + said):
        score(judge, ["a", "b"], ["c", "d"])


def test_real_numbers_of_any_numeric_type_are_rewards():
    for out in ([True, False], [1, 0], np.array([1, 0], np.int64), [np.float32(1.0), np.bool_(False)],
                np.array([True, False]), (1.0, 0)):
        np.testing.assert_array_equal(score(lambda p, c, **_: out, ["a", "b"], ["c", "d"]), [1.0, 0.0])
    # a chunk's wrong-length result names the chunk's samples
    with pytest.raises(RewardError, match=r"returned shape \(1,\); expected \(2,\).* on samples 2..3"):
        score(lambda p, c, **_: [0.0] * (2 if "c" in c else 1), PROMPTS, ["c", "c", "d", "d"],
              call_config=RewardCallConfig(batch_size=2))


def test_bad_call_configs_are_refused():
    for kw, said in [(dict(timeout_s=0), "timeout_s"), (dict(on_failure="skip"), "on_failure"),
                     (dict(failure_value=float("nan")), "failure_value"), (dict(batch_size=0), "batch_size"),
                     (dict(workers=0), "workers")]:
        with pytest.raises(ValueError, match=f"RewardCallConfig.{said}"):
            RewardCallConfig(**kw)


def test_a_worker_thread_that_exits_is_a_failed_call_not_a_hang():
    def exits(prompts, completions, **_):
        if "bye" in completions:
            raise SystemExit(3)  # sandboxed code calling sys.exit kills only its thread
        return lengths(prompts, completions)

    s = score_with_failures(exits, PROMPTS, ["a", "bye", "ccc", "d"],
                            call_config=RewardCallConfig(batch_size=1, workers=2, on_failure="value"))
    np.testing.assert_array_equal(s.rewards, [1.0, 0.0, 3.0, 1.0])
    np.testing.assert_array_equal(s.failed, [False, True, False, False])
    with pytest.raises(RewardError, match=r"exits raised SystemExit: 3 \(sample 1: prompt 'p1', completion 'bye'\)"):
        score(exits, PROMPTS, ["a", "bye", "ccc", "d"], call_config=RewardCallConfig(workers=2))
