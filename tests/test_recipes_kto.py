"""The one-call KTO recipe on TRL's unpaired preference rows {prompt, completion, label}: its first step's loss
against `kto_loss` on the same batch and against the closed form at θ = θ_ref, training that separates the two
kinds, the held-out evaluation against `kto_loss` written out, and bad rows and settings refused by name."""
import numpy as np
import pytest

from rljax.data.adapters import DataError
from rljax.losses.preference import KTOConfig, kto_loss, with_live_reference
from rljax.recipes import KTOTaskConfig, kto
from rljax.recipes.tasks import kto_batches
from test_recipes_tasks import TOK, small_model

# a sum is desirable, letters are not: 12 rows, 6 of each
ROWS = [{"prompt": f"{a}+{b}=", "completion": "xy" if i % 2 else str(a + b), "label": i % 2 == 0}
        for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(3))]
HELD = [{"prompt": f"{a}+{b}=", "completion": str(a + b + d), "label": d == 0} for a in (5, 6) for b, d in
        ((1, 0), (2, 1))][:3]  # 3 rows in batches of 2: the single last row joins the first batch


def test_first_step_is_kto_loss_at_the_reference_and_training_separates_the_kinds():
    """At step 1 the policy is the reference: every ρ = 0 and z0 = 0, so each row's loss is λ/2 (λ_D = 2 for a
    desirable row, λ_U = 1 otherwise) and the step's loss is their mean over the first batch, which `kto_loss`
    computes too. After training, over all the rows, the desirable completions' implicit reward β ρ is positive
    and the undesirable ones' negative."""
    cfg = KTOTaskConfig(steps=12, batch_size=4, lr=3e-3, desirable_weight=2.0, progress=False)
    with pytest.warns(UserWarning, match=r"λ_D n_D / \(λ_U n_U\) = 2.000 is outside the recommended"):
        result = kto(small_model(), ROWS, cfg, eval_data=ROWS)
    model, params, _ = small_model()
    first = kto_batches(TOK, ROWS, cfg, max_length=model.config.max_seq_len).batch_at(0)
    loss, metrics = kto_loss(params, with_live_reference(params, first, model=model), model=model,
                             cfg=KTOConfig(desirable_weight=2.0))
    by_hand = np.mean(np.where(first.desirable > 0, 2.0, 1.0) / 2)
    assert result.history[0]["loss"] == pytest.approx(float(loss), rel=1e-5) == pytest.approx(by_hand, rel=1e-5)
    assert result.history[0]["z0"] == pytest.approx(0.0, abs=1e-6) and float(metrics["z0"]) == pytest.approx(0.0,
                                                                                                          abs=1e-6)
    assert result.eval_metrics["rewards_desirable"] > 0 > result.eval_metrics["rewards_undesirable"]


def test_held_out_evaluation_is_kto_loss_over_its_batches():
    """3 held-out rows with batch_size 2: one batch of 3 (a batch of 1 has no mismatched pair), evaluated at the
    end against the starting model as the reference: kto_loss on that batch under the returned params."""
    cfg = KTOTaskConfig(steps=2, batch_size=2, lr=3e-3, progress=False)
    result = kto(small_model(), ROWS, cfg, eval_data=HELD)
    model, params, _ = small_model()
    held = kto_batches(TOK, HELD, cfg, max_length=model.config.max_seq_len)
    batch = held.collate(held.examples)
    assert batch.tokens.shape[0] == 3
    loss, metrics = kto_loss(result.params, with_live_reference(params, batch, model=model), model=model,
                             cfg=KTOConfig())
    assert result.eval_metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert result.eval_metrics["z0"] == pytest.approx(float(metrics["z0"]), rel=1e-4, abs=1e-6)


def test_bad_rows_and_settings_are_refused_by_name():
    model = small_model()
    with pytest.raises(ValueError, match="KTOTaskConfig.batch_size: KTO's reference point z0 reads mismatched pairs "
                                         "from the other rows of a batch: at least 2, got 1"):
        KTOTaskConfig(batch_size=1)
    with pytest.raises(ValueError, match="KTOConfig.beta: must be > 0"):
        KTOTaskConfig(beta=0.0)
    with pytest.raises(ValueError, match="KTOTaskConfig.overlong: one of 'error', 'drop', 'truncate_completion'"):
        KTOTaskConfig(overlong="truncate_prompt")
    cfg = KTOTaskConfig(steps=1, batch_size=2, progress=False)
    bad_label = [dict(r) for r in ROWS]
    bad_label[3]["label"] = "yes"
    with pytest.raises(DataError, match=r"row 3: desirable must be a boolean or 0/1, got 'yes'"):
        kto(model, bad_label, cfg)
    no_label = [dict(r) for r in ROWS]
    del no_label[5]["label"]
    with pytest.raises(DataError, match="row 5.*label.* is missing"):
        kto(model, no_label, cfg)
    with pytest.raises(DataError, match="KTO needs desirable and undesirable examples, got 6 desirable and 0 "
                                        "undesirable"):
        kto(model, [r for r in ROWS if r["label"]], cfg)
    with pytest.raises(DataError, match=r"1 row\(s\) kept: KTO's batches need at least 2"):
        kto(model, ROWS, cfg, eval_data=HELD[:1])
