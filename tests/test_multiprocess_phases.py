"""The phases on two processes (2 CPU devices each, one 4-device mesh) compute what one process with
4 devices computes: each process keeps its own rows of the global batch, only process 0 writes
metrics and prints, evaluations and checkpoints run everywhere, a resumed run equals an uninterrupted
one, and the RL iteration samples, scores and updates as one process does."""
import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from rljax.losses.sft import SFTConfig
from rljax.metrics import read_metrics
from test_multihost import _env, _free_port, wait_for_workers

# One script for every run: argv = mode, process_id, port (0: one process with 4 devices), run
# directory, output JSON path, mode arguments. It prints "[worker] ..." lines for the test to read.
WORKER = textwrap.dedent("""
    import faulthandler, functools, json, sys
    faulthandler.dump_traceback_later(240, exit=True)  # a hung collective fails with a traceback
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from rljax import distributed

    mode, pid, port, run_dir, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    args = sys.argv[6:]
    if port:
        assert distributed.initialize(f"127.0.0.1:{port}", 2, pid) is True
    assert jax.device_count() == 4
    from rljax import phases
    from rljax.data.collate import BatchIterator, collate_prompt_completion
    from rljax.distributed import local_rows, to_host
    from rljax.losses.sft import SFTConfig, sft_loss
    from rljax.models import Model, preset
    from rljax.sharding import make_mesh, shard_batch
    from rljax.state import OptimizerConfig, create_state
    from rljax.tokenizer import CharTokenizer

    mesh = make_mesh(data=2, fsdp=2)
    TOK = CharTokenizer()
    res = {"main": distributed.is_main_process()}

    def checksums(tree):  # [sum, sum |x|, sum x^2] of every leaf's global value, and their totals
        flat = jax.tree_util.tree_flatten_with_path(to_host(tree))[0]
        out = {jax.tree_util.keystr(k): [float(np.sum(np.asarray(v, np.float64))),
                                         float(np.sum(np.abs(np.asarray(v, np.float64)))),
                                         float(np.sum(np.square(np.asarray(v, np.float64))))] for k, v in flat}
        out["total"] = [sum(c[j] for c in out.values()) for j in range(3)]
        return out

    rows_seen = []  # the global rows of every batch a phase placed
    placed = phases.shard_batch

    def spy(batch, mesh):
        out = placed(batch, mesh=mesh)
        rows_seen.append(int(jax.tree.leaves(out)[0].shape[0]))
        return out

    phases.shard_batch = spy

    def sft_data():
        rows = [(f"{a}+{b}=", str(a + b)) for a in range(6) for b in range(6)]
        return BatchIterator(rows, 8, lambda r: collate_prompt_completion(TOK, r), seed=0)

    if mode == "sft":  # args: the steps= of successive calls in one run directory, e.g. "2,4,4"
        opt = OptimizerConfig(lr=1e-2, total_steps=6, warmup_steps=1)
        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        held = collate_prompt_completion(TOK, [(f"{a}*{a}=", str(a * a)) for a in range(8)])
        eval_loss = jax.jit(lambda p, b: sft_loss(p, b, model=model, cfg=SFTConfig())[0])

        def eval_fn(state):  # a sharded forward pass: a collective every process must run
            return {"loss": float(eval_loss(state.params, shard_batch(local_rows(held), mesh)))}

        for steps in map(int, args[0].split(",")):
            state = create_state(model, opt, jax.random.key(0), mesh=mesh)
            cfg = phases.SFTPhaseConfig(optimizer=opt, loop=phases.LoopConfig(
                steps=steps, log_every=1, checkpoint_every=1, progress=True, tensorboard=False))
            state = phases.sft(state, sft_data(), cfg, model=model, mesh=mesh, run_dir=run_dir, eval_fn=eval_fn)
        res.update(step=int(state.step), params=checksums(state.params), rows=rows_seen)
        if port:  # shard_batch on meshes that do / do not give each process its own rows
            glob = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
            res["meshes"] = {}
            for shape in ((1, 1, 4), (1, 2, 2), (2, 1, 2)):
                try:
                    x = shard_batch({"x": local_rows(glob)}, make_mesh(*shape))["x"]
                    res["meshes"][str(shape)] = bool(np.array_equal(to_host(x), glob))
                except ValueError as e:
                    res["meshes"][str(shape)] = str(e)
            from rljax.rl import RLConfig, make_rl_iteration
            plain = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))  # no mesh
            refusals = {
                "sft": lambda: phases.sft(create_state(plain, opt, jax.random.key(0)), sft_data(), cfg, model=plain),
                "rl": lambda: make_rl_iteration(plain, RLConfig(), lambda p, c: [0.0] * len(c), str),
                "staleness": lambda: phases.rl(None, None, None, RLConfig(staleness=1), model=model, decode=str,
                                               loop=phases.LoopConfig()),
            }
            res["refusals"] = {}
            for name, call in refusals.items():
                try:
                    call()
                except ValueError as e:
                    res["refusals"][name] = str(e)
            import os
            import signal

            class SignalledAt:  # SIGTERM to process 0 alone while the batch of step 3 is read
                def batch_at(self, position):
                    if pid == 0 and position == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return sft_data().batch_at(position)

            pre_dir = os.path.join(run_dir, "preempted")
            pre_cfg = phases.SFTPhaseConfig(optimizer=opt, loop=phases.LoopConfig(
                steps=5, log_every=1, checkpoint_every=0, progress=False, tensorboard=False))
            try:
                phases.sft(create_state(model, opt, jax.random.key(0), mesh=mesh), SignalledAt(), pre_cfg,
                           model=model, mesh=mesh, run_dir=pre_dir)
            except phases.Preempted as e:
                res["preempted"] = [e.step, e.signum, sorted(os.listdir(os.path.join(pre_dir, "checkpoints")))]
            resumed = phases.sft(create_state(model, opt, jax.random.key(0), mesh=mesh), sft_data(), pre_cfg,
                                 model=model, mesh=mesh, run_dir=pre_dir)
            res["preempted"].append(int(resumed.step))

            from rljax.metrics import MetricsWriter
            write = MetricsWriter.write

            def full_disk_at_step_3(self, step, *args, **kw):  # process 0's writer (the only one) fails once
                if step == 3 and not getattr(MetricsWriter, "failed", False):
                    MetricsWriter.failed = True
                    raise OSError("No space left on device (simulated)")
                return write(self, step, *args, **kw)

            MetricsWriter.write = full_disk_at_step_3
            failed_dir = os.path.join(run_dir, "write-failed")
            try:
                phases.sft(create_state(model, opt, jax.random.key(0), mesh=mesh), sft_data(), pre_cfg, model=model,
                           mesh=mesh, run_dir=failed_dir)
            except (OSError, RuntimeError) as e:
                res["write_failed"] = [type(e).__name__, str(e),
                                       sorted(os.listdir(os.path.join(failed_dir, "checkpoints")))]
            MetricsWriter.write = write
            again = phases.sft(create_state(model, opt, jax.random.key(0), mesh=mesh), sft_data(), pre_cfg,
                               model=model, mesh=mesh, run_dir=failed_dir)
            res["write_failed"].append(int(again.step))
            # eval_fn failing on process 1 alone once its collective forward pass is done (a scorer raising on
            # its rows): at step 2 of the loop, then in the final evaluation of the rerun
            eval_cfg = phases.SFTPhaseConfig(optimizer=opt, loop=phases.LoopConfig(
                steps=5, log_every=1, eval_every=2, checkpoint_every=0, progress=False, tensorboard=False))
            eval_dir, res["eval_failed"] = os.path.join(run_dir, "eval-failed"), []

            def failing_eval(state):
                out = eval_fn(state)
                if pid == 1 and int(state.step) in (2, 5):
                    raise ValueError(f"scorer failed at step {int(state.step)} (simulated)")
                return out

            for _ in range(2):
                try:
                    phases.sft(create_state(model, opt, jax.random.key(0), mesh=mesh), sft_data(), eval_cfg,
                               model=model, mesh=mesh, run_dir=eval_dir, eval_fn=failing_eval)
                except (ValueError, RuntimeError) as e:
                    res["eval_failed"].append([type(e).__name__, str(e),
                                               sorted(os.listdir(os.path.join(eval_dir, "checkpoints")))])
            from rljax.cli import make_run_dir, save_config
            made = make_run_dir(os.path.join(run_dir, "made"), "study")  # process 0 names it by its clock
            save_config(SFTConfig(), made)  # both check, process 0 writes, before either returns
            with open(os.path.join(made, "config.json")) as f:
                saved = json.load(f)
            res["shared"] = [distributed.share_text(f"from process {pid}"),
                             distributed.share_text("ü" * 3000 if pid == 0 else None),
                             os.path.relpath(made, run_dir), os.listdir(os.path.join(run_dir, "made")), saved]

            def outcome(fn, *args):
                try:
                    return ["returned", fn(*args)]
                except (OSError, RuntimeError) as e:
                    return [type(e).__name__, str(e)]

            def fails_on_0():
                if pid == 0:
                    raise OSError("No space left on device (simulated)")
                return "ran"  # never: on_main runs it on process 0 alone

            res["on_main"] = [outcome(distributed.on_main, "writing a.json", lambda: "written"),
                              outcome(distributed.on_main, "writing b.json", fails_on_0)]
            # process 0's disk fills after the safetensors header: it still takes part in every gather
            from rljax.models import hf

            class FullAfterHeader:
                def __init__(self, f):
                    self.f, self.writes = f, 0

                def write(self, b):
                    self.writes += 1
                    if self.writes > 2:  # the length and the header went in
                        raise OSError(28, "No space left on device (simulated)")
                    return self.f.write(b)

                def close(self):
                    self.f.close()

            real_open = open
            hf.open = lambda file, mode="r", *a, **k: (FullAfterHeader(real_open(file, mode, *a, **k))
                                                       if pid == 0 and file.endswith(".safetensors")
                                                       else real_open(file, mode, *a, **k))
            export = os.path.join(run_dir, "export", "policy")
            res["export"] = [outcome(hf.save_pretrained, state.params, model.config, export),
                             sorted(os.listdir(os.path.dirname(export)))]  # no checkpoint, no temporary left
            del hf.open
            # both have listed the directory before process 0 makes the next save's temporary directory there
            distributed.sync("export listed")
            res["export"] += [outcome(hf.save_pretrained, state.params, model.config, export)[0],
                              sorted(os.listdir(export))]

    elif mode == "phases":  # reward model, preference (DPO, live reference) and OREO, 2 steps each
        from rljax.data.preference_collate import collate_preferences
        from rljax.data.reward_collate import collate_pairs
        from rljax.losses.preference import DPOConfig
        from rljax import oreo_training
        from rljax.oreo_training import OREOPhaseConfig, collate_trajectories, create_oreo_state, oreo

        oreo_training.shard_batch = spy

        opt = OptimizerConfig(lr=1e-2, schedule="constant")
        loop = phases.LoopConfig(steps=2, log_every=1, checkpoint_every=0, progress=False, tensorboard=False)
        pairs = [(f"{a}+{b}=", str(a + b), str(a + b + 1 + a % 3)) for a in range(4) for b in range(4)]
        rm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, heads=("reward",)), mesh=mesh)
        state = phases.train_reward_model(
            create_state(rm, opt, jax.random.key(0), mesh=mesh),
            BatchIterator(pairs, 8, lambda r: collate_pairs(TOK, r), seed=0),
            phases.RewardModelPhaseConfig(optimizer=opt, loop=loop), model=rm, mesh=mesh, run_dir=run_dir + "/rm")
        res["rm"] = checksums(state.params)["total"]
        lm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        params = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size)).init(jax.random.key(1))
        state = phases.preference(
            create_state(lm, opt, jax.random.key(0), mesh=mesh, params=params),
            BatchIterator(pairs, 8, lambda r: collate_preferences(TOK, r), seed=0),
            phases.PreferencePhaseConfig(loss=DPOConfig(), optimizer=opt, loop=loop), model=lm, reference=params,
            mesh=mesh, run_dir=run_dir + "/dpo")
        res["dpo"] = checksums(state.params)["total"]
        traj = [{"prompt": p, "completion": c, "reward": float(k % 2)} for k, (p, c, _) in enumerate(pairs)]
        _, ostate = create_oreo_state(lm, params, opt, jax.random.key(2))
        ostate = oreo(ostate, BatchIterator(traj, 8, lambda r: collate_trajectories(TOK, r), seed=0),
                      OREOPhaseConfig(optimizer=opt, loop=loop), model=lm, mesh=mesh, run_dir=run_dir + "/oreo")
        res["oreo"] = [checksums(ostate.policy.params)["total"], checksums(ostate.value.params)["total"]]
        res["rows"] = rows_seen

    elif mode == "rl":  # one GRPO and one SCST iteration by hand, then DAPO with refills through the rl phase
        from conftest import left_padded
        from rljax.data.batch import PromptBatch
        from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
        from rljax.sampling import SampleConfig

        scored_rows, down = [], {"on": False}

        def decode(ids):
            return [" ".join(str(int(t)) for t in row if t != 0) for row in np.asarray(ids)]

        def reward(prompts, completions, **_):  # a seventh of the tokens, on average: many equal groups
            if down["on"] and pid == 1:
                raise ConnectionError("reward server unreachable (simulated)")
            scored_rows.append(len(completions))
            return [sum(int(t) % 7 == 0 for t in c.split()) / 4 for c in completions]

        def correct(prompts, completions, problems, **_):
            return [float(len(c.split()) % 2 == p % 2) for c, p in zip(completions, problems)]

        # prompts of very different lengths: each process's own longest falls in another bucket
        tokens, mask = left_padded([3, 2, 2, 4, 5, 20, 18, 3], 24, 64, seed=4)
        model = Model(preset("tiny", n_layers=1), mesh=mesh)
        params = Model(preset("tiny", n_layers=1)).init(jax.random.key(0))
        sampling = SampleConfig(max_new_tokens=4, n=2, eos_id=-1)
        cfg = RLConfig(algorithm="grpo", sampling=sampling, optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
        it = make_rl_iteration(model, cfg, reward, decode, accuracy_fn=correct, monitors={"length": correct})
        state = create_rl_state(model, params, cfg, jax.random.key(1))
        key = jax.random.fold_in(state.rng, state.step)
        collected = it.collect(state.policy.params, tokens, mask, key, problems=list(range(8)))
        res["samples"] = to_host(collected.rollout.tokens).tolist()
        res["rewards"] = np.asarray(collected.rewards).tolist()
        state, metrics = it.learn(state, collected, key)
        res["grpo"] = {k: v for k, v in metrics.items() if not k.startswith("time_") and "per_s" not in k}
        res["grpo_params"] = checksums(state.policy.params)["total"]
        res["scored_rows"] = scored_rows[:]
        if port:  # the reward function raising on process 1 alone: both stop at the same point
            down["on"] = True
            try:
                it.collect(state.policy.params, tokens, mask, key, problems=list(range(8)))
            except Exception as e:  # noqa: BLE001 - its type is the point
                res["reward_down"] = [type(e).__name__, str(e)]
            down["on"] = False
        # SCST: a greedy decode of the prompts (n = 1 rows) is the baseline
        scst = RLConfig(algorithm="scst", sampling=sampling, optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
        state = create_rl_state(model, params, scst, jax.random.key(1))
        state, metrics = make_rl_iteration(model, scst, reward, decode)(state, tokens, mask)
        res["scst"] = [metrics["loss"], metrics["reward_mean"], checksums(state.policy.params)["total"]]

        class Prompts:  # the same global prompt batches on every process
            def batch_at(self, position):
                t, m = left_padded([3, 6, 2, 5], 8, 64, seed=10 + position)
                return PromptBatch(tokens=t, mask=m, metadata={})

        dapo = RLConfig(algorithm="dapo", sampling=sampling, max_refills=2,
                        optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
        state = create_rl_state(model, params, dapo, jax.random.key(3))
        state = phases.rl(state, Prompts(), reward, dapo, model=model, decode=decode,
                          loop=phases.LoopConfig(steps=2, log_every=1, progress=False, tensorboard=False),
                          run_dir=run_dir)
        res["dapo_params"] = checksums(state.policy.params)["total"]

    elif mode == "decode":  # the test-time and collection helpers: sample, complete, evaluate, search, reject
        from rljax.eval import PolicyEvalConfig, complete, evaluate_policy
        from rljax.expert_iteration import RejectionConfig, rejection_sample
        from rljax.oreo_training import value_model_of, value_params_from, value_scorer
        from rljax.sampling import (BeamConfig, SampleConfig, ValueSearchConfig, beam_search, prompt_multiple, sample,
                                    value_guided_beam_search)
        from rljax.sharding import param_shardings, shard_params

        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        plain = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))
        on_mesh = lambda p: shard_params(p, param_shardings(model, mesh))
        params, start = on_mesh(plain.init(jax.random.key(0))), on_mesh(plain.init(jax.random.key(5)))
        prompts = [f"{a}+{b}=" for a, b in ((1, 2), (13, 4), (7, 70), (2, 2), (45, 6))]  # 5: a ragged batch
        res["multiple"] = [prompt_multiple(model, n) for n in (1, 2, 4)]
        res["greedy"] = complete(params, model, TOK, prompts, max_new_tokens=6)
        res["sampled"] = complete(params, model, TOK, prompts, max_new_tokens=6, n=2, temperature=1.0,
                                  key=jax.random.key(3), batch_size=3)
        res["eval"] = evaluate_policy(params, model, TOK, [{"prompt": p, "answer": "3"} for p in prompts],
                                      PolicyEvalConfig(max_new_tokens=6, samples=2),
                                      check=lambda p, t: t.startswith(p["answer"]), prompt=lambda p: p["prompt"],
                                      reward_fn=lambda prompts, completions, **_: [len(c) for c in completions],
                                      start_params=start)
        tokens, mask = TOK.encode_batch(prompts[:4], padding_side="left")
        roll = sample(params, tokens, mask, jax.random.key(4), model=model, cfg=SampleConfig(max_new_tokens=5, n=2))
        res["rollout"] = {k: np.asarray(v).tolist() for k, v in to_host(
            dict(tokens=roll.tokens, logprobs=roll.logprobs, lengths=roll.lengths)).items()}
        beams = beam_search(params, tokens, mask, model=model, cfg=BeamConfig(num_beams=2, max_new_tokens=5))
        res["beam"] = {k: np.asarray(v).tolist() for k, v in to_host(dict(tokens=beams.tokens,
                                                                           scores=beams.scores)).items()}
        vm = value_model_of(model)
        vparams = value_params_from(plain, plain.init(jax.random.key(6)))  # a random value head, not V = 0
        vparams = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(9), x.shape), vparams)
        vparams = shard_params(vparams, param_shardings(vm, mesh))
        found = value_guided_beam_search(params, tokens, mask, value_scorer(vm, stop_ids=(2,)), vparams,
                                         jax.random.key(7), model=model, cfg=ValueSearchConfig(
                                             beams=2, max_new_tokens=8, max_step_tokens=3, max_rounds=3,
                                             step_end_ids=(TOK.encode("+")[-1],)), trace=True)
        res["search"] = {k: np.asarray(v).tolist() for k, v in to_host(dict(tokens=found.tokens,
                                                                               scores=found.scores)).items()}
        res["search_trace"] = [float(np.nansum(np.where(np.isfinite(r["scores"]), r["scores"], 0)))
                               for r in found.trace]
        rows, stats = rejection_sample(params, prompts, lambda prompts, completions, **_: [
            float(len(c) % 2) for c in completions], RejectionConfig(samples=2, threshold=1.0, prompts_per_batch=3,
                                                                     require_stop=False),
            model=model, tokenizer=TOK, key=jax.random.key(8))
        res["rejection"] = [rows, stats]
        res["refused"] = None
        try:
            sample(params, tokens[:3], mask[:3], jax.random.key(4), model=model, cfg=SampleConfig(max_new_tokens=5))
        except ValueError as e:
            res["refused"] = str(e)

    elif mode == "pipeline":  # expert iteration (rejection sampling -> SFT, 2 rounds) through run_stages, twice
        from rljax.eval import PolicyEvalConfig
        from rljax.expert_iteration import ExpertIterationConfig, RejectionConfig, expert_iteration

        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        params = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size)).init(jax.random.key(0))
        opt = OptimizerConfig(lr=1e-2, schedule="constant")
        problems = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
        cfg = ExpertIterationConfig(
            rounds=2, prompts_per_round=6, steps_per_round=2, batch_size=4, optimizer=opt, progress=False,
            log_every=1, rejection=RejectionConfig(samples=2, threshold=1.0, prompts_per_batch=4, require_stop=False),
            evaluation=PolicyEvalConfig(max_new_tokens=5, samples=2))
        runs = []
        for call in range(2):  # the second call finds every stage done and reads the rows back
            state = create_state(model, opt, jax.random.key(0), mesh=mesh, params=params)
            state, rows = expert_iteration(
                state, [p["prompt"] for p in problems], lambda prompts, completions, **_: [
                    float(len(c) % 2) for c in completions], cfg, model=model, tokenizer=TOK,
                key=jax.random.key(4), held_out=problems[:5], check=lambda p, t: t.startswith(p["answer"]),
                prompt=lambda p: p["prompt"], sft_rows=[(p["prompt"], p["answer"]) for p in problems[:4]],
                run_dir=run_dir)
            runs.append(dict(rows=rows, params=checksums(state.params)["total"], step=int(state.step)))
        res["runs"] = runs

    elif mode == "scorers":  # learned scorers on each process's own rows; evaluation and reference on global rows
        from rljax.adversarial import adversarial_reward
        from rljax.data.preference_collate import collate_preferences
        from rljax.data.reward_collate import collate_pairs
        from rljax.distributed import local_mesh, process_local
        from rljax.reference import cached_reference_logps
        from rljax.rewards.evaluation import reward_model_eval
        from rljax.rewards.judge import Judge, JudgeConfig, pointwise_reward
        from rljax.rewards.learned import likelihood_reward, prm_reward, reward_model_reward
        from rljax.sharding import param_shardings, shard_params

        def placed(model, seed):  # random weights, the reward head's too (it starts at 0), on the 4-device mesh
            p = dataclasses.replace(model, mesh=None).init(jax.random.key(seed))
            p = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 50), x.shape, x.dtype), p)
            return shard_params(p, param_shardings(model, mesh))

        rm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, heads=("reward",)), mesh=mesh)
        lm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        rm_params, lm_params, ref_params = placed(rm, 0), placed(lm, 1), placed(lm, 2)
        prompts = [f"{a}+{b}=" for a, b in ((1, 2), (13, 4), (7, 70), (2, 2), (45, 6), (3, 9), (8, 8))]
        completions = ["3", "1;7", "77;;", "4;4;4", "51", "", "1;6"]
        # process 0 scores rows 0-1, process 1 rows 2-6 (other row counts, other buckets); one process all 7
        own = slice(0, 7) if not port else (slice(0, 2) if pid == 0 else slice(2, 7))
        scorers = dict(
            rm=reward_model_reward(rm, rm_params, TOK),
            likelihood=likelihood_reward(lm, lm_params, TOK, reference=ref_params, reduction="sum"),
            prm=prm_reward(rm, rm_params, TOK, separator=";", aggregation="min"),
            adversarial=adversarial_reward(rm, rm_params, TOK),
            judge=pointwise_reward(Judge(lm, lm_params, TOK, JudgeConfig())))
        placed_bytes, place = [], distributed.placement

        def counting(shardings):  # the bytes each gathering program makes whole on every device
            fn = place(shardings)
            return lambda *xs: (placed_bytes.append(sum(x.nbytes for x in xs)), fn(*xs))[1]

        distributed.placement = counting
        local_rm, local_params = process_local(rm, rm_params)
        distributed.placement = place
        res["process_local"] = [max(placed_bytes, default=0), max(x.nbytes for x in jax.tree.leaves(rm_params)),
                                sum(x.nbytes for x in jax.tree.leaves(rm_params)),
                                all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(to_host(local_params)),
                                                                         jax.tree.leaves(to_host(rm_params))))]
        scorers["callable"] = reward_model_reward(rm, lambda: local_params, TOK)
        res["scores"] = {k: np.asarray(f(prompts[own], completions[own]), np.float64).tolist()
                         for k, f in scorers.items()}
        res["local"] = [dict(local_rm.mesh.shape), len(local_rm.mesh.devices.flat),
                        sorted({d.process_index for d in local_rm.mesh.devices.flat}),
                        sorted({d.process_index for x in jax.tree.leaves(local_params) for d in x.devices()})]
        try:
            reward_model_reward(rm, lambda: rm_params, TOK)(prompts[own], completions[own])
            res["spanning_callable"] = None
        except ValueError as e:
            res["spanning_callable"] = str(e)
        res["local_meshes"] = {}
        for shape in ((4, 1, 1), (1, 4, 1), (1, 1, 4)):
            try:
                res["local_meshes"][str(shape)] = dict(local_mesh(make_mesh(*shape)).shape)
            except ValueError as e:
                res["local_meshes"][str(shape)] = str(e)
        pairs = [(p, c or "9", (c or "9") + "0") for p, c in zip(prompts, completions)]
        res["rm_eval"] = reward_model_eval(rm, [collate_pairs(TOK, pairs[:4]), collate_pairs(TOK, pairs[4:])],
                                           params_of=lambda p: p)(rm_params)
        ref = cached_reference_logps(lm_params, pairs, functools.partial(collate_preferences, TOK), model=lm,
                                     cache_dir=run_dir + "/ref", batch_size=4)
        res["reference"] = ref.tolist()
        import os
        res["reference_files"] = sorted(os.listdir(run_dir + "/ref"))

    elif mode == "rounds":  # online DPO, iterative OREO and iterative RLHF, 2 rounds each, through run_stages
        from rljax.data.arithmetic import make_split
        from rljax.data.batch import PromptBatch
        from rljax.data.preference_collate import collate_preferences
        from rljax.data.reward_collate import collate_ranked
        from rljax.losses import GRPOConfig
        from rljax.oreo_training import CollectConfig, OREOPhaseConfig, create_oreo_state
        from rljax.pipelines import (IterativeOREOConfig, IterativeRLHFConfig, OnlineDPOConfig, create_rlhf_state,
                                     iterative_oreo, iterative_rlhf, online_dpo)
        from rljax.rewards.learned import reward_model_reward
        from rljax.rewards.rules import arithmetic_answer_reward
        from rljax.rl import RLConfig
        from rljax.sampling import SampleConfig
        from rljax.sharding import param_shardings, shard_params

        opt = OptimizerConfig(lr=1e-2, schedule="constant")
        lm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        rm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, heads=("reward",)), mesh=mesh)
        params = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size)).init(jax.random.key(0))
        rm_host = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
                               Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, heads=("reward",))).init(
                                   jax.random.key(1)))
        rm_params = shard_params(rm_host, param_shardings(rm, mesh))
        sampling = SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)

        dpo_cfg = OnlineDPOConfig(rounds=2, samples=4, prompts_per_round=6, steps_per_round=2, batch_size=4,
                                  optimizer=opt, progress=False, log_every=1, sampling=sampling)
        prompts = [f"{a}+{b}=" for a in range(4) for b in range(3)]
        state, stats = online_dpo(create_state(lm, opt, jax.random.key(2), mesh=mesh, params=params), prompts,
                                  reward_model_reward(rm, rm_params, TOK), dpo_cfg, model=lm, tokenizer=TOK,
                                  collate=functools.partial(collate_preferences, TOK), run_dir=run_dir + "/dpo")
        res["dpo"] = dict(stats=stats, params=checksums(state.params)["total"], step=int(state.step))

        train, _ = make_split(8, 1, levels=(1,), seed=1)
        oreo_cfg = IterativeOREOConfig(
            rounds=2, steps_per_round=2, batch_size=4,
            phase=OREOPhaseConfig(optimizer=opt, loop=phases.LoopConfig(log_every=1, progress=False)),
            collect=CollectConfig(samples=2, prompts_per_batch=4, separator=";", sampling=sampling))
        ostate = iterative_oreo(create_oreo_state(lm, params, opt, jax.random.key(3))[1], [p.prompt for p in train],
                                arithmetic_answer_reward, oreo_cfg, model=lm, tokenizer=TOK, run_dir=run_dir + "/oreo",
                                key=jax.random.key(4), problems=train)
        res["oreo"] = dict(policy=checksums(ostate.policy.params)["total"],
                           value=checksums(ostate.value.params)["total"], step=int(ostate.step))

        lists = [("1+1=", ["2", "3", "11"], [0, 1, 2]), ("2+2=", ["4", "5"], [0, 1]),
                 ("1+2=", ["3", "4", "12"], [0, 1, 1])]

        class Prompts:  # the same global prompt batches on every process
            def batch_at(self, position):
                t, m = TOK.encode_batch([lists[(position + i) % 3][0] for i in range(2)], padding_side="left")
                return PromptBatch(tokens=t, mask=m, metadata={})

        rl_cfg = RLConfig(algorithm="grpo", sampling=dataclasses.replace(sampling, max_new_tokens=3, n=2),
                          loss=GRPOConfig(kl_coef=0.04), optimizer=opt)
        rm_state = create_state(rm, opt, jax.random.key(5), mesh=mesh, params=rm_host)
        rlhf_cfg = IterativeRLHFConfig(iterations=2, refresh_every=1, rm_epochs=1, rm_batch_size=4, rm_optimizer=opt,
                                       log_every=1, progress=False)
        rstate, rstats = iterative_rlhf(
            create_rlhf_state(lm, params, rm_state, rl_cfg, jax.random.key(6)), Prompts(),
            lambda policy_params, r: [list(x) for x in lists[r - 1:r + 1]],
            lambda p: reward_model_reward(rm, p, TOK), rlhf_cfg, rl_cfg, model=lm, rm_model=rm,
            decode=TOK.decode_batch, collate=lambda rows: collate_ranked(TOK, [tuple(x) for x in rows],
                                                                        answers_per_list=3),
            initial_lists=lists, run_dir=run_dir + "/rlhf")  # a replay of 5 lists: batches of 4
        res["rlhf"] = dict(stats=rstats, policy=checksums(rstate["policy"].policy.params)["total"],
                           reward_model=checksums(rstate["reward_model"].params)["total"],
                           steps=[int(rstate["policy"].step), int(rstate["reward_model"].step)])

    elif mode == "recipes":  # RLAIF (a judge labels, a reward model, RL) and adversarial RLAIF, smallest sizes
        from rljax.adversarial import AdversarialConfig, adversarial_rlaif
        from rljax.eval import PolicyEvalConfig
        from rljax.rlaif import RLAIFConfig, rlaif
        from rljax.tasks import ARITHMETIC

        common = dict(log_every=1, progress=False, evaluation=PolicyEvalConfig(max_new_tokens=16, samples=2))
        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=96), mesh=mesh)
        judge = Model(preset("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, mlp_dim=128,
                             vocab_size=TOK.vocab_size, max_seq_len=96), mesh=mesh)
        init = lambda m, seed: dataclasses.replace(m, mesh=None).init(jax.random.key(seed))  # noqa: E731
        train, test = ARITHMETIC.split(64, 4, levels=(1,), seed=0)
        _, rows = rlaif(init(model, 0), RLAIFConfig(
            sft_steps=3, sft_batch_size=8, judge_steps=3, judge_batch_size=8, judge_pairs_per_problem=1,
            held_out_pairs=4, label_prompts=8, rm_steps=2, rm_batch_size=4, rl_iterations=2, prompts_per_iteration=4,
            samples_per_prompt=2, max_new_tokens=16, **common), model=model, tokenizer=TOK, task=ARITHMETIC,
            judge_model=judge, judge_params=init(judge, 1), key=jax.random.key(3), run_dir=run_dir + "/rlaif",
            sft=train[:32], judge=train[32:48], rl=train[48:], held_out=test)
        res["rlaif"] = rows
        train, test = ARITHMETIC.split(64, 8, levels=(1,), seed=0)
        state, rows = adversarial_rlaif(init(model, 0), AdversarialConfig(
            sft_steps=3, sft_batch_size=8, rounds=2, prompts_per_round=8, disc_steps=2, disc_batch_size=8,
            rl_iterations=2, prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=16, **common),
            model=model, tokenizer=TOK, task=ARITHMETIC, key=jax.random.key(4), run_dir=run_dir + "/adversarial",
            sft_problems=train[:32], expert_problems=train[32:], held_out=test)
        res["adversarial"] = dict(rows=rows, policy=checksums(state["policy"].policy.params)["total"],
                                  discriminator=checksums(state["discriminator"].params)["total"])

    elif mode == "recipes2":  # RLHF (SFT, reward model, PPO with a value head) and R1 with distillation, smallest
        from rljax.eval import PolicyEvalConfig
        from rljax.expert_iteration import RejectionConfig
        from rljax.r1 import R1Config, r1_pipeline
        from rljax.rlhf import RLHFConfig, rlhf_pipeline
        from rljax.sampling import SampleConfig, tokenizer_ids
        from rljax.tasks import ARITHMETIC

        common = dict(log_every=1, progress=False, evaluation=PolicyEvalConfig(max_new_tokens=10, samples=2))
        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64), mesh=mesh)
        base = dataclasses.replace(model, mesh=None).init(jax.random.key(0))
        train, test = ARITHMETIC.split(96, 8, levels=(1,), seed=0)
        state, rows = rlhf_pipeline(base, RLHFConfig(
            sft_steps=2, sft_batch_size=8, rm_steps=2, rm_batch_size=8, ppo_iterations=2, prompts_per_iteration=4,
            samples_per_prompt=2, max_new_tokens=10, ppo_epochs=1, ppo_minibatches=2, **common), model=model,
            tokenizer=TOK, task=ARITHMETIC, key=jax.random.key(3), run_dir=run_dir + "/rlhf", sft_problems=train[:32],
            rm_problems=train[32:64], rl_problems=train[64:], held_out=test)
        res["rlhf"] = dict(rows=rows, policy=checksums(state["policy"].policy.params)["total"])
        student = Model(preset("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, vocab_size=TOK.vocab_size,
                               max_seq_len=64), mesh=mesh)
        # rejection sampling keeps every sample (reward >= 0, any format) of a model that has not learnt the format
        every_sample_kept = dataclasses.replace(ARITHMETIC, well_formed=lambda completion: True)
        keep_all = RejectionConfig(samples=2, max_per_prompt=1, prompts_per_batch=8, threshold=0.0, require_stop=False,
                                   sampling=SampleConfig(max_new_tokens=10, temperature=1.0, **tokenizer_ids(TOK)))
        state, rows = r1_pipeline(base, R1Config(
            cold_start_steps=2, sft_batch_size=8, rl_iterations=1, prompts_per_iteration=4, samples_per_prompt=2,
            max_new_tokens=10, rejection_prompts=8, rejection=keep_all, rs_sft_steps=1, general_sft_rows=4,
            rm_steps=1, rm_batch_size=4, mixed_iterations=1, student_start_steps=1, distill_prompts=8,
            distill_rejection=keep_all, distill_sft_steps=1, distill_iterations=1, **common),
            model=model, tokenizer=TOK, task=every_sample_kept, student_model=student,
            student_params=dataclasses.replace(student, mesh=None).init(jax.random.key(1)), key=jax.random.key(4),
            run_dir=run_dir + "/r1", cold_start=train[:32], reasoning=train[32:64], general=train[64:], held_out=test)
        res["r1"] = dict(rows=rows, student=checksums(state["student_on_policy"])["total"])

    elif mode == "tasks":  # the one-call task recipes with mesh=: SFT, DPO and GRPO in their run directories
        from rljax.recipes import (DPOTaskConfig, GRPOTaskConfig, RewardModelTaskConfig, SFTTaskConfig, dpo, grpo,
                                   reward_model, sft)

        small = Model(preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64,
                             vocab_size=TOK.vocab_size, max_seq_len=64))
        params = small.init(jax.random.key(0))
        rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + "1"} for r in rows]
        scored = []

        def reward(prompts, completions, **_):
            scored.append(len(completions))
            return [float(len(c) % 3) for c in completions]

        def tokens(completion_ids, **kwargs):  # TRL's form, on each process's own rows' token ids
            for i in completion_ids:  # logged on each process, gathered: the mean over every row
                kwargs["log_metric"]("ids_logged", len(i))
            kwargs["log_extra"]("ids", [len(i) for i in completion_ids])
            return [-float(len(i)) for i in completion_ids]

        quiet = dict(steps=2, progress=False, log_every=1)
        prompts = [{"prompt": r["prompt"]} for r in rows]
        # a reward model trained on the mesh, then one of GRPO's reward functions (scored on each process's devices)
        rm = reward_model((small, params, TOK), pairs, RewardModelTaskConfig(batch_size=4, lr=3e-3, **quiet),
                          mesh=mesh, run_dir=run_dir + "/reward_model", eval_data=pairs[:8])
        results = dict(
            reward_model=rm,
            sft=sft((small, params, TOK), rows, SFTTaskConfig(batch_size=4, lr=3e-3, **quiet), mesh=mesh,
                    run_dir=run_dir + "/sft", eval_data=rows[:8]),
            dpo=dpo((small, params, TOK), pairs, DPOTaskConfig(batch_size=4, lr=3e-3, **quiet), mesh=mesh,
                    run_dir=run_dir + "/dpo", eval_data=pairs[:8]),
            grpo=grpo((small, params, TOK), prompts, [reward, (0.1, tokens), (0.5, rm)], GRPOTaskConfig(
                batch_size=2, n=2, max_new_tokens=4, lr=1e-2, samples_every=1, eval_samples=2, **quiet), mesh=mesh,
                run_dir=run_dir + "/grpo", eval_data=prompts[:3]))
        res["tasks"] = {k: dict(history=r.history, params=checksums(r.params)["total"], eval=r.eval_history)
                        for k, r in results.items()}
        res["scored"] = scored
        res["refused"] = {}
        for name, call in (("run_dir", lambda: sft((small, params, TOK), rows, SFTTaskConfig(batch_size=4, **quiet),
                                                   mesh=mesh)),
                           ("mesh", lambda: sft((small, params, TOK), rows, SFTTaskConfig(batch_size=4, **quiet),
                                                run_dir=run_dir + "/nomesh"))):
            try:
                call()
                res["refused"][name] = None
            except ValueError as e:
                res["refused"][name] = str(e)

    distributed.sync("done")
    with open(out, "w") as f:
        json.dump(res, f)
    distributed.sync("written")
""")


def _run(tmp_path, mode: str, multi_args: tuple = (), single_args: tuple | None = None, timeout: float = 300) -> dict:
    """Run the worker as two processes (2 devices each, with multi_args) and as one process with 4
    devices (single_args, default multi_args), at once; -> {"proc0", "proc1", "single"}: each {"out": its
    JSON, "log": its output, "run_dir": its directory}. Leftover processes are killed whatever happens."""
    single_args = multi_args if single_args is None else single_args
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    jobs = {}
    for name, pid, p, n_dev in (("proc0", 0, port, 2), ("proc1", 1, port, 2), ("single", 0, 0, 4)):
        run_dir = tmp_path / ("multi" if p else "single")
        args = multi_args if p else single_args
        out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, str(script), mode, str(pid), str(p), str(run_dir), str(out),
                                     *args], env=_env(n_dev), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        jobs[name] = (proc, log, out, run_dir)
    wait_for_workers({name: (proc, log) for name, (proc, log, *_) in jobs.items()}, timeout=timeout)
    return {name: {"out": json.loads(out.read_text()), "log": log.read_text(), "run_dir": run_dir}
            for name, (_, log, out, run_dir) in jobs.items()}


def _close_checksums(multi: dict, single: dict):
    assert multi.keys() == single.keys()
    for key in single:
        # plain sums of random weights can be near 0: absolute slack scaled by the sum of |w|
        np.testing.assert_allclose(multi[key][0], single[key][0], rtol=1e-5, atol=1e-6 * single[key][1], err_msg=key)
        np.testing.assert_allclose(multi[key][1:], single[key][1:], rtol=1e-5, err_msg=key)


def _lines(run_dir, prefix: str) -> list[dict]:
    return [r for r in read_metrics(run_dir, events=True) if any(k.startswith(prefix) for k in r)
            or r.get("phase") == prefix]


# 13-25 s: the default tier's one two-process phase run (the others are marked slow)
def test_two_process_sft_phase_equals_one_process_and_resumes(tmp_path):
    """An SFT phase stopped after 2 steps, resumed to 4 and called again once finished, on two
    processes (and one signalled on process 0 alone, and one whose metrics write fails on process 0, stopped
    on both after the same step): each places its own 4 of the 8 rows (global batches of 8, not 16), the losses and
    parameters equal one process's uninterrupted 4 steps, metrics.jsonl has every step once and one
    resume marker, the (collective) evaluation runs on both and only process 0 prints; shard_batch
    refuses a mesh whose batch axes leave rows replicated across the processes, and a phase or RL
    iteration without a mesh (or with asynchronous actors) is refused."""
    res = _run(tmp_path, "sft", ("2,4,4",), ("4",))
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert [p0["main"], p1["main"], single["main"]] == [True, False, True]
    assert p0["step"] == p1["step"] == single["step"] == 4
    # 4 steps and the two evaluations' held batch; never every row twice
    assert set(p0["rows"]) == set(p1["rows"]) == set(single["rows"]) == {8}
    assert p0["params"] == p1["params"]
    _close_checksums(p0["params"], single["params"])

    multi_log, single_log = (_lines(res[n]["run_dir"], "sft/") for n in ("proc0", "single"))
    assert [r["step"] for r in multi_log if "sft/loss" in r] == [1, 2, 3, 4]  # each step once
    assert [(r["step"], r["event"]) for r in multi_log if "event" in r] == [(2, "resumed")]
    assert [r["step"] for r in multi_log if "sft/eval/loss" in r] == [2, 4]  # the third call read it back
    loss = {n: [r["sft/loss"] for r in log if "sft/loss" in r] for n, log in (("m", multi_log), ("s", single_log))}
    np.testing.assert_allclose(loss["m"], loss["s"], rtol=1e-5)
    assert [r["step"] for r in single_log if "sft/eval/loss" in r] == [4]
    np.testing.assert_allclose(multi_log[-1]["sft/eval/loss"], single_log[-1]["sft/eval/loss"], rtol=1e-5)

    log0, log1 = res["proc0"]["log"], res["proc1"]["log"]
    assert "[sft] resumed from" in log0 and "[sft] step 4 eval (logged by the finished run)" in log0
    assert "[sft]" not in log1 and "sft:" not in log1  # no message, no progress bar

    meshes = p0["meshes"]
    assert meshes["(1, 2, 2)"] is True and meshes["(2, 1, 2)"] is True
    assert "{'data': 1, 'fsdp': 1, 'tensor': 4}" in meshes["(1, 1, 4)"] and "data x fsdp" in meshes["(1, 1, 4)"]
    assert "make_mesh(data=2, fsdp=1, tensor=2)" in meshes["(1, 1, 4)"]
    # a phase or an RL iteration without a mesh, and asynchronous actors, are refused before any step
    refused = p0["refusals"]
    assert refused.keys() == {"sft", "rl", "staleness"}
    assert "sft: 2 processes are running, so the phase needs mesh=" in refused["sft"]
    assert "model needs a mesh" in refused["rl"] and "RLConfig.staleness=1" in refused["staleness"]
    # SIGTERM to process 0 alone during step 3: both stop after step 3 and save it (the save is collective: a
    # process stopping alone would wait in it for the other, stepping on), both raise Preempted; a rerun resumes
    assert p0["preempted"] == p1["preempted"] == [3, 15, ["3"], 5]
    # process 0's metrics write failing at step 3: both raise after step 4 (process 0 its error, process 1 one
    # naming it), both having saved step 4 (collectively: alone, process 0 would have waited in the save while
    # process 1 stepped on); a rerun resumes to the end
    assert p0["write_failed"] == ["OSError", "No space left on device (simulated)", ["4"], 5]
    assert p1["write_failed"] == ["RuntimeError", "[sft]: process(es) [0] failed (their output has the error); "
                                  "process 1 stops with them", ["4"], 5]
    # eval_fn failing on process 1 alone after its collective work: at step 2 both stop after step 3 (saved), in the
    # rerun's final evaluation (step 5, saved before it) both raise at once; process 1 its error, process 0 one naming it
    stops = "[sft]: process(es) [1] failed (their output has the error); process 0 stops with them"
    assert p1["eval_failed"] == [["ValueError", "scorer failed at step 2 (simulated)", ["3"]],
                                 ["ValueError", "scorer failed at step 5 (simulated)", ["3", "5"]]]
    assert p0["eval_failed"] == [["RuntimeError", stops, ["3"]], ["RuntimeError", stops, ["3", "5"]]]
    # work process 0 does for all (on_main): its value there, None elsewhere; its failure raised on both
    assert p0["on_main"][0] == ["returned", "written"] and p1["on_main"][0] == ["returned", None]
    assert p0["on_main"][1] == ["OSError", "No space left on device (simulated)"]
    assert p1["on_main"][1] == ["RuntimeError", "writing b.json: process(es) [0] failed (their output has the error); "
                                "process 1 stops with them"]
    # save_pretrained with process 0's disk full mid-file: both raise (process 1 took no part in a write, so
    # without the agreement it would have returned, or waited in a gather), nothing is left; then it saves
    assert p0["export"][0] == ["OSError", "[Errno 28] No space left on device (simulated)"]
    assert p1["export"][0][0] == "RuntimeError" and "save_pretrained: writing " in p1["export"][0][1]
    assert p0["export"][1:] == p1["export"][1:] == [[], "returned", ["config.json", "model.safetensors"]]
    # process 0's text on both; one run directory (named by process 0's clock) with one config.json
    made = p0["shared"][2]
    assert made.startswith("made/study-") and p0["shared"][3] == [made.split("/")[1]]
    assert p0["shared"] == p1["shared"] == ["from process 0", "\u00fc" * 3000, made, p0["shared"][3],
                                            json.loads(json.dumps(dataclasses.asdict(SFTConfig())))]


@pytest.mark.slow  # 35-40 s: three phases' compiles in three processes
def test_two_process_reward_model_preference_and_oreo_phases_equal_one_process(tmp_path):
    """The reward-model (Bradley–Terry), preference (DPO with a live reference) and OREO phases, 2
    steps each on two processes: global batches of 8 rows (each process placing 4), the losses and
    parameters of one process, every metric line written once."""
    res = _run(tmp_path, "phases")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert set(p0["rows"]) == set(single["rows"]) == {8} and len(p0["rows"]) == len(single["rows"]) == 6
    for key in ("rm", "dpo"):
        assert p0[key] == p1[key]
        np.testing.assert_allclose(p0[key], single[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(p0["oreo"], single["oreo"], rtol=1e-5)
    for phase, prefix in (("rm", "rm/"), ("dpo", "preference/"), ("oreo", "oreo/")):
        multi, one = (read_metrics(res[n]["run_dir"] / phase) for n in ("proc0", "single"))
        assert [r["step"] for r in multi] == [r["step"] for r in one] == [1, 2], phase
        np.testing.assert_allclose([r[prefix + "loss"] for r in multi], [r[prefix + "loss"] for r in one],
                                   rtol=1e-5, err_msg=phase)


@pytest.mark.slow  # 20-45 s: sampling and three algorithms' updates compiled in three processes
def test_two_process_rl_iteration_equals_one_process(tmp_path):
    """A GRPO iteration on two processes (prompts whose bucketed widths differ between the processes'
    halves) samples the same tokens as one process with the same key, each process scores only its
    own 8 of the 16 rows, and the rewards, metrics and updated parameters are one process's; DAPO with
    refills through the rl phase (groups picked on the host, rows placed back) ends with the same
    parameters and writes every iteration's metrics once, equal to one process's; so does SCST (a
    greedy decode of the prompts as baseline)."""
    res = _run(tmp_path, "rl")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert p0["samples"] == p1["samples"] == single["samples"]
    assert p0["rewards"] == p1["rewards"] == single["rewards"]
    assert p0["scored_rows"] == p1["scored_rows"] == [8] and single["scored_rows"] == [16]  # own rows only
    assert p1["reward_down"][0] == "RewardError"
    assert p1["reward_down"][1].startswith("reward function reward raised ConnectionError: reward server unreachable")
    assert p0["reward_down"] == ["RuntimeError", "the reward function (reward): process(es) [1] failed (their output "
                                 "has the error); process 0 stops with them"]
    assert p0["grpo"].keys() == single["grpo"].keys() and "accuracy" in p0["grpo"] and "length_mean" in p0["grpo"]
    for k, v in single["grpo"].items():
        np.testing.assert_allclose(p0["grpo"][k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert p0["grpo"] == p1["grpo"]
    np.testing.assert_allclose(p0["grpo_params"], single["grpo_params"], rtol=1e-5)
    np.testing.assert_allclose(p0["dapo_params"], single["dapo_params"], rtol=1e-5)
    np.testing.assert_allclose(p0["scst"][:2], single["scst"][:2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p0["scst"][2], single["scst"][2], rtol=1e-5)
    multi, one = (read_metrics(res[n]["run_dir"]) for n in ("proc0", "single"))
    assert [r["step"] for r in multi] == [r["step"] for r in one] == [1, 2]
    assert any(r["rl/refill_rounds"] > 0 for r in one)  # the refill path ran
    for k in one[0]:
        if k.startswith("rl/") and not k.startswith("rl/time_") and "per_s" not in k:
            np.testing.assert_allclose([r[k] for r in multi], [r[k] for r in one], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.slow  # 60-110 s: sampling, beam, value-guided search and evaluation compiled in three processes
def test_two_process_decoding_helpers_equal_one_process(tmp_path):
    """On two processes every process passes the same (global) prompts to `sample`, `beam_search`,
    `value_guided_beam_search`, `complete`, `evaluate_policy` (with the KL to a start policy) and
    `rejection_sample`, each decodes its own rows, and all get exactly what one process with the same
    4-device mesh gets: the same tokens, log-probs, scores, texts, results row and kept samples. Five
    prompts (not a multiple of the mesh's 4 rows) are filled with copies and the copies dropped; a
    direct `sample` of 3 prompts is refused naming the multiple."""
    res = _run(tmp_path, "decode")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    keys = ("multiple", "greedy", "sampled", "eval", "rollout", "beam", "search", "search_trace", "rejection")
    for key in keys:
        assert p0[key] == p1[key] == single[key], key
    assert p0["multiple"] == [4, 2, 1]
    assert len(p0["greedy"]) == 5 and len(p0["sampled"]) == 10 and len(set(p0["sampled"])) > 5
    assert p0["eval"].keys() == {"accuracy_greedy", "accuracy_sampled", "reward_mean", "completion_length",
                                 "kl_to_start"} and p0["eval"]["kl_to_start"] != 0
    assert len(p0["search"]["scores"]) == 4 and len(set(p0["search"]["scores"])) > 1  # a random value head
    rows, stats = p0["rejection"]
    assert stats["samples"] == 10 and stats["kept"] == len(rows)
    assert p0["refused"] == p1["refused"] == (
        "sample: 3 prompts do not split over the data x fsdp = 4 of the mesh and the 2 processes: pass a multiple "
        "of 4 prompts (`prompt_multiple`; e.g. pad with copies of a prompt and drop their rows, as "
        "`rljax.eval.complete` does)")


@pytest.mark.slow  # 45-80 s: sampling, evaluation and SFT compiled in three processes, two pipeline calls
def test_two_process_expert_iteration_pipeline_equals_one_process(tmp_path):
    """Expert iteration (rejection sampling -> SFT, two rounds, held-out rows) through `run_stages` on two
    processes: the same results rows (rejection stats exactly, evaluations up to float rounding) and
    parameters as one process with the same mesh; process 0 alone writes the stage files, which a second
    call reads back (every stage done: the same rows, nothing trained); the SFT phases shard over the
    model's own mesh without mesh= (a phase with no mesh refuses to run on several processes)."""
    res = _run(tmp_path, "pipeline")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert p0["runs"] == p1["runs"]
    for multi, one in zip(p0["runs"], single["runs"]):
        assert [r["stage"] for r in multi["rows"]] == ["start", "round-0", "round-1"] and multi["step"] == one["step"]
        for a, b in zip(multi["rows"], one["rows"]):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], float):
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
                else:
                    assert a[k] == b[k], k
        np.testing.assert_allclose(multi["params"], one["params"], rtol=1e-5)
    assert p0["runs"][0] == p0["runs"][1]  # the second call read every stage back
    run_dir = res["proc0"]["run_dir"]
    table = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in table] == ["start", "round-0", "round-1"]
    assert json.loads((run_dir / "round-1" / "stage.json").read_text())["round"] == 1
    assert "[sft]" not in res["proc1"]["log"]


def _close_rows(multi: list, one: list, name: str, atol: dict | None = None):
    """Results rows equal (timings aside): strings and counts exactly, numbers up to float rounding. A KL to a start policy a
    stage of one or two small steps barely moved is a mean of differences of log-probs (~1e-5 here), so it keeps
    the float32 rounding of those log-probs, whose sums the two layouts order differently: 1e-4 absolute. atol:
    {key prefix: absolute tolerance} for other such keys (default 1e-6)."""
    atol = {"kl_": 1e-4, **(atol or {})}
    assert [r.keys() for r in multi] == [r.keys() for r in one], name
    for a, b in zip(multi, one):
        for k in b:
            if "per_s" in k or k.startswith("time_"):  # timings
                continue
            if isinstance(b[k], float):
                tol = next((t for prefix, t in atol.items() if k.startswith(prefix)), 1e-6)
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=tol, err_msg=f"{name} {b.get('stage')} {k}")
            else:
                assert a[k] == b[k], f"{name} {b.get('stage')} {k}"

