"""reasoning-gym generators as tasks: deterministic offline splits, the package's own score_answer as the
verifier (checked against direct calls), clear errors, and reasoning-gym tasks in the RL loop on CPU."""
import functools
import warnings

import jax
import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

from rljax.data.synthetic import preference_pairs  # noqa: E402
from rljax.models import Model, preset  # noqa: E402
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration  # noqa: E402
from rljax.sampling import SampleConfig  # noqa: E402
from rljax.state import OptimizerConfig  # noqa: E402
from rljax.tasks import TaskAlphabetError, get_task, reasoning_gym_task  # noqa: E402
from rljax.tasks.reasoning_gym import RG_GENERATORS, installed_version  # noqa: E402
from rljax.tokenizer import CharTokenizer  # noqa: E402

TOK = CharTokenizer()
NAMES = ("basic_arithmetic", "chain_sum", "count_bits")


@functools.cache
def package_scorer(name):
    """score_answer of a dataset made by reasoning-gym itself, independent of the adapter."""
    import reasoning_gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reasoning_gym.create_dataset(name, seed=123, size=1).score_answer


def after_tag(completion):
    """The answer as the adapter documents it, written out here: after the last "answer:", stripped."""
    at = completion.rfind("answer:")
    return None if at < 0 else completion[at + len("answer:"):].strip()


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_deterministic_disjoint_and_tokenizable(name):
    task = get_task(f"rg:{name}")
    assert task.name == f"rg:{name}" and task.max_level >= 4 and not task.has_steps and name in RG_GENERATORS
    train, test = task.split(60, 20, levels=(1, 2), seed=5)
    assert (train, test) == task.split(60, 20, levels=(1, 2), seed=5)
    assert [p.prompt for p in task.split(10, 0, levels=(1, 2), seed=6)[0]] != [p.prompt for p in train[:10]]
    questions = [p.entry["question"] for p in train + test]
    assert len(set(questions)) == len(questions) and {p.level for p in train} == {1, 2}
    for p in train + test:
        assert p.prompt == p.entry["question"].strip().lower() + "\n"
        assert p.completion == "answer:" + p.entry["answer"] and task.reference(p) == p.completion
        assert TOK.decode(TOK.encode(p.prompt + p.completion)) == p.prompt + p.completion
        assert task.check(p, p.completion) and task.gold_score(p, p.completion) == 1.0


def test_levels_follow_the_curriculum_and_config_overrides_it():
    task = get_task("rg:chain_sum")
    for level in (1, 2, 3):  # curriculum level L - 1: L + 1 terms of L digits
        for p in task.split(20, 0, levels=(level,), seed=0)[0]:
            assert (p.entry["metadata"]["num_terms"], p.entry["metadata"]["num_digits"]) == (level + 1, level)
    two = reasoning_gym_task("chain_sum", min_terms=3, max_terms=3)  # your fields win over the curriculum's
    assert all(p.entry["metadata"]["num_terms"] == 3 for p in two.split(20, 0, levels=(1,), seed=0)[0])
    with pytest.raises(ValueError, match=r"level 12 is not one of 1..11"):
        task.split(1, 0, levels=(12,))


@pytest.mark.parametrize("name", NAMES)
def test_check_and_score_agree_with_score_answer(name):
    task = get_task(f"rg:{name}")
    scorer = package_scorer(name)
    rng = np.random.default_rng(0)
    seen = set()
    for p in task.split(40, 0, levels=(1, 2, 3), seed=1)[0]:
        a = p.answer
        completions = [p.completion, f"answer: {a} ", f"answer:1;answer:{a}", f"answer:{a};answer:1", a, "",
                       f"answer:{a}0", f"answer:0{a}", f"answer:{a}.0", f"answer:x{a}"]
        completions += [task.candidate(p, rng, kind) for kind in task.corruptions]
        for c in completions:
            direct = scorer(after_tag(c), p.entry)
            assert task.score(p, c) == direct and task.check(p, c) == (direct == 1.0), (p.entry, c)
            assert task.gold_score(p, c) == pytest.approx(direct - 0.01 * max(0, len(c) - len(p.completion)))
            seen.add(direct if direct in (0.0, 1.0) else "partial")
    assert seen == {0.0, 1.0, "partial"}  # right, wrong and partly right answers all occur


def test_hand_computed_scores():
    plain, decimal = get_task("rg:basic_arithmetic"), get_task("rg:chain_sum")
    p = plain.split(1, 0, seed=0)[0][0]
    q = decimal.split(1, 0, seed=0)[0][0]
    assert p.answer == "-15" and q.answer == "6"  # calculate -7 - 8; 6 + 0
    assert plain.score(p, "answer:-15") == 1.0 and plain.score(p, "answer:-150") == 0.75  # base: 3/4 overlap
    assert plain.score(p, "answer:-15.0") == 0.6 and not plain.check(p, "answer:-15.0")
    assert decimal.score(q, "answer:06") == 1.0 and decimal.score(q, "answer:6.00") == 1.0  # decimal equality
    assert decimal.score(q, "answer:60") == 0.5 and decimal.check(q, "ok;answer:+6")
    assert plain.score(p, "-15") == 0.0  # no tag, no answer
    assert plain.gold_score(p, "so it is;answer:-15") == pytest.approx(1.0 - 0.09)


def test_corruptions_and_synthetic_pairs():
    task = get_task("rg:basic_arithmetic")
    assert task.corruptions == ("wrong_answer", "truncated", "verbose")
    problems = task.split(40, 0, levels=(1, 2), seed=2)[0]
    rng = np.random.default_rng(1)
    for p in problems:
        for kind in task.corruptions:
            c = task.candidate(p, rng, kind)
            assert c != p.completion and task.check(p, c) == (kind == "verbose")
    pairs = preference_pairs(problems, 0, noise_free=True, task=task)
    assert all(r["prompt"] == p.prompt and r["gold_margin"] >= 0 for p, r in zip(problems, pairs))
    assert task.format_reward()(["p"] * 3, ["answer:3", " ok;answer:3", "3"]).tolist() == [1, 0, 0]


def test_errors_name_the_generator_the_version_and_the_character():
    with pytest.raises(ValueError, match=rf"reasoning-gym {installed_version()} has no generator 'chain_sums'"):
        get_task("rg:chain_sums")
    with pytest.raises(ValueError, match=r"chain_sum: unknown config field\(s\) \['terms'\].*'max_terms'"):
        get_task("rg:chain_sum", terms=3)
    with pytest.raises(TaskAlphabetError, match=r"task 'rg:basic_arithmetic' generated the character 'C' \(in the "
                                                r"prompt 'Calculate"):
        reasoning_gym_task("basic_arithmetic", lowercase=False).split(1, 0, seed=0)
    with pytest.raises(TaskAlphabetError, match=r"task 'rg:spell_backward' generated the character '[A-Z]' \(in "
                                                r"the reference completion"):
        get_task("rg:spell_backward").split(50, 0, seed=0)  # some words are capitalised names
    custom = reasoning_gym_task("count_bits", render=lambda q: q.split("number ")[-1].rstrip("?") + " bits=")
    assert custom.split(1, 0, seed=0)[0][0].prompt == "179 bits="


def test_reasoning_gym_tasks_in_the_rl_loop():
    """A few RL iterations of a tiny model on a batch mixing two reasoning-gym tasks; the rewards the loop
    computed equal score_answer called directly on the same completions. The decode maps the sampled
    ids to text with the model's first token choosing among the reference, the model's own text, a
    partly right and a wrong answer, so that the rewards cover 1, 0 and partial credit."""
    tasks = {t.name: t for t in (get_task("rg:basic_arithmetic"), get_task("rg:chain_sum"))}
    pools = {name: t.split(6, 0, levels=(1,), seed=3)[0] for name, t in tasks.items()}
    batches = [pools["rg:basic_arithmetic"][2 * i:2 * i + 2] + pools["rg:chain_sum"][2 * i:2 * i + 2]
               for i in range(3)]
    n, current, calls = 4, {}, []

    def decode(ids):
        out = []
        for r, row in enumerate(np.asarray(ids)):
            p, own = current["problems"][r // n], TOK.decode(row)
            choice = int(row[0]) % 4
            out.append([p.completion, own, f"answer:{p.answer}0", f"ok;answer:{p.answer}7"][choice])
        return out

    def reward(prompts, completions, *, problems):
        """Each sample scored by its own task's score_reward."""
        out = np.zeros(len(completions), np.float32)
        for name, task in tasks.items():
            rows = [i for i, p in enumerate(problems) if p.task == name]
            if rows:
                out[rows] = task.score_reward()([prompts[i] for i in rows], [completions[i] for i in rows],
                                                problems=[problems[i] for i in rows])
        calls.append((list(completions), list(problems), out.copy()))
        return out

    def accuracy(prompts, completions, *, problems):
        return [float(tasks[p.task].check(p, c)) for p, c in zip(problems, completions)]

    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))
    cfg = RLConfig(algorithm="grpo",
                   sampling=SampleConfig(max_new_tokens=6, n=n, eos_id=TOK.eos_id, pad_id=TOK.pad_id),
                   optimizer=OptimizerConfig(lr=1e-3, schedule="constant"))
    it = make_rl_iteration(model, cfg, reward, decode, accuracy_fn=accuracy,
                           decode_prompts=functools.partial(TOK.decode_batch, stop_at_eos=False))
    state = create_rl_state(model, model.init(jax.random.key(0)), cfg, jax.random.key(1))
    every = []
    for batch in batches:
        current["problems"] = batch
        tokens, mask = TOK.encode_batch([p.prompt for p in batch], padding_side="left", length=80)
        state, m = it(state, tokens, mask, problems=batch)
        completions, problems, rewards = calls[-1]
        assert [p.entry for p in problems] == [p.entry for p in batch for _ in range(n)]
        direct = np.array([package_scorer(p.entry["metadata"]["source_dataset"])(after_tag(c), p.entry)
                           for c, p in zip(completions, problems)], np.float32)
        np.testing.assert_array_equal(rewards, direct)
        assert m["reward_mean"] == pytest.approx(direct.mean(), abs=1e-6)
        assert m["accuracy"] == pytest.approx(np.mean(direct == 1.0), abs=1e-6)
        every += direct.tolist()
    assert len(calls) == 3 and {0.0, 1.0} <= set(every) and any(0 < r < 1 for r in every)
