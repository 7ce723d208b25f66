"""The reward-model phase: learns gold preferences on arithmetic, resumes exactly, runs sharded; evaluation metrics."""
import jax
import numpy as np
import pytest

from conftest import run_with_devices
from rljax.data.arithmetic import make_split
from rljax.data.collate import BatchIterator
from rljax.data.reward_collate import collate_pairs
from rljax.data.synthetic import preference_pairs
from rljax.losses.reward_model import RankingConfig, TokenLabelConfig
from rljax.models import Model, preset
from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
from rljax.rewards.evaluation import expected_calibration_error, reward_model_eval, spearman
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


def test_spearman_and_calibration_error_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: x ranks (1, 2.5, 2.5, 4) against y ranks (1, 2, 3, 4)
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.arange(1, 5)
    assert spearman([0, 1, 1, 2], [5, 6, 7, 8]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # two bins used: {0.1, 0.15} with labels {0, 1} (|0.125 − 0.5|), {0.9} with label 1 (|0.9 − 1|)
    assert expected_calibration_error([0.1, 0.15, 0.9], [0, 1, 1]) == pytest.approx(2 / 3 * 0.375 + 1 / 3 * 0.1)
    assert expected_calibration_error([0.3] * 10, [1] * 3 + [0] * 7) == pytest.approx(0.0)
    # a NaN has no rank (it read as the largest: 0.5 here); a probability outside [0, 1] fell in no bin but counted in n
    assert np.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))
    with pytest.raises(ValueError, match=r"expected_calibration_error: probs\[1\] = 1.2 is not in \[0, 1\]"):
        expected_calibration_error([0.1, 1.2], [0, 1])
    assert np.isnan(expected_calibration_error([0.1, float("nan")], [0, 1]))
    with pytest.raises(ValueError, match="spearman: 3 values against 2"):
        spearman([1, 2, 3], [1, 2])


def _setup(prior: bool = False):
    """Pairs labelled by the gold scorer; with prior, each answer carries a fixed prior score
    (−0.05 per character, a stand-in for a log-likelihood) as `RankingBatch.prior`."""
    train, test = make_split(800, 64, levels=(1, 2), seed=0)

    def collate(rows):
        pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        priors = [(-0.05 * len(c), -0.05 * len(j)) for _, c, j in pairs] if prior else None
        return collate_pairs(TOK, pairs, priors=priors)

    data = BatchIterator(preference_pairs(train, 0, noise_free=True), 16, collate, seed=0)
    held = preference_pairs(test, 1, noise_free=True)
    model = Model(preset("tiny", n_layers=2, heads=("reward",)))
    opt = OptimizerConfig(lr=1e-3, schedule="constant", head_lr=1e-2)
    return model, opt, data, [collate(held[:32]), collate(held[32:])]


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_reward_model_phase_learns_gold_preferences_and_resumes_exactly(tmp_path):
    model, opt, data, held = _setup()
    ev = reward_model_eval(model, held)
    cfg = lambda steps: RewardModelPhaseConfig(loss=RankingConfig(), optimizer=opt,  # noqa: E731
                                               loop=LoopConfig(steps=steps, log_every=10, checkpoint_every=10,
                                                               progress=False))
    state = create_state(model, opt, jax.random.key(0))
    assert ev(state) == {"pairwise_accuracy": 0.5}  # zero head: every pair tied, each counts half
    full = train_reward_model(state, data, cfg(40), model=model, run_dir=str(tmp_path / "full"))
    # held-out pairs labelled by the gold scorer: well above chance after 40 steps of 16 pairs
    assert ev(full)["pairwise_accuracy"] > 0.65
    part = train_reward_model(create_state(model, opt, jax.random.key(0)), data, cfg(20), model=model,
                              run_dir=str(tmp_path / "cut"))
    assert int(part.step) == 20
    resumed = train_reward_model(create_state(model, opt, jax.random.key(0)), data, cfg(40), model=model,
                                 run_dir=str(tmp_path / "cut"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(full.params))
    with pytest.raises(ValueError, match="TokenLabelConfig trains on TokenLabelBatch"):
        train_reward_model(create_state(model, opt, jax.random.key(0)), data,
                           RewardModelPhaseConfig(loss=TokenLabelConfig(), optimizer=opt, loop=LoopConfig(steps=1)),
                           model=model)
    with pytest.raises(ValueError, match="needs the model's 'reward' head"):
        lm = Model(preset("tiny", n_layers=1))
        train_reward_model(create_state(lm, opt, jax.random.key(0)), data, cfg(1), model=lm)


def test_reward_model_training_sharded_equals_one_device():
    """Bradley–Terry with centring and a prior per answer: 4 steps on a (2, 2, 2)
    mesh of simulated devices give the single-device losses."""
    out = run_with_devices("""
        import functools, jax, numpy as np
        from rljax.losses.reward_model import RankingConfig, reward_model_loss
        from rljax.models import Model, preset
        from rljax.sharding import make_mesh, shard_batch
        from rljax.state import OptimizerConfig, create_state, make_train_step
        from test_reward_phase import _setup

        _, opt, data, _ = _setup(prior=True)
        assert data.batch_at(0).prior.shape == (16, 2)
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        curves = []
        for m in (None, mesh):
            model = Model(preset("tiny", n_layers=2, heads=("reward",)), mesh=m)
            state = create_state(model, opt, jax.random.key(0), mesh=m)
            step = make_train_step(functools.partial(reward_model_loss, model=model, cfg=RankingConfig(centring=0.01)),
                                   opt, model=model, mesh=m)
            losses = []
            for i in range(4):
                batch = data.batch_at(i)
                state, metrics = step(state, batch if m is None else shard_batch(batch, m))
                losses.append(float(metrics["loss"]))
            curves.append(losses)
        np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
        assert len(set(curves[0])) == 4  # the params moved between steps
        print("CURVES", curves)
    """)
    assert "CURVES" in out


def test_overoptimisation_fits_recover_known_curves():
    from rljax.rewards.evaluation import best_of_n_kl, fit_overoptimisation

    np.testing.assert_allclose(best_of_n_kl([1, 2, 64]), [0.0, np.log(2) - 0.5, np.log(64) - 63 / 64])
    d = np.sqrt(best_of_n_kl(2.0 ** np.arange(0, 9)))
    alpha, beta = fit_overoptimisation(d, d * (1.2 - 0.4 * d), "bon")
    assert (alpha, beta) == pytest.approx((1.2, 0.4))
    d = np.linspace(0.1, 5, 20)
    alpha, beta = fit_overoptimisation(d, d * (0.8 - 0.3 * np.log(d)), "rl")
    assert (alpha, beta) == pytest.approx((0.8, 0.3))
    with pytest.raises(ValueError, match="form"):
        fit_overoptimisation(d, d, "linear")
