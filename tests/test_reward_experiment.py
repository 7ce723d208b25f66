"""The reward-model experiment's --smoke setting runs and reports consistent numbers (slow: `make
test-slow`); the gold-ranked lists it trains on."""
import json

import numpy as np
import pytest

from rljax.metrics import read_metrics


@pytest.mark.slow  # every part of the experiment, ~2 min on 2 cores
def test_reward_models_smoke_reports_consistent_best_of_n(tmp_path):
    from experiments import reward_models

    res = reward_models.main(reward_models.Config(smoke=True, sft_run_dir=str(tmp_path / "sft"),
                                                  run_dir=str(tmp_path / "rm"), progress=False, feedback_rl=False,
                                                  refresh_every=1, onpolicy_prior=True))
    table = res["bon"]["table"]
    # one candidate: every selection method picks it, so all equal the sample accuracy
    assert len(set(table[1].values())) == 1
    # pass@N is the ceiling of every selection method
    assert all(v <= table[4]["pass@n"] for v in table[4].values())
    # held-out pairwise accuracy counts right pairs, ties as halves: 2 * accuracy * pairs is an integer
    bt, held = res["bt"]["rows"][0], res["bt"]["held_out_pairs"]
    assert bt["pairs"] == 16 and held >= 1 and abs(2 * bt["pairwise_accuracy"] * held
                                                   - round(2 * bt["pairwise_accuracy"] * held)) < 1e-6
    # GRPO against the learned reward model: gold gain = mean of the per-seed gold changes
    rl = res["rl"]
    assert rl["gold_gain_mean"] == pytest.approx(np.mean([a["gold"] - rl["before"]["gold"] for a in rl["after"]]))
    # the on-policy reward model is evaluated on ranked lists of the policy's own samples and optimised by GRPO
    # while it is retrained on the current policy's samples (iterative RLHF)
    on = res["onpolicy"]
    assert on["pairs"] >= on["lists"] >= 1
    # the reported accuracy is the one the reward-model phase logged for its final state
    logged = [r for r in read_metrics(str(tmp_path / "rm" / "onpolicy")) if any(k.endswith("eval/pairwise_accuracy")
                                                                              for k in r)]
    assert logged and next(v for k, v in logged[-1].items() if k.endswith("eval/pairwise_accuracy")) == \
        pytest.approx(on["pairwise_accuracy"], abs=1e-6)
    # the same held-out samples of the same SFT policy (only the proxy that scores them differs)
    assert all(on["rl_refreshed"]["before"][k] == rl["before"][k] for k in ("gold", "accuracy", "length"))
    # with the SFT log-likelihood as the prior: the prior alone is scored and optimised too
    assert 0.0 <= on["prior_pairwise_accuracy"] <= 1.0
    assert on["rl_prior_alone"]["before"]["gold"] == rl["before"]["gold"]
    # one refresh (before iteration 2 of 2), its lists saved with the run (rljax.pipelines.iterative_rlhf)
    refreshes = on["rl_refreshed"]["after"][0]["refreshes"]
    saved = tmp_path / "rm" / "rl-onpolicy-prior-refreshed-seed0" / "round-1" / "lists.json"
    assert [r["round"] for r in refreshes] == [1]
    assert refreshes[0]["new_lists"] == len(json.loads(saved.read_text())["lists"])
    # feedback models: the true mean relevance is the same held-out candidates' for all three
    fb = res["feedback"]
    assert set(fb) == {"clicks_naive", "clicks_ipw", "likes"}
    assert len({round(v["relevance_mean"], 9) for v in fb.values()}) == 1
    # over-optimisation: best-of-1 is the policy itself (d = 0), best-of-n picks the highest proxy score
    bon = res["overopt"]["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 4] and bon[0]["d"] == 0.0
    assert bon[0]["proxy"] <= bon[1]["proxy"] <= bon[2]["proxy"]
    assert [c["iteration"] for c in res["overopt"]["rl"]] == [0, 1, 2]


def test_gold_ranked_lists_rank_by_gold_with_ties_and_drop_uninformative_problems():
    from experiments.reward_models import gold_ranked_lists
    from rljax.data.arithmetic import make_split
    from rljax.data.synthetic import gold_score

    p, q = make_split(2, 0, levels=(1,), seed=0)[0]
    right, wrong = p.completion, p.completion.replace(str(p.answer), str(p.answer + 1))
    lists = gold_ranked_lists([p, q], [[wrong, right, right, ""], [q.completion, q.completion]])
    assert len(lists) == 1  # q's samples all tie: no preference
    prompt, answers, ranks = lists[0]
    assert prompt == p.prompt and sorted(answers) == sorted({right, wrong})  # distinct, non-empty
    best = answers[ranks.index(0)]
    assert gold_score(p, best) == max(gold_score(p, a) for a in answers) and best == right


def test_priors_follow_their_answers_and_the_scorer_adds_them_to_the_head():
    """with_priors attaches prior(prompt, answer) to each answer of each list, in order; the
    on-policy scorer is head + prior, which at the zero-initialised head is the prior."""
    import jax

    from experiments.reward_models import onpolicy_scorer, ranked_collate, with_priors
    from rljax.models import Model, add_head, preset
    from rljax.tokenizer import CharTokenizer

    def prior(prompts, completions):
        return np.array([len(p) - 0.5 * len(c) for p, c in zip(prompts, completions)], np.float32)

    lists = [("1+1=", ["2", "33"], [0, 1]), ("2*2=", ["4", "5", "666"], [0, 1, 1])]
    assert with_priors(lists, None) == lists and with_priors([], prior) == []
    out = with_priors(lists, prior)
    assert [x[3] for x in out] == [[3.5, 3.0], [3.5, 3.5, 2.5]] and [x[:3] for x in out] == lists
    tok = CharTokenizer()
    batch = ranked_collate(tok, 3)(out)
    np.testing.assert_array_equal(batch.prior, [[3.5, 3.0, 0.0], [3.5, 3.5, 2.5]])
    model = Model(preset("tiny", n_layers=1))
    rm, params = add_head(model, model.init(jax.random.key(0)), "reward")
    np.testing.assert_allclose(onpolicy_scorer(rm, params, tok, prior)(["1+1=", "2*2="], ["2", "666"]), [3.5, 2.5],
                               atol=1e-6)
