"""rljax: a JAX-native, functional library for training language models with RL.

Entry points: `rljax.models` (Model, presets), `rljax.sampling` (sample,
beam_search), `rljax.state` (TrainState, create_state, make_train_step),
`rljax.phases` (run_loop, sft), `rljax.sharding` (make_mesh, rules).
"""
__version__ = "0.1.0"
