"""rljax.cpu_dots: which library runs XLA:CPU's products in full-sequence programs."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from rljax import cpu_dots
from conftest import FAST_CODEGEN_FLAGS, run_with_devices
from rljax.cpu_dots import (CODEGEN_LEVEL_OPTION, EIGEN_PRODUCTS, ENV, FAST_CODEGEN, FUSION_EMITTERS_OPTION,
                            LOOP_EMITTERS, YNN_OPTION, cpu_flags, fast_codegen_available,
                            dot_library, eigen_products_option, full_sequence_compiler_options,
                            loop_emitters_available, ynn_product_fusions)
from rljax.models.logprobs import token_logprobs
from rljax.state import OptimizerConfig, compile_step, create_state, make_train_step

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512_bf16"}


def test_cpu_flags_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "missing")) is None
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_flags(str(tmp_path / "noflags")) is None


def test_dot_library_rules():
    # auto: Eigen on the kinds of CPU it was measured faster on: AVX2 without AVX-512 (float32 and
    # bfloat16 compute), AVX-512 with avx512_bf16, AMX CPUs included, for float32 compute only; not
    # on other AVX-512 CPUs (not measured)
    assert dot_library({}, AVX2) == "eigen"
    assert dot_library({ENV: "auto"}, AVX2) == "eigen"
    assert dot_library({ENV: " Auto "}, AVX2) == "eigen"
    assert dot_library({}, AVX2, dtype="bfloat16") == "eigen"
    assert dot_library({}, AVX512) == dot_library({}, AVX512, dtype=jnp.float32) == "eigen"
    assert dot_library({}, AVX512, dtype="bfloat16") == "ynn"
    assert dot_library({}, AVX512 - {"avx512_bf16"}) == "ynn"
    assert dot_library({}, AVX512 | {"amx_tile", "amx_bf16"}) == "eigen"
    assert dot_library({}, AVX512 | {"amx_tile", "amx_bf16"}, dtype="bfloat16") == "ynn"
    assert dot_library({}, frozenset({"neon", "asimd"})) == "ynn"  # an Arm CPU
    assert dot_library({}, frozenset()) == "ynn"  # flags unknown
    # an explicit choice wins over the CPU
    assert dot_library({ENV: "eigen"}, AVX512) == "eigen"
    assert dot_library({ENV: "ynn"}, AVX2) == "ynn"
    # the user's own XLA flag stays in force under auto
    assert dot_library({"XLA_FLAGS": f"--{YNN_OPTION}=individual_dot"}, AVX2) == "ynn"
    with pytest.raises(ValueError, match=f"{ENV}='eigne': expected one of auto, eigen, ynn"):
        dot_library({ENV: "eigne"}, AVX2)


def test_compiler_options_only_for_cpu(monkeypatch):
    monkeypatch.setenv(ENV, "eigen")
    # train steps keep YNNPACK's reductions, forward-only passes get no YNNPACK fusion
    assert full_sequence_compiler_options("cpu", train=True) == {YNN_OPTION: eigen_products_option()}
    assert full_sequence_compiler_options("cpu") == {YNN_OPTION: ""}
    assert full_sequence_compiler_options("gpu") is None
    assert full_sequence_compiler_options("gpu", train=True) is None
    assert full_sequence_compiler_options("tpu") is None
    monkeypatch.setenv(ENV, "ynn")
    assert full_sequence_compiler_options("cpu") is None
    # auto on an AVX-512 CPU with avx512_bf16: the program's compute dtype decides
    monkeypatch.setenv(ENV, "auto")
    monkeypatch.setattr(cpu_dots, "cpu_flags", lambda: AVX512)
    assert full_sequence_compiler_options("cpu", dtype="float32", train=True) == {YNN_OPTION: eigen_products_option()}
    assert full_sequence_compiler_options("cpu", dtype="bfloat16", train=True) is None


def test_eigen_products_option_falls_back_to_no_ynnpack_fusions(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    # this project's jaxlib knows the reduction fusion type; one that does not gets the empty option
    eigen_products_option.cache_clear()
    assert eigen_products_option() == EIGEN_PRODUCTS
    monkeypatch.setattr(cpu_dots, "EIGEN_PRODUCTS", "LIBRARY_FUSION_TYPE_NOT_A_KIND")
    eigen_products_option.cache_clear()
    try:
        assert eigen_products_option() == ""
    finally:
        eigen_products_option.cache_clear()


def test_remat_train_steps_get_the_loop_emitters(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    monkeypatch.setenv(ENV, "eigen")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(cpu_dots, "fast_codegen_available", lambda: False)  # its own test below
    loop_emitters_available.cache_clear()
    try:
        assert loop_emitters_available()  # this project's jaxlib knows the option
        assert full_sequence_compiler_options("cpu", train=True, remat=True) == \
            {YNN_OPTION: eigen_products_option(), **LOOP_EMITTERS}
        assert full_sequence_compiler_options("gpu", train=True, remat=True) is None
        monkeypatch.setenv(ENV, "ynn")
        assert full_sequence_compiler_options("cpu", train=True, remat=True) == LOOP_EMITTERS
        assert full_sequence_compiler_options("cpu", train=True) is None
        # the user's own XLA_FLAGS setting stays in force
        monkeypatch.setenv("XLA_FLAGS", f"--{FUSION_EMITTERS_OPTION}=true")
        loop_emitters_available.cache_clear()
        assert full_sequence_compiler_options("cpu", train=True, remat=True) is None
    finally:
        loop_emitters_available.cache_clear()


def test_train_steps_without_remat_get_the_fast_codegen(monkeypatch):
    # LLVM's optimisation level 1 for train steps (remat ones beside the loop emitters), not for
    # forward-only passes, nowhere once XLA_FLAGS sets the level itself (as this test suite's conftest
    # does: hence XLA_FLAGS cleared here)
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    fast_codegen_available.cache_clear()
    loop_emitters_available.cache_clear()
    try:
        assert fast_codegen_available()  # this project's jaxlib knows the option
        monkeypatch.setenv(ENV, "eigen")
        assert full_sequence_compiler_options("cpu", train=True) == {YNN_OPTION: eigen_products_option(), **FAST_CODEGEN}
        assert full_sequence_compiler_options("cpu") == {YNN_OPTION: ""}
        assert full_sequence_compiler_options("cpu", train=True, remat=True) == \
            {YNN_OPTION: eigen_products_option(), **LOOP_EMITTERS, **FAST_CODEGEN}
        assert full_sequence_compiler_options("gpu", train=True) is None
        monkeypatch.setenv(ENV, "ynn")
        assert full_sequence_compiler_options("cpu", train=True) == FAST_CODEGEN
        assert full_sequence_compiler_options("cpu", train=True, remat=True) == {**LOOP_EMITTERS, **FAST_CODEGEN}
        assert full_sequence_compiler_options("cpu") is None
        monkeypatch.setenv("XLA_FLAGS", f"--{CODEGEN_LEVEL_OPTION}=2")
        fast_codegen_available.cache_clear()
        assert full_sequence_compiler_options("cpu", train=True) is None
    finally:
        fast_codegen_available.cache_clear()
        loop_emitters_available.cache_clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_codegen_gives_the_default_levels_train_step(monkeypatch, dtype):
    # the same lowering compiled at LLVM level 1 and at XLA's default level 3: the same loss and
    # gradients up to float rounding (the generated code may order or fuse a few float operations
    # differently, and which ones depends on the CPU's vector instructions)
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from rljax.models import Model, TransformerConfig
    model = Model(TransformerConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                                    max_seq_len=32, scan_layers=False, dtype=dtype))
    opt, state = _sgd_state(model)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 1, 32)
    batch = {"tokens": tokens, "mask": jnp.ones_like(tokens)}
    runs = {level: _compiled_step(monkeypatch, "auto", model, opt, state, batch,
                                  compiler_options={CODEGEN_LEVEL_OPTION: level})[1:] for level in (1, 3)}
    (fast, fast_metrics), (default, default_metrics) = runs[1], runs[3]
    assert np.isfinite(float(fast_metrics["loss"]))
    # bf16 compute rounds each activation to 8 bits: one rounding that flips there moves the
    # gradients by ~2^-8 of their scale (on the Zen 5 and AVX2 EPYCs the two came out equal)
    loss_tol, grad_tol = (1e-6, 1e-5) if dtype == "float32" else (1e-3, 2e-2)
    assert float(fast_metrics["loss"]) == pytest.approx(float(default_metrics["loss"]), rel=loss_tol)
    _assert_same_sgd_gradients(state.params, fast.params, default.params, grad_tol)


_COMPILE_PEAK = """
    import functools, jax, numpy as np
    from rljax.cpu_dots import full_sequence_compiler_options
    from rljax.data import SequenceBatch
    from rljax.losses import SFTConfig, sft_loss
    from rljax.models import Model, TransformerConfig
    from rljax.state import OptimizerConfig, apply_loss_gradients, create_state, make_optimizer, make_train_step

    def rss_kib(key):
        return int(dict(line.split(":", 1) for line in open("/proc/self/status"))[key].split()[0])

    model = Model(TransformerConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=512,
                                    max_seq_len=128, scan_layers=False, remat="full"))
    opt = OptimizerConfig(lr=1e-3, schedule="constant")
    state = create_state(model, opt, jax.random.key(0))
    tokens = np.ones((8, 64), np.int32)
    batch = SequenceBatch(tokens, np.ones_like(tokens), np.ones_like(tokens))
    loss = functools.partial(sft_loss, model=model, cfg=SFTConfig())
    if "{how}" == "library":
        lowered = make_train_step(loss, opt, model=model).lower(state, batch)
    else:  # the same step with the same products, fusion emitters
        tx = make_optimizer(opt)
        options = full_sequence_compiler_options(dtype="float32", train=True)
        lowered = jax.jit(lambda s, b: apply_loss_gradients(s, tx, loss, b), compiler_options=options,
                          donate_argnums=0).lower(state, batch)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = rss_kib("VmRSS")
    lowered.compile()
    print("PEAK", rss_kib("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's peak resident memory")
def test_remat_train_steps_compile_in_less_memory(monkeypatch):
    """The loop emitters' compile of a rematerialised step holds a fraction of the fusion emitters'
    memory (2-layer d128 model: ~1.3 MiB against 145-160 MiB measured), each compile in its own process."""
    # one malloc arena: glibc gives a thread that finds the arenas busy a new one, whose first pages
    # (~28 MiB seen) then land in whichever compile it happened in: under another process's load
    # (the parallel test run) in 2 of 4 loop-emitter compiles, none with one arena
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    # without the tests' loop-emitter flag: the library has to pick them for the remat step itself
    peak = {how: int(run_with_devices(_COMPILE_PEAK.replace("{how}", how), n_devices=1,
                                      xla_flags=FAST_CODEGEN_FLAGS).split("PEAK")[1])
            for how in ("library", "fusion")}
    assert peak["fusion"] > 32 * 1024, peak  # KiB: the fusion emitters' compile takes tens of MiB and more
    assert peak["library"] < peak["fusion"] / 4, peak


def test_loop_emitters_give_the_fusion_emitters_results(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from rljax.models import Model, TransformerConfig
    model = Model(TransformerConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=128,
                                    max_seq_len=32, scan_layers=False, remat="full"))
    opt, state = _sgd_state(model)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 1, 32)
    batch = {"tokens": tokens, "mask": jnp.ones_like(tokens)}
    runs = {}
    for name, options in (("loop", {}), ("fusion", {"compiler_options": {FUSION_EMITTERS_OPTION: True}})):
        _, runs[name], metrics = _compiled_step(monkeypatch, "ynn", model, opt, state, batch, **options)
        assert np.isfinite(float(metrics["loss"]))
    _assert_same_sgd_gradients(state.params, runs["loop"].params, runs["fusion"].params, 1e-5)


def _sq_loss(params, batch, *, model):
    lp = token_logprobs(params, batch["tokens"], batch["mask"], model=model)
    return -jnp.sum(lp * batch["mask"][:, 1:]) / jnp.sum(batch["mask"][:, 1:]), {}


def _sgd_state(model, params=None):
    """A train state whose optimizer is plain SGD at rate 1: a step moves the parameters by exactly
    minus the gradient, so two compiles' steps compare as gradients (Adam's first step, about
    lr·sign(g), turns a rounding difference in a near-zero gradient into up to 2·lr)."""
    opt = optax.sgd(1.0)
    state = create_state(model, OptimizerConfig(), jax.random.key(0), params=params)
    return opt, state.replace(opt_state=opt.init(state.params))


def _assert_same_sgd_gradients(before, after_a, after_b, rel):
    """Each leaf's two gradients (before - after, up to the parameters' float32 rounding) agree within
    `rel` of the leaf's largest gradient, and neither step left a leaf unmoved."""
    for p, a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_a), jax.tree.leaves(after_b)):
        p = np.asarray(p, np.float64)
        ga, gb = p - np.asarray(a, np.float64), p - np.asarray(b, np.float64)
        ulp = np.finfo(np.float32).eps * np.abs(p).max()
        assert np.abs(gb).max() > 0, p.shape
        assert np.abs(ga - gb).max() <= rel * np.abs(gb).max() + 2 * ulp, p.shape


def _compiled_step(monkeypatch, choice, model, opt, state, batch, **options):
    monkeypatch.setenv(ENV, choice)
    step = make_train_step(functools.partial(_sq_loss, model=model), opt)
    compiled = step.lower(state, batch).compile(**options)
    new_state, metrics = compiled(jax.tree.map(jnp.copy, state), batch)
    return compiled.as_text(), new_state, metrics


def _float_reduce_windows(hlo: str) -> int:
    return len(re.findall(r"= f32\[[^\]]*\]\S* reduce-window\(", hlo))


def test_train_step_with_eigen_products_equals_xla_default(monkeypatch, tiny):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    model, params = tiny
    opt, state = _sgd_state(model, params)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(3, model.config.vocab_size, (4, 16)), jnp.int32),
             "mask": jnp.ones((4, 16), jnp.int32)}
    hlo_e, state_e, m_e = _compiled_step(monkeypatch, "eigen", model, opt, state, batch)
    hlo_y, state_y, m_y = _compiled_step(monkeypatch, "ynn", model, opt, state, batch)
    # Eigen runs every product, and YNNPACK keeps reductions: with no YNNPACK fusions at all XLA:CPU
    # splits more of the float sums into reduce-window trees
    assert " dot(" in hlo_e and ynn_product_fusions(hlo_e) == 0
    hlo_none, _, _ = _compiled_step(monkeypatch, "eigen", model, opt, state, batch,
                                    compiler_options={YNN_OPTION: ""})
    assert "__ynn_fusion" not in hlo_none
    assert _float_reduce_windows(hlo_e) < _float_reduce_windows(hlo_none), (
        _float_reduce_windows(hlo_e), _float_reduce_windows(hlo_none))
    if not ynn_product_fusions(hlo_y):
        pytest.skip("this jaxlib's XLA:CPU uses no YNNPACK fusions by default")
    # the same step: only the products' summation order differs
    np.testing.assert_allclose(m_e["loss"], m_y["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_e["grad_norm"], m_y["grad_norm"], rtol=1e-5)
    _assert_same_sgd_gradients(params, state_e.params, state_y.params, 1e-5)


def test_scoring_pass_with_eigen_products_equals_xla_default(monkeypatch, tiny):
    """A forward-only pass (`jit_full_sequence`, as the reference and value passes compile) gets no
    YNNPACK fusion, so Eigen runs every product: with the reductions kept, YNNPACK would take in the
    attention's softmax-weighted product (at the d256 model's shapes; not at this tiny one's). The
    log-probs equal XLA's default compile's."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from rljax.cpu_dots import jit_full_sequence

    model, params = tiny
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, model.config.vocab_size, (4, 16)), jnp.int32)
    out = {}
    for choice in ("eigen", "ynn"):
        monkeypatch.setenv(ENV, choice)
        compiled = jit_full_sequence(functools.partial(token_logprobs, model=model)).lower(params, tokens).compile()
        out[choice] = compiled.as_text(), np.asarray(compiled(params, tokens))
    assert " dot(" in out["eigen"][0] and "__ynn_fusion" not in out["eigen"][0]
    np.testing.assert_allclose(out["eigen"][1], out["ynn"][1], rtol=1e-5, atol=1e-5)


def test_compile_step_on_a_mesh_passes_the_options(monkeypatch):
    seen = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(cpu_dots, "dot_library", lambda **kw: "eigen")
    # a train step's options (eigen_products_option jits once: asked before jax.jit is replaced)
    expected = {YNN_OPTION: eigen_products_option()} if jax.devices()[0].platform == "cpu" else None
    monkeypatch.setattr(jax, "jit", recording_jit)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    step = compile_step(lambda s, x: (s + 1, x.sum()), mesh=mesh, in_shardings=(None, None), donate_argnums=())
    s, total = step(jnp.zeros(()), jnp.arange(4.0))
    assert (float(s), float(total)) == (1.0, 6.0)
    assert seen == [expected]


def test_benchmark_compiles_one_lowering_both_ways(monkeypatch):
    """benchmarks.cpu_dots lowers a plain jit, so that options given to `jax.jit` (which stay with the
    lowering) cannot make its "YNNPACK" compile an Eigen one: with RLJAX_CPU_DOTS=eigen in force, the
    default compile still runs products in YNNPACK fusions, the Eigen compile none (its YNNPACK fusions are
    reductions), and the variable is restored."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from benchmarks.cpu_dots import LIBRARIES, Config, library_options, train_program

    monkeypatch.setenv(ENV, "eigen")
    with pytest.raises(ValueError, match="--programs"):
        Config(programs="dpo,bogus")
    _, lowered, _ = train_program("dpo", Config(programs="dpo", smoke=True))
    assert os.environ[ENV] == "eigen"
    texts = {lib: (lowered.compile(compiler_options=library_options(lib, True)) if library_options(lib, True) else
                   lowered.compile()).as_text() for lib in LIBRARIES}
    assert ynn_product_fusions(texts["eigen"]) == 0
    if not ynn_product_fusions(texts["ynn"]):
        pytest.skip("this jaxlib's XLA:CPU uses no YNNPACK fusions by default")


def _weight_gradient_program(monkeypatch, library, rows, threshold=None, widths=(64, 48), dtype=jnp.bfloat16):
    """(compiled HLO text, aᵀ b) of `transformer._contract_rows` on a [rows, widths[0]],
    b [rows, widths[1]] of `dtype` under RLJAX_CPU_DOTS=library (read when the function is traced)."""
    from rljax.models import transformer

    monkeypatch.setenv(ENV, library)
    if threshold is not None:
        monkeypatch.setattr(transformer, "MIN_ROWS_FOR_TRANSPOSED_COPY", threshold)
    rng = np.random.default_rng(rows)
    a = jnp.asarray(rng.standard_normal((rows, widths[0])), dtype)
    b = jnp.asarray(rng.standard_normal((rows, widths[1])), dtype)
    # a fresh jit, traced under this env; the compiled program is both inspected and run
    compiled = jax.jit(lambda a, b: transformer._contract_rows(a, b)).lower(a, b).compile()
    reference = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    return compiled.as_text(), np.asarray(compiled(a, b)), reference


def test_weight_gradients_run_as_bf16_products_on_a_transposed_copy(monkeypatch):
    # XLA:CPU turns a bf16 product contracting its left operand's leading axis into a float32 one;
    # with YNNPACK's products and enough rows rljax hands it a row-major transpose instead
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    # the narrower operand is the one copied, whichever side it is on (b: the product runs as bᵀ a
    # and its result is transposed back)
    rows = 4096
    for widths in ((64, 48), (48, 64)):
        hlo, got, reference = _weight_gradient_program(monkeypatch, "ynn", rows, widths=widths)
        assert got.shape == widths
        assert "bf16[48,4096]" in hlo and "bf16[64,4096]" not in hlo, widths  # the narrow transposed copy
        # the bf16 inputs are exact in float32 and the sum accumulates in float32: only its order differs
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max() + 1e-4)
    for library, threshold in (("eigen", None), ("ynn", rows + 1)):  # Eigen's products; too few rows
        hlo, got_plain, reference = _weight_gradient_program(monkeypatch, library, rows, threshold)
        assert "bf16[48,4096]" not in hlo and "bf16[64,4096]" not in hlo
        np.testing.assert_allclose(got_plain, reference, rtol=0, atol=1e-5 * np.abs(reference).max() + 1e-4)


def test_eigen_weight_gradients_keep_the_fast_orientation(monkeypatch):
    # Eigen's products run aᵀ b with a [M, P] wider than b [M, Q] (a [P, Q] result taller than wide:
    # the MLP's down projection) at ~2/3 of the other orientation's rate, so `_contract_rows` computes
    # bᵀ a [Q, P] and copies it transposed; a narrower a, YNNPACK's float32 products and too few rows
    # keep the plain contraction. The values are aᵀ b either way (float64 numpy reference).
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    rows = 4096
    product = re.compile(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(")  # the product's result (bf16 is widened first)
    for library, widths, threshold, swap in (("eigen", (64, 48), None, True), ("eigen", (48, 64), None, False),
                                             ("ynn", (64, 48), None, False), ("eigen", (64, 48), rows + 1, False)):
        for dtype in (jnp.float32, jnp.bfloat16) if library == "eigen" else (jnp.float32,):
            hlo, got, reference = _weight_gradient_program(monkeypatch, library, rows, threshold, widths, dtype)
            # swapped: the product computes bᵀ a [Q, P], then a transposed copy gives [P, Q]
            shape = widths[::-1] if swap else widths
            assert got.shape == widths and product.findall(hlo) == [tuple(map(str, shape))], (library, widths, dtype)
            np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max() + 1e-4)


def test_swiglu_down_weight_gradient_through_the_fast_orientation_matches_autodiff(monkeypatch):
    # the MLP's backward (`transformer.swiglu_down`) differentiates its down projection through
    # `_contract_rows` in float32 too: with Eigen's products and >= 128 rows its weight gradient is
    # the swapped product; all three gradients against autodiff of the plain expression
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from rljax.models.transformer import _dense, swiglu_down

    monkeypatch.setenv(ENV, "eigen")
    k = jax.random.split(jax.random.key(0), 4)
    g, u = jax.random.normal(k[0], (4, 40, 32)), jax.random.normal(k[1], (4, 40, 32))  # 160 rows, F 32
    w, c = jax.random.normal(k[2], (32, 8)), jax.random.normal(k[3], (4, 40, 8))

    def loss(mlp):
        return lambda g, u, w: jnp.sum(jnp.sin(mlp(g, u, w)) * c)

    new = jax.jit(jax.grad(loss(lambda g, u, w: swiglu_down(g, u, w, jnp.float32)), (0, 1, 2)))
    assert "f32[8,32]{1,0} dot(" in new.lower(g, u, w).compile().as_text()  # dwᵀ = ctᵀ h, copied back
    ref = jax.grad(loss(lambda g, u, w: _dense(jax.nn.silu(g) * u, w, 1, jnp.float32)), (0, 1, 2))
    for a, b in zip(new(g, u, w), ref(g, u, w)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_train_step_gradients_equal_with_and_without_the_transposed_copy(monkeypatch):
    # the whole bf16 train step at 32 x 128 = 4,096 token rows: every weight gradient through
    # `_contract_rows` (transposed copies) against the plain contraction (threshold out of reach)
    if jax.default_backend() != "cpu":
        pytest.skip("CPU programs only")
    from rljax.models import Model, transformer
    from rljax.models.config import TransformerConfig

    monkeypatch.setenv(ENV, "ynn")
    model = Model(TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                                    max_seq_len=128, scan_layers=False, dtype="bfloat16"))
    params = model.init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 64, (32, 128)), jnp.int32)

    def grads():  # a fresh jit each time: `_contract_rows` reads the threshold when traced
        loss = lambda p: -jnp.mean(token_logprobs(p, tokens, None, model=model))
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled, compiled(params)

    compiled, with_copy = grads()
    # d_model 64, MLP 128: the model-width operands are copied, never the MLP's hidden product (the
    # down projection's dw runs as gᵀ h with the cotangent g copied)
    assert "bf16[64,4096]" in compiled.as_text() and "bf16[128,4096]" not in compiled.as_text()
    monkeypatch.setattr(transformer, "MIN_ROWS_FOR_TRANSPOSED_COPY", 10**9)
    compiled, plain = grads()
    assert "bf16[64,4096]" not in compiled.as_text()
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(with_copy), jax.tree.leaves(plain)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-7, jax.tree_util.keystr(path[0])
