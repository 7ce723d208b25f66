"""TRL's log_metric / log_extra keyword arguments for reward functions: what a function logs reaches the
caller (`score_with_failures`), the RL iteration's metrics (the mean of every value logged) and sample
records (`extra`, row by row, chunked calls included), and the held-out evaluation's metrics; bad values are
errors naming the metric or column."""
import numpy as np
import pytest

from rljax.rewards import RewardCallConfig, RewardError, score, score_with_failures, weighted_sum

PROMPTS, COMPLETIONS = ["p", "q", "r", "s", "t"], ["ab", "c", "dddd", "", "eee"]
LENGTHS = [2, 1, 4, 0, 3]


def chars(completions, log_metric, log_extra, **kwargs):
    """TRL's form: logs the batch's mean length once per call and each completion's length as a column."""
    log_metric("chars_per_call", float(np.mean([len(c) for c in completions])))
    log_extra("chars", [len(c) for c in completions])
    return [float(len(c)) for c in completions]


def outer():
    got = {"metrics": [], "extra": []}
    return got, dict(log_metric=lambda name, value: got["metrics"].append((name, value)),
                     log_extra=lambda column, values: got["extra"].append((column, list(values))))


@pytest.mark.parametrize("call", [RewardCallConfig(), RewardCallConfig(batch_size=2, workers=3)])
def test_what_a_function_logs_reaches_the_caller_row_by_row(call):
    """One call: one metric value, the column in row order; chunks of 2 on worker threads: one value a chunk
    (2, 2 and 1 rows), the column still in row order."""
    got, loggers = outer()
    s = score_with_failures(chars, PROMPTS, COMPLETIONS, call_config=call, **loggers)
    np.testing.assert_allclose(s.rewards, LENGTHS)
    assert got["extra"] == [("chars", LENGTHS)]
    chunks = [LENGTHS] if call.batch_size is None else [LENGTHS[:2], LENGTHS[2:4], LENGTHS[4:]]
    assert sorted(got["metrics"]) == sorted(("chars_per_call", float(np.mean(c))) for c in chunks)
    # a caller that passes no loggers: the function still gets them (what it logs is dropped)
    np.testing.assert_allclose(score(chars, PROMPTS, COMPLETIONS, call_config=call), LENGTHS)


def test_a_reward_sum_s_terms_log_through_the_sum():
    """A RewardSum scored as one function (its __call__ inside a caller's call): each term's logs are forwarded;
    a term that takes no loggers gets none."""
    def plain(prompts, completions, **columns):
        assert not {"log_metric", "log_extra"} & set(columns)
        return [1.0] * len(completions)

    got, loggers = outer()
    total = score(weighted_sum((0.5, chars), (1.0, plain)), PROMPTS, COMPLETIONS,
                  call_config=RewardCallConfig(batch_size=3), **loggers)
    np.testing.assert_allclose(total, 0.5 * np.array(LENGTHS) + 1.0)
    assert got["extra"] == [("chars", LENGTHS)]
    assert sorted(got["metrics"]) == sorted([("chars_per_call", np.mean(LENGTHS[:3])),
                                             ("chars_per_call", np.mean(LENGTHS[3:]))])


def test_bad_logs_are_errors_naming_the_metric_or_column():
    def logging(what):
        def fn(completions, **kwargs):
            what(completions, kwargs)
            return [0.0] * len(completions)
        return fn

    cases = [
        (lambda c, k: k["log_metric"]("acc", "high"), r"log_metric\('acc', \.\.\.\): the value must be a finite real "
                                                   r"number, got 'high'"),
        (lambda c, k: k["log_metric"]("acc", float("nan")), r"log_metric\('acc', \.\.\.\): .* got nan"),
        (lambda c, k: k["log_metric"]("acc", True), r"log_metric\('acc', \.\.\.\): .* got True"),
        (lambda c, k: k["log_metric"]("", 1.0), "log_metric: the name must be a non-empty str"),
        (lambda c, k: k["log_extra"]("why", ["a", "b"]), r"log_extra\('why', \.\.\.\): one value per sample of the call "
                                                      r"\(\d\), got \['a', 'b'\]"),
        (lambda c, k: k["log_extra"]("why", [object()] * len(c)), r"log_extra\('why', \.\.\.\)\[0\]: a JSON value is needed"),
    ]
    for what, message in cases:
        with pytest.raises(RewardError, match=f"reward function fn raised .*{message}"):
            score(logging(what), PROMPTS, COMPLETIONS)
    # numpy scalars are fine, as numbers
    got, loggers = outer()
    score(logging(lambda c, k: (k["log_metric"]("m", np.float32(0.5)), k["log_extra"]("e", np.arange(5)))), PROMPTS,
          COMPLETIONS, **loggers)
    assert got == {"metrics": [("m", 0.5)], "extra": [("e", [0, 1, 2, 3, 4])]}
    with pytest.raises(RewardError, match="metadata 'log_metric': the name under which reward functions get TRL's "
                                          "log_metric callable, got list"):
        score(chars, PROMPTS, COMPLETIONS, log_metric=[1, 2, 3, 4, 5])


def test_the_rl_iteration_logs_the_mean_of_every_value_and_each_row_s_column():
    """SCST: the sampled rows' call and the greedy baseline's call each log their row count (8 x 3 and 3), so
    the metric is their mean; the sample records carry each row's logged length, which is its completion's."""
    import jax

    from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
    from rljax.sampling import SampleConfig, tokenizer_ids
    from tests.test_recipes_tasks import TOK, small_model

    def reward(completions, log_metric, log_extra, **kwargs):
        log_metric("rows_per_call", len(completions))
        log_extra("chars", [len(c) for c in completions])
        return [float(len(c)) for c in completions]

    model, params, _ = small_model()
    records = []
    cfg = RLConfig(algorithm="scst", sampling=SampleConfig(max_new_tokens=6, n=8, **tokenizer_ids(TOK)))
    iteration = make_rl_iteration(model, cfg, reward, TOK.decode_batch, on_samples=lambda i, r: records.extend(r))
    tokens, mask = TOK.encode_batch(["1+2=", "33*4=", "5-"], padding_side="left")
    state = create_rl_state(model, params, cfg, jax.random.key(0))
    _, metrics = iteration(state, tokens, mask, jax.random.key(1))
    assert metrics["rows_per_call"] == (24 + 3) / 2
    assert len(records) == 24 and all(r["extra"] == {"chars": len(r["completion"])} for r in records)
    assert len({len(r["completion"]) for r in records}) > 1

    # a clash with one of the iteration's own metrics: refused, before the update once the iteration has reported
    # that metric (the state is still usable), after it the first time
    logs = {"reward_mean": False}

    def clash(completions, log_metric, **kwargs):
        if logs["reward_mean"]:
            log_metric("reward_mean", 1.0)
        return [0.0] * len(completions)

    iteration = make_rl_iteration(model, cfg, clash, TOK.decode_batch)
    state = create_rl_state(model, params, cfg, jax.random.key(0))
    state, _ = iteration(state, tokens, mask, jax.random.key(1))
    logs["reward_mean"] = True
    for _ in range(2):  # the state is refused before the update donates it: the same state works again
        with pytest.raises(ValueError, match="a reward function logged 'reward_mean' through log_metric, the name of "
                                             "one of the iteration's own metrics"):
            iteration(state, tokens, mask, jax.random.key(1))


def test_grpo_recipe_logs_metrics_samples_and_held_out_metrics(tmp_path):
    """The recipe: the logged metric in every step's metrics (the mean over the step's rows, here each row's
    length in characters, so it equals the mean of the sample records' completions), the extra column in the
    samples file, and in the held-out evaluation the mean over its greedy completions."""
    from rljax.metrics import read_samples
    from rljax.recipes import GRPOTaskConfig, grpo
    from tests.test_recipes_tasks import small_model

    def reward(prompts, completions, log_metric=None, log_extra=None, **_):
        for c in completions:
            log_metric("chars_logged", len(c))
        log_extra("first", [c[:1] for c in completions])
        return [0.1 * len(c) for c in completions]

    rows = [{"prompt": f"{a}*{a}="} for a in range(4)]
    cfg = GRPOTaskConfig(steps=2, batch_size=2, n=2, max_new_tokens=6, progress=False, samples_every=1)
    run = tmp_path / "run"
    result = grpo(small_model(), rows, reward, cfg, run_dir=str(run), eval_data=rows[:3])
    for step in (1, 2):
        records = read_samples(run, step)
        assert [r["extra"] for r in records] == [{"first": r["completion"][:1]} for r in records]
        assert result.history[step - 1]["chars_logged"] == pytest.approx(np.mean([len(r["completion"])
                                                                                  for r in records]))
        assert result.history[step - 1]["chars_logged"] == pytest.approx(10 * result.history[step - 1]["reward_mean"])
    assert result.eval_metrics["chars_logged"] == pytest.approx(10 * result.eval_metrics["reward_mean"])
