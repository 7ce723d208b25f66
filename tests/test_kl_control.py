"""KL controllers: the adaptive rule by hand, its direction, and the fixed one."""
import jax
import numpy as np
import pytest

from rljax.losses.kl_control import adaptive_kl_controller, fixed_kl_controller


def test_adaptive_controller_follows_the_rule_by_hand():
    ctl = adaptive_kl_controller(init_beta=0.1, target=6.0, horizon=10_000)
    s = ctl.init()
    s = ctl.update(s, 7.5, 256)  # e = 7.5/6 − 1 = 0.25 -> clipped to 0.2
    np.testing.assert_allclose(float(s.beta), 0.1 * (1 + 0.2 * 256 / 10_000), rtol=1e-6)
    s2 = ctl.update(s, 5.4, 128)  # e = −0.1
    np.testing.assert_allclose(float(s2.beta), float(s.beta) * (1 - 0.1 * 128 / 10_000), rtol=1e-6)


def test_adaptive_controller_moves_beta_toward_the_target():
    """A toy policy whose KL falls as β rises (KL = c / β): β converges to c / target."""
    ctl = adaptive_kl_controller(init_beta=0.05, target=6.0, horizon=1_000)
    update = jax.jit(ctl.update, static_argnums=2)
    for start in (0.05, 1.0):  # below and above the fixed point 0.5
        s = ctl.init().replace(beta=np.float32(start))
        betas = [float(s.beta)]
        for _ in range(400):
            s = update(s, 3.0 / s.beta, 64)
            betas.append(float(s.beta))
        assert abs(betas[-1] - 0.5) < 0.01
        assert all((b2 - b1) * (0.5 - b1) >= 0 for b1, b2 in zip(betas, betas[1:]))  # always toward it


def test_fixed_controller_and_bad_arguments():
    ctl = fixed_kl_controller(0.04)
    assert float(ctl.update(ctl.init(), 100.0, 10).beta) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_controller(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="beta"):
        fixed_kl_controller(-1.0)
