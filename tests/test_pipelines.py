"""The stage driver: a run killed at a stage boundary or in the middle of a stage's training and
started again ends bit-identical to an uninterrupted run, a finished stage's collect is never
called again, and iterative RLHF checkpoints (and restores) the refreshed reward model's params
and optimizer state with the policy."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rljax.checkpoint import Checkpointer
from rljax.data.collate import BatchIterator
from rljax.phases import LoopConfig, PromptBatch, run_loop
from rljax.pipelines import STAGES_DIR, IterativeRLHFConfig, Stage, create_rlhf_state, iterative_rlhf, run_stages
from rljax.state import OptimizerConfig, create_state


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


@struct.dataclass
class Toy:
    """A component: step (the data position) and a weight vector [2] pulled towards the batches' mean."""

    step: jax.Array
    w: jax.Array


@jax.jit
def _toy_step(state: Toy, batch):
    w = state.w + 0.3 * (jnp.mean(batch, axis=0) - state.w) + 0.01 * jnp.sin(state.w * 7.0)
    return Toy(step=state.step + 1, w=w), {"loss": jnp.sum((w - jnp.mean(batch, axis=0)) ** 2)}


def _toy_pipeline(calls, kill_collect=None, kill_step=None, rounds=3, steps=3):
    """Rounds of: collect 8 points [8, 2] from the current weights of "a" (a function of the
    state) -> train "a" `steps` steps on them, then "b" `steps` steps on the points of "a"'s
    update. kill_collect=r raises in round r's collect; kill_step=(component, s) raises when that
    component's phase evaluates step s (checkpoints are written every step, after the eval)."""

    def collect(r, state, ctx):
        calls.append(r)
        if kill_collect == r:
            raise Killed(f"collect {r}")
        base = np.asarray(state["a"].w, np.float64)
        return (base[None, :] + np.linspace(-1, 1, 8)[:, None] * (r + 1) + 0.1 * r).tolist()

    def phase(name, state, points, target, ctx):
        def eval_fn(s):
            if kill_step == (name, int(s.step)):
                raise Killed(f"{name} step {int(s.step)}")
            return {}
        data = BatchIterator(points, 4, lambda rows: np.asarray(rows, np.float32), seed=ctx.index)
        loop = LoopConfig(steps=target, log_every=1, eval_every=1, checkpoint_every=1, progress=False)
        return run_loop(state, _toy_step, data, loop, run_dir=ctx.component_dir(name), eval_fn=eval_fn, name=name)

    def train(r, state, points, ctx):
        a = phase("a", state["a"], points, (r + 1) * steps, ctx)
        moved = (np.asarray(points) - 0.5 * np.asarray(a.w)).tolist()
        b = phase("b", state["b"], moved, (r + 1) * steps, ctx)
        return {"a": a, "b": b}

    return [Stage(f"round-{r}", collect=lambda s, c, r=r: collect(r, s, c),
                  train=lambda s, d, c, r=r: train(r, s, d, c)) for r in range(rounds)]


def _toy_state():
    return {"a": Toy(step=jnp.int32(0), w=jnp.zeros(2, jnp.float32)),
            "b": Toy(step=jnp.int32(0), w=jnp.ones(2, jnp.float32))}


def _same(x, y):
    def data(a):
        return jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(data(a)), np.asarray(data(b)))


def test_resume_after_kills_at_a_boundary_and_mid_training_is_bit_identical(tmp_path):
    calls = []
    full, outputs = run_stages(_toy_state(), _toy_pipeline(calls), run_dir=str(tmp_path / "full"))
    assert calls == [0, 1, 2] and int(full["a"].step) == int(full["b"].step) == 9
    memory, _ = run_stages(_toy_state(), _toy_pipeline([]))  # no run directory: the same run in memory
    _same(full, memory)

    run = str(tmp_path / "killed")
    calls = []
    with pytest.raises(Killed):  # killed at the boundary: round 1's collection
        run_stages(_toy_state(), _toy_pipeline(calls, kill_collect=1), run_dir=run)
    assert calls == [0, 1] and not os.path.exists(os.path.join(run, "round-1", "data.json"))
    calls = []
    with pytest.raises(Killed):  # killed in round 1's training of "b", after "a" finished its steps
        run_stages(_toy_state(), _toy_pipeline(calls, kill_step=("b", 5)), run_dir=run)
    assert calls == [1]  # round 0 finished: not collected again
    with Checkpointer(os.path.join(run, "b", "checkpoints")) as ckpt:
        # the kill came in step 5's eval, after step 5 finished: run_loop checkpoints the last finished
        # step before an exception propagates
        assert ckpt.latest_step() == 5
    calls = []
    resumed, resumed_outputs = run_stages(_toy_state(), _toy_pipeline(calls), run_dir=run)
    assert calls == [2]  # round 1's data were saved: reused, not collected again
    _same(full, resumed)
    assert resumed_outputs == outputs  # round 0's and 1's data read back from the run directory
    # the finished run is not run again; a different pipeline in the same directory is refused
    calls = []
    again, _ = run_stages(_toy_state(), _toy_pipeline(calls), run_dir=run)
    assert calls == [] and int(again["b"].step) == 9
    _same(full, again)
    with pytest.raises(ValueError, match="stage 3"):
        run_stages(_toy_state(), [Stage(f"other-{r}", train=lambda s, d, c: s) for r in range(3)], run_dir=run)


def test_stage_arguments_results_rows_and_missing_inputs_are_checked(tmp_path):
    """A stage's args are saved and a rerun with other ones is refused naming the stage, the file and the
    field; each stage's results row lands in <stage>/results.json and the pipeline's table (results.jsonl,
    results.md) in stage order, also for rows recorded by a resumed run; a finished stage whose data file
    is gone is an error naming the stage and the file, also when a later stage reads it."""
    from rljax.pipelines import StageArgumentsError, read_results

    def stages(scale=1.0, kill=False):
        def collect(r, state, ctx):
            return [scale * (r + 1)]

        def train(r, state, data, ctx):
            if kill and r == 1:
                raise Killed("train 1")
            if r == 1:
                assert ctx.data("round-0") == [scale]  # an earlier stage's data, read back after a resume
            ctx.record({"round": r, "value": data[0], **({"extra": "x"} if r else {})})
            return state.replace(step=state.step + 1, w=state.w + data[0])

        return [Stage(f"round-{r}", collect=lambda s, c, r=r: collect(r, s, c),
                      train=lambda s, d, c, r=r: train(r, s, d, c), args={"scale": scale, "round": r})
                for r in range(2)]

    toy = _toy_state()["a"]
    run = str(tmp_path / "run")
    with pytest.raises(Killed):
        run_stages(toy, stages(kill=True), run_dir=run)
    assert read_results(run) == [{"stage": "round-0", "round": 0, "value": 1.0}]
    results = {}
    state, _ = run_stages(toy, stages(), run_dir=run, results=results)
    rows = [{"stage": "round-0", "round": 0, "value": 1.0}, {"stage": "round-1", "round": 1, "value": 2.0,
                                                             "extra": "x"}]
    assert [results[f"round-{r}"] for r in range(2)] == rows and read_results(run) == rows
    assert json.load(open(os.path.join(run, "round-1", "results.json"))) == rows[1]
    assert open(os.path.join(run, "results.md")).read().splitlines() == [
        "| stage | round | value | extra |", "| --- | --- | --- | --- |", "| round-0 | 0 | 1 |  |",
        "| round-1 | 1 | 2 | x |"]
    assert json.load(open(os.path.join(run, "round-0", "stage.json"))) == {"scale": 1.0, "round": 0}
    memory = {}
    in_memory, _ = run_stages(toy, stages(), results=memory)
    assert memory == results
    _same(state, in_memory)

    with pytest.raises(StageArgumentsError, match=r"stage 'round-0': .*round-0/stage.json was written by other "
                                                  r"arguments \(scale: 1.0 -> 2.0\)"):
        run_stages(toy, stages(scale=2.0), run_dir=run)
    os.remove(os.path.join(run, "round-0", "data.json"))
    with pytest.raises(FileNotFoundError, match=r"stage 'round-0': its data .*round-0/data.json is missing"):
        run_stages(toy, stages(), run_dir=run)
    # a later stage reads the missing data: refused before that stage trains anything again
    run2 = str(tmp_path / "run2")
    with pytest.raises(Killed):
        run_stages(toy, stages(kill=True), run_dir=run2)
    os.remove(os.path.join(run2, "round-0", "data.json"))
    before = sorted(os.listdir(os.path.join(run2, "round-1")))
    with pytest.raises(FileNotFoundError, match=r"stage 'round-0': its data .*round-0/data.json is missing"):
        run_stages(toy, stages(), run_dir=run2)
    assert sorted(os.listdir(os.path.join(run2, "round-1"))) == before


# ----------------------------------------------------------------------------- iterative RLHF

LISTS = [("1+1=", ["2", "3", "11"], [0, 1, 2]), ("2+2=", ["4", "5"], [0, 1]), ("1+2=", ["3", "4", "12"], [0, 1, 1])]


@pytest.fixture(scope="module")
def rlhf_setup():
    from rljax.data.reward_collate import collate_ranked
    from rljax.losses import GRPOConfig
    from rljax.models import Model, add_head, preset
    from rljax.rewards.learned import reward_model_reward
    from rljax.rl import RLConfig
    from rljax.sampling import SampleConfig
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = Model(preset("tiny", n_layers=1, d_model=64, mlp_dim=128, vocab_size=tok.vocab_size))
    params = jax.jit(model.init)(jax.random.key(0))  # one compile, not op by op
    rm, rm_params = add_head(model, params, "reward")
    rm_opt = OptimizerConfig(lr=1e-2, schedule="constant")
    rm_state = create_state(rm, rm_opt, jax.random.key(3), params=rm_params)
    rl_cfg = RLConfig(algorithm="grpo", sampling=SampleConfig(max_new_tokens=3, n=2, temperature=1.0,
                                                              eos_id=tok.eos_id, pad_id=tok.pad_id),
                      loss=GRPOConfig(kl_coef=0.04), optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
    cfg = IterativeRLHFConfig(iterations=2, refresh_every=1, rm_epochs=1, rm_batch_size=2, rm_optimizer=rm_opt,
                              log_every=1, checkpoint_every=1, progress=False)

    def collate(lists):
        return collate_ranked(tok, [tuple(x) for x in lists], answers_per_list=3)

    prompts = [q for q, _, _ in LISTS]

    def prompt_collate(rows):
        t, m = tok.encode_batch(rows, padding_side="left")
        return PromptBatch(tokens=t, mask=m, metadata={})

    return dict(tok=tok, model=model, params=params, rm=rm, rm_state=rm_state, rl_cfg=rl_cfg, cfg=cfg,
                collate=collate, reward_model_reward=reward_model_reward,
                prompts=BatchIterator(prompts, 2, prompt_collate, seed=0))


def _rlhf(s, run_dir, log, kill_rank=False, kill_reward_call=None):
    def rank_samples(policy_params, r):  # a stand-in for gold-ranked samples of the policy
        log.append(("rank", r))
        if kill_rank:
            raise Killed("rank")
        return [list(x) for x in LISTS[r - 1:r + 1]]

    def make_reward(rm_params):
        score = s["reward_model_reward"](s["rm"], rm_params, s["tok"])

        def reward(prompts, completions, **_):
            log.append(("reward",))
            if kill_reward_call is not None and sum(e == ("reward",) for e in log) == kill_reward_call:
                raise Killed("reward")
            return score(prompts, completions)
        return reward

    state = create_rlhf_state(s["model"], s["params"], s["rm_state"], s["rl_cfg"], jax.random.key(5))
    return iterative_rlhf(state, s["prompts"], rank_samples, make_reward, s["cfg"], s["rl_cfg"], model=s["model"],
                          rm_model=s["rm"], decode=s["tok"].decode_batch, collate=s["collate"],
                          initial_lists=LISTS[:1], run_dir=run_dir)


def _stand_in_rl(state, prompts, reward_fn, rl_cfg, *, model, decode, steps, run_dir=None, log_every=10,
                 checkpoint_every=0, eval_every=0, progress=True, eval_fn=None, tensorboard=None, wandb=None):
    """`pipelines.train_rl` without its compile time: each iteration scores the batch's prompts (as
    completions) with reward_fn and moves the policy's params by 1e-2·mean reward·sin(θ), on the real
    RLState, through run_loop (checkpoints and resume as the RL phase)."""
    move = jax.jit(lambda p, r: jax.tree.map(lambda x: x + 1e-2 * r * jnp.sin(x), p))

    def step(s, batch):
        text = decode(batch.tokens)
        r = jnp.float32(np.mean(reward_fn(text, text)))
        return s.replace(step=s.step + 1, policy=s.policy.replace(params=move(s.policy.params, r))), {"loss": r}

    loop = LoopConfig(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, progress=progress,
                      tensorboard=tensorboard, wandb=wandb)
    return run_loop(state, step, prompts, loop, run_dir=run_dir, name="rl")


def test_allow_change_records_changed_stage_arguments_and_reaches_the_stages_still_to_run(tmp_path, capsys):
    """allow_change=True (the studies' --force-config): a rerun with other args records them (stage.json
    rewritten, the change appended to stage_changes.jsonl beside it) instead of refusing; the finished stage
    is not run again (its output stands, said), the interrupted one and those after it run with the new
    values, and a later rerun with the new values needs no allow_change."""
    from rljax.pipelines import StageArgumentsError

    calls = []

    def stages(lr, kill=False):
        def train(r, state, data, ctx):
            calls.append((r, lr))
            if kill and r == 1:
                raise Killed("train 1")
            return state.replace(step=state.step + 1, w=state.w + lr)

        return [Stage(f"s{r}", train=lambda s, d, c, r=r: train(r, s, d, c), args={"lr": lr, "round": r})
                for r in range(3)]

    toy, run = _toy_state()["a"], str(tmp_path / "run")
    with pytest.raises(Killed):
        run_stages(toy, stages(1.0, kill=True), run_dir=run)
    with pytest.raises(StageArgumentsError, match=r"stage 's0': .*s0/stage.json was written by other arguments "
                                                  r"\(lr: 1.0 -> 2.0\); .*allow_change=True"):
        run_stages(toy, stages(2.0), run_dir=run)
    assert calls == [(0, 1.0), (1, 1.0)]
    assert json.load(open(os.path.join(run, "s0", "stage.json"))) == {"lr": 1.0, "round": 0}  # nothing written
    capsys.readouterr()

    state, _ = run_stages(toy, stages(2.0), run_dir=run, allow_change=True)
    assert calls == [(0, 1.0), (1, 1.0), (1, 2.0), (2, 2.0)]
    np.testing.assert_array_equal(np.asarray(state.w), np.full(2, 1.0 + 2.0 + 2.0, np.float32))
    assert int(state.step) == 3
    for r in range(2):  # both stages that had run: new args saved, the change recorded once
        assert json.load(open(os.path.join(run, f"s{r}", "stage.json"))) == {"lr": 2.0, "round": r}
        lines = open(os.path.join(run, f"s{r}", "stage_changes.jsonl")).read().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["changes"] == {"lr": [1.0, 2.0]}
    assert not os.path.exists(os.path.join(run, "s2", "stage_changes.jsonl"))  # first run of s2: no change
    out = capsys.readouterr().out
    assert "stage 's0' finished under its saved arguments and is not run again" in out
    assert "stage 's1' finished" not in out and "s1/stage.json: configuration changed (lr)" in out

    run_stages(toy, stages(2.0), run_dir=run)  # the recorded values are the run's now
    assert calls[-1] == (2, 2.0) and len(calls) == 4


@pytest.mark.parametrize("real_rl", [False, pytest.param(True, marks=pytest.mark.slow)])  # GRPO: ~4 compiles
def test_iterative_rlhf_checkpoints_the_refreshed_reward_model_and_resumes_bit_identically(rlhf_setup, tmp_path,
                                                                                          monkeypatch, real_rl):
    s = rlhf_setup
    if not real_rl:
        import rljax.pipelines

        monkeypatch.setattr(rljax.pipelines, "train_rl", _stand_in_rl)
    log = []
    full, stats = _rlhf(s, str(tmp_path / "full"), log)
    assert log.count(("rank", 1)) == 1 and int(full["policy"].step) == 2
    assert [x["round"] for x in stats] == [1] and stats[0]["new_lists"] == 2
    rm0 = s["rm_state"]
    assert int(full["reward_model"].step) == int(rm0.step) + 1  # max(1 epoch · 2 lists / batch 2, 1) steps
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full["reward_model"].params),
                                                     jax.tree.leaves(rm0.params))]
    assert any(moved)

    run = str(tmp_path / "killed")
    log = []
    with pytest.raises(Killed):  # round 0 done; killed collecting round 1
        _rlhf(s, run, log, kill_rank=True)
    log = []
    with pytest.raises(Killed):  # killed in round 1's RL iteration, after its reward model trained
        _rlhf(s, run, log, kill_reward_call=1)
    assert log == [("rank", 1), ("reward",)]
    with Checkpointer(os.path.join(run, "reward_model", "checkpoints")) as ckpt:
        assert ckpt.latest_step() == int(full["reward_model"].step)
    log = []
    resumed, resumed_stats = _rlhf(s, run, log)
    assert log == [("reward",)]  # no new ranking: round 1's lists were saved
    assert resumed_stats == stats
    _same(full, resumed)
    rm_lines = [json.loads(x) for x in open(os.path.join(run, "reward_model", "metrics.jsonl"))]
    assert [x["step"] for x in rm_lines] == [int(full["reward_model"].step)]  # trained once, then restored

    # the stage checkpoint holds the refreshed reward model (params and optimizer state) with the policy
    fresh = create_rlhf_state(s["model"], s["params"], s["rm_state"], s["rl_cfg"], jax.random.key(5))
    with Checkpointer(os.path.join(run, STAGES_DIR)) as ckpt:
        restored, meta = ckpt.restore(fresh)
    assert meta["stage"] == "round-1"
    _same(full["reward_model"], restored["reward_model"])
    _same(full["policy"], restored["policy"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored["reward_model"].opt_state),
                                                         jax.tree.leaves(rm0.opt_state)))


def test_results_are_drawn_across_stages_and_runs_summarised_by_hand(tmp_path):
    """Each recorded row redraws run_dir/results.png (the plot columns the rows have: accuracy, reward, length,
    KL, gold*); `summarise_runs` of three runs gives per stage the mean, the sample sd and the count of every
    numeric column, computed here by hand, as summary.jsonl / summary.md / summary.png; a run without a table
    is an error naming its file."""
    from rljax.pipelines import markdown_table, plot_columns, read_results, summarise_runs

    values = {0: (0.25, 0.5, 3.0), 1: (0.5, 0.25, 5.0), 2: (0.75, 1.0, 4.0)}

    def stages(seed):
        def train(r, state, data, ctx):
            greedy, gold, length = values[seed]
            row = {"accuracy_greedy": greedy + r, "gold_mean": gold * (r + 1), "completion_length": length,
                   "kept": 7, "ok": True}
            ctx.record(row if r == 0 else {k: v for k, v in row.items() if k != "kept"})
            return state
        return [Stage(name, train=lambda s, d, c, r=r: train(r, s, d, c)) for r, name in enumerate(("sft", "rl"))]

    runs = [str(tmp_path / f"seed{s}") for s in values]
    for seed, run in zip(values, runs):
        run_stages(_toy_state()["a"], stages(seed), run_dir=run)
        png = open(os.path.join(run, "results.png"), "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_results(runs[0])
    assert plot_columns(rows) == ["accuracy_greedy", "completion_length", "gold_mean"]  # not kept, not the bool
    assert markdown_table(rows, ["kept", "absent", "stage", "gold_mean"]).splitlines() == [
        "| kept | stage | gold_mean |", "| --- | --- | --- |", "| 7.000 | sft | 0.500 |", "|  | rl | 1.000 |"]
    summary = summarise_runs(runs[:2] + runs[2:], str(tmp_path / "summary"))
    greedy = np.array([v[0] for v in values.values()])
    gold = np.array([v[1] for v in values.values()])
    assert [s["stage"] for s in summary] == ["sft", "rl"] and [s["runs"] for s in summary] == [3, 3]
    sft, rl = summary
    np.testing.assert_allclose([sft["accuracy_greedy"], rl["accuracy_greedy"]], [greedy.mean(), greedy.mean() + 1])
    np.testing.assert_allclose(sft["accuracy_greedy_sd"], np.sqrt(((greedy - greedy.mean()) ** 2).sum() / 2))
    np.testing.assert_allclose([rl["gold_mean"], rl["gold_mean_sd"]], [2 * gold.mean(), 2 * gold.std(ddof=1)])
    assert sft["kept"] == 7 and sft["kept_sd"] == 0 and sft["kept_n"] == 3 and "kept" not in rl
    assert "ok" not in sft  # booleans are not averaged
    lines = open(tmp_path / "summary" / "summary.md").read().splitlines()
    assert lines[0] == "| stage | runs | accuracy_greedy | gold_mean | completion_length | kept |"
    assert lines[2].startswith("| sft | 3 | 0.5 ± 0.25 | 0.5833 ± 0.3819 | 4 ± 1 | 7 ± 0 |")
    assert [json.loads(x) for x in open(tmp_path / "summary" / "summary.jsonl")] == summary
    assert open(tmp_path / "summary" / "summary.png", "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match=r"nothing/results.jsonl is missing"):
        summarise_runs([str(tmp_path / "nothing")])
    from experiments import stage_summary  # the command line: the same table

    assert stage_summary.main(stage_summary.Config(runs=tuple(runs), out=str(tmp_path / "cli"))) == summary
    assert open(tmp_path / "cli" / "summary.md").read().splitlines() == lines


def test_a_summary_plots_the_columns_asked_for_and_marks_values_fewer_runs_have(tmp_path, monkeypatch):
    from rljax import metrics
    from rljax.pipelines import summarise_runs

    runs = []
    for seed, row in enumerate(({"accuracy_greedy": 0.5, "round": 1, "kl_to_start": 0.01},
                                {"accuracy_greedy": 0.7, "round": 1})):
        d = tmp_path / f"seed{seed}"
        run_stages(_toy_state()["a"], [Stage("grpo", train=lambda s, d_, c, row=row: (c.record(row), s)[1])],
                   run_dir=str(d))
        runs.append(str(d))
    plotted = []
    def fake_plot(runs, columns, out):
        plotted.append(list(columns))
        open(out, "wb").close()

    monkeypatch.setattr(metrics, "plot_stages", fake_plot)
    summarise_runs(runs, str(tmp_path / "s1"), columns=["accuracy_greedy"])
    summarise_runs(runs, str(tmp_path / "s2"))
    assert plotted == [["accuracy_greedy"], ["accuracy_greedy", "kl_to_start"]]  # the default: plot_columns
    lines = (tmp_path / "s2" / "summary.md").read_text().splitlines()
    assert lines[0] == "| stage | runs | accuracy_greedy | round | kl_to_start |"
    assert lines[2] == "| grpo | 2 | 0.6 ± 0.1414 | 1 ± 0 | 0.01 (n=1) |"
