"""Generation with a preallocated KV cache: sampling (greedy, temperature,
top-k, top-p, n per prompt) and beam search with a length penalty.

Prompts are left-padded to a bucketed length P (`rljax.buckets.bucket_length`), the cache
holds S = P + max_new_tokens slots, and decoding is one jitted
`lax.while_loop` that stops as soon as every row has emitted eos, so repeated
calls with new prompts of similar length reuse one compiled program.

"eos" below means any stop token: `eos_id` or one of `stop_ids` (a model whose
generation_config lists several, e.g. Llama 3.1's <|end_of_text|>, <|eom_id|>,
<|eot_id|>). The stop token that ends a row is kept in the completion and counted
in loss_mask, logprobs and lengths. `tokenizer_ids(tok)` gives the three id
fields of a config from a tokenizer:

    cfg = SampleConfig(max_new_tokens=256, n=8, **tokenizer_ids(tok))

Layout of a `Rollout` (R = rows = prompts x n, T = P + max_new_tokens):

    tokens          [R, T]     prompt (left-padded) then completion (pad after the stop token)
    attention_mask  [R, T]     1 on real tokens
    loss_mask       [R, T]     1 on completion tokens, the stop token included
    logprobs        [R, T-1]   log π(tokens[t+1] | tokens[:t+1]) under the policy
                               (temperature 1, no truncation); 0 off the completion
    sampling_logprobs [R, T-1] the same under the distribution actually sampled
                               from (temperature / top-k / top-p); 0 when greedy
    lengths [R], stopped_at_eos [R] (ended at eos_id or any stop id), group_ids [R]
    (prompt index of each row)

`logprobs[:, t]` is aligned with `token_logprobs(params, tokens, attention_mask)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from rljax.buckets import bucket_length
from rljax.data.batch import Rollout
from rljax.data.collate import pad_rows
from rljax.distributed import process_slice, to_host
from rljax.models.transformer import KVCache, Model, last_token_index
from rljax.ops.logits import logprobs_from_logits
from rljax.sharding import constrain, is_axis_names, shard_batch


@dataclass(frozen=True)
class SampleConfig:
    """How to sample. temperature == 0 or greedy=True means argmax decoding.

    top_k = 0, top_p = 1 and min_p = 0 switch truncation off (applied after the temperature in that order,
    as transformers' warpers; min_p keeps the tokens whose probability is at least min_p times the most
    likely one's). repetition_penalty p != 1 (transformers' and vLLM's, Keskar et al. 2019) rescales, before
    all of these, the logit z of every token already in the row (its prompt's real tokens and its completion
    so far): z / p where z > 0, z · p otherwise, so p > 1 discourages repeats; greedy decoding takes the argmax
    of the rescaled logits. It changes what is drawn, not the policy: `Rollout.logprobs` stay the model's,
    `sampling_logprobs` are the rescaled (and truncated) distribution's. n samples per prompt are
    laid out contiguously (rows i*n .. i*n+n-1 belong to prompt i). A row ends at
    `eos_id` or at any of `stop_ids` (extra stop tokens, e.g. an HF tokenizer's
    `eos_ids`); eos_id = -1 with no stop_ids never stops before max_new_tokens.

    cache_segments: decoding runs in up to this many segments (`decode_segments`), each with a
    KV cache only as long as the prompt plus the tokens made by the segment's end, grown
    between segments. A decode step is bound by reading the cache, so this reads ~(k+1)/2k
    of the slots a full-length cache would (k = 4: 62%); each segment compiles its own loop
    body, so short generations (< 64 new tokens) use one. 1: one full-length cache.
    cpu_row_groups: on CPU without a mesh, decode the rows as this many groups at once, each
    group a call of the same compiled loop on its own host thread (`row_groups`). XLA:CPU runs
    a decode step's small ops one after another on one core, so the groups keep the others busy:
    128 rows x 128 new tokens of a d256 x 4-layer model on 2 cores, 1.85 -> 0.96 s in bf16 and
    2.57 -> 1.54 s in float32. Each group reads all the weights every step, so a large model
    (where reading them is the step's cost) decodes slower in groups. 0 (auto): one group per
    core this process may use while the groups' weights read per step stay within
    ROW_GROUP_WEIGHT_BYTES, each of at least MIN_ROWS_PER_GROUP rows; k: at most k groups; 1: off.
    The rows' samples do not depend on the grouping (each row draws with its own key).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    greedy: bool = False
    n: int = 1
    eos_id: int = 2
    pad_id: int = 0
    min_prompt_bucket: int = 16
    stop_ids: tuple[int, ...] = ()
    cache_segments: int = 4
    cpu_row_groups: int = 0

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SampleConfig.{field}: {why}")

        _check_types(self, "SampleConfig", ints=("max_new_tokens", "top_k", "n", "min_prompt_bucket", "cache_segments",
                                                 "cpu_row_groups"), reals=("temperature", "top_p", "min_p",
                                                                          "repetition_penalty"),
                     bools=("greedy",))
        if self.cache_segments < 1:
            bad("cache_segments", f"must be >= 1, got {self.cache_segments}")
        _check_cpu_row_groups(self, "SampleConfig")
        _check_token_ids(self, "SampleConfig")

        if self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1] (0 = off), got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            bad("repetition_penalty", f"must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if self.n < 1:
            bad("n", f"must be >= 1, got {self.n}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """Every id that ends a row: eos_id, then stop_ids."""
        return _stop_tokens(self)

    def replace(self, **changes) -> "SampleConfig":
        return dataclasses.replace(self, **changes)


def _check_types(cfg, name: str, *, ints=(), reals=(), bools=()) -> None:
    """Fields of a decoding config read from a JSON / YAML file or a flag parser arrive as whatever
    the file held: an int field must be an int (a float would run with float group ids or fail deep
    inside a trace), a real one a number that is not NaN (temperature NaN sampled token 0 with NaN
    log-probs; NaN compares False with every bound), a flag a bool (the string "false" is truthy).
    A ValueError names the field. None is left to the field's own check."""
    for field in ints:
        v = getattr(cfg, field)
        if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"{name}.{field}: must be an int, got {v!r}")
    for field in reals:
        v = getattr(cfg, field)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) or v != v:
            raise ValueError(f"{name}.{field}: must be a number, got {v!r}")
    for field in bools:
        v = getattr(cfg, field)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name}.{field}: must be True or False, got {v!r}")


def _check_cpu_row_groups(cfg, name: str) -> None:
    """`cfg.cpu_row_groups` (SampleConfig, BeamConfig, ValueSearchConfig) is 0 (auto), 1 (off) or a
    group count; a negative one raises naming the field."""
    if cfg.cpu_row_groups < 0:
        raise ValueError(f"{name}.cpu_row_groups: must be >= 0 (0 = auto, 1 = off), got {cfg.cpu_row_groups}")


def _check_token_ids(cfg, name: str) -> None:
    """Check `cfg.eos_id` (an int, -1: none) and `cfg.pad_id` (an int >= 0), and normalise
    `cfg.stop_ids` to a tuple of ints (hashable, so the jitted decoders can take the config as a
    static argument); a non-integer or negative id raises naming the field. Whether they lie in
    the vocabulary is checked where the model is known (`prepare_prompts`' special_ids)."""
    for field, lowest in (("eos_id", -1), ("pad_id", 0)):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
            raise ValueError(f"{name}.{field}: must be a token id (an int >= {lowest}"
                             f"{', -1: no eos' if lowest < 0 else ''}), got {value!r}")
    object.__setattr__(cfg, "stop_ids", _token_id_tuple(cfg.stop_ids, f"{name}.stop_ids"))


def _token_id_tuple(ids, field: str) -> tuple[int, ...]:
    """`ids` (a sequence of token ids, or one id) as a tuple of ints; a non-integer or negative id raises
    naming field[i]."""
    if isinstance(ids, (int, np.integer)):
        ids = (ids,)
    try:
        ids = tuple(ids)
    except TypeError:
        raise ValueError(f"{field}: must be a tuple of token ids, got {ids!r}") from None
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"{field}[{i}]: must be a token id (an int >= 0), got {t!r}")
    return tuple(int(t) for t in ids)


def _stop_tokens(cfg) -> tuple[int, ...]:
    """(eos_id, *stop_ids) without repeats, eos_id first."""
    return tuple(dict.fromkeys((cfg.eos_id, *cfg.stop_ids)))


def _is_stop(tok: jax.Array, cfg) -> jax.Array:
    """tok [...] int -> bool [...]: tok is eos_id or one of cfg.stop_ids. Without stop_ids this is
    exactly the single comparison with eos_id that the decoders always made."""
    if not cfg.stop_ids:
        return tok == cfg.eos_id
    return jnp.isin(tok, jnp.asarray(_stop_tokens(cfg), tok.dtype))


def tokenizer_ids(tokenizer) -> dict:
    """The id fields of SampleConfig, BeamConfig and ValueSearchConfig from a tokenizer:
    {eos_id: the id `add_eos` appends, stop_ids: its other stop ids (an HF tokenizer's
    generation_config `eos_token_id`s), pad_id}. Usage: `SampleConfig(n=8, **tokenizer_ids(tok))`."""
    eos_ids = tuple(getattr(tokenizer, "eos_ids", (tokenizer.eos_id,)))
    return dict(eos_id=int(tokenizer.eos_id), stop_ids=tuple(int(t) for t in eos_ids if t != tokenizer.eos_id),
                pad_id=int(tokenizer.pad_id))


def special_ids(cfg, name: str) -> dict[str, int]:
    """{field: id} of a sampling config's eos_id (when >= 0), pad_id, stop_ids (and a search's step_end_ids), for the check
    against the vocabulary in `prepare_prompts`."""
    ids = {f"{name}.pad_id": cfg.pad_id, **{f"{name}.stop_ids[{i}]": t for i, t in enumerate(cfg.stop_ids)},
           **{f"{name}.step_end_ids[{i}]": t for i, t in enumerate(getattr(cfg, "step_end_ids", ()))}}
    return ids if cfg.eos_id < 0 else {f"{name}.eos_id": cfg.eos_id, **ids}


def prepare_prompts(prompt_tokens, prompt_mask, *, vocab_size: int, max_new_tokens: int, max_seq_len: int,
                    pad_id: int, min_bucket: int = 16, special: dict[str, int] | None = None,
                    room_field: str = "max_new_tokens"):
    """Validate prompts and left-align them in a bucketed width.

    prompt_tokens, prompt_mask: [B, P0] (any padding side; padding is moved to
    the left). Returns numpy (tokens [B, P], mask [B, P]) with P a power of
    two >= the longest prompt (at least `min_bucket`), capped so that
    P + max_new_tokens <= max_seq_len. special: {field: id} (`special_ids`) that must lie in the
    vocabulary: an eos or pad id outside it would never stop a row, or break the decode.
    room_field: what the errors call max_new_tokens, the cache slots kept after the prompt (the
    setting the caller's user would change).
    """
    for field, i in (special or {}).items():
        if i >= vocab_size:
            raise ValueError(f"{field} = {i} is outside the model's vocabulary [0, {vocab_size})")
    tokens = np.asarray(prompt_tokens)
    mask = np.ones(tokens.shape, np.int32) if prompt_mask is None else np.asarray(prompt_mask)
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, length], got shape {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} does not match prompt_tokens shape {tokens.shape}")
    if tokens.shape[0] == 0:
        raise ValueError("prompt_tokens has no rows")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {tokens.dtype}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("prompt_mask must contain only 0 and 1")
    mask = mask.astype(bool)
    lengths = mask.sum(axis=1)
    if tokens.shape[1] == 0 or (lengths == 0).any():
        row = 0 if tokens.shape[1] == 0 else int(np.argmin(lengths))
        raise ValueError(f"prompt row {row} is empty; every prompt needs at least one token (e.g. bos)")
    outside = mask & ((tokens < 0) | (tokens >= vocab_size))
    if outside.any():
        b, t = map(int, np.argwhere(outside)[0])
        raise ValueError(f"prompt_tokens[{b}, {t}] = {int(tokens[b, t])} is outside the vocabulary [0, {vocab_size})")
    longest = int(lengths.max())
    room = max_seq_len - max_new_tokens
    if room < 1:  # no prompt fits, however short: the prompt is not what to change
        raise ValueError(f"{room_field}={max_new_tokens} leaves no room for a prompt in the KV cache "
                         f"(config.max_seq_len={max_seq_len}); ask for fewer new tokens or build the model with a "
                         "longer max_seq_len")
    if longest > room:
        raise ValueError(f"prompt row {int(np.argmax(lengths))} has {longest} tokens; with {room_field}="
                         f"{max_new_tokens} it exceeds the KV cache (config.max_seq_len={max_seq_len}): prompts "
                         f"may have at most {room} tokens (truncate_prompts keeps the last ones)")
    width = bucket_length(longest, minimum=min_bucket, maximum=room)
    out, out_mask = pad_rows([t[m] for t, m in zip(tokens, mask)], width, pad_id, side="left")
    return out, out_mask


def truncate_prompts(prompt_tokens, prompt_mask, max_length: int, *, pad_id: int = 0):
    """Keep the last `max_length` real tokens of every prompt (left truncation, so the
    end of the prompt, next to the completion, survives). Returns numpy (tokens,
    mask) left-padded to the longest kept prompt, and the number of rows cut."""
    if max_length < 1:
        raise ValueError(f"truncate_prompts: max_length must be >= 1, got {max_length}")
    tokens = np.asarray(prompt_tokens)
    mask = np.ones(tokens.shape, bool) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    rows = [t[m][-max_length:] for t, m in zip(tokens, mask)]
    out, out_mask = pad_rows(rows, max(len(r) for r in rows), pad_id, side="left")
    return out, out_mask, int((mask.sum(axis=1) > max_length).sum())


def concat_rollouts(rollouts: list["Rollout"], *, pad_id: int = 0) -> "Rollout":
    """Stack rollouts row-wise: [R_1 + R_2 + ..., P_max + N_max]. Shorter prompt widths are
    left-padded to the widest P_max (positions count real tokens only, so this changes no
    log-probability) and shorter completion widths (another max_new_tokens) right-padded to the
    widest N_max, with pad_id tokens and zero masks and log-probs, as a row that stopped early.
    Group ids are renumbered so groups stay distinct."""
    P = max(r.prompt_length for r in rollouts)
    N = max(r.tokens.shape[1] - r.prompt_length for r in rollouts)
    parts, offset = [], 0
    for r in rollouts:
        k, m = P - r.prompt_length, N - (r.tokens.shape[1] - r.prompt_length)

        def pad(x, value=0):
            return jnp.pad(x, ((0, 0), (k, m)), constant_values=value) if k or m else x

        parts.append(r.replace(tokens=pad(r.tokens, pad_id), attention_mask=pad(r.attention_mask),
                               loss_mask=pad(r.loss_mask), logprobs=pad(r.logprobs),
                               sampling_logprobs=pad(r.sampling_logprobs), group_ids=r.group_ids + offset))
        offset += int(r.group_ids.max()) + 1
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[p.replace(prompt_length=P) for p in parts])


def _truncate(logits: jax.Array, cfg: SampleConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus), then min-p (p_i < min_p · max_j p_j removed, i.e.
    exp(z_i − max z) < min_p); removed entries become -inf."""
    z = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < z.shape[-1]:
        kth = lax.top_k(z, cfg.top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if cfg.top_p < 1.0:
        sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_z, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
        keep = before < cfg.top_p  # the most likely token is always kept
        threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < threshold, -jnp.inf, z)
    if cfg.min_p > 0.0:
        z = jnp.where(jnp.exp(z - jnp.max(z, axis=-1, keepdims=True)) < cfg.min_p, -jnp.inf, z)
    return z


def seen_tokens(tokens: jax.Array, mask: jax.Array, vocab: int) -> jax.Array:
    """tokens, mask [R, T] -> bool [R, vocab]: seen[r, v] = some position t with mask[r, t] holds token v."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, jnp.where(mask > 0, tokens, vocab)].set(True, mode="drop")


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """The repetition penalty: logits [R, V], seen bool [R, V] -> float32 [R, V] with z / penalty where seen and
    z > 0, z · penalty where seen and z <= 0, z elsewhere."""
    z = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(z > 0, z / penalty, z * penalty), z)


def choose_tokens(logits: jax.Array, key: jax.Array, cfg: SampleConfig):
    """Pick next tokens. logits [R, V] -> (tokens [R] int32, log-prob under the sampling distribution [R])."""
    if cfg.is_greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, jnp.zeros(tok.shape, jnp.float32)
    z = _truncate(logits, cfg)
    tok = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    return tok, logprobs_from_logits(z, tok)


def choose_row_tokens(logits: jax.Array, keys: jax.Array, cfg: SampleConfig):
    """`choose_tokens` with one key per row, keys [R], so that a row's draw does not depend on
    which other rows share the batch: logits [R, V] -> (tokens [R], sampling log-probs [R])."""
    tok, slp = jax.vmap(lambda lg, k: choose_tokens(lg[None], k, cfg))(logits, keys)
    return tok[:, 0], slp[:, 0]


def row_keys(key: jax.Array, first_row, rows: int) -> jax.Array:
    """The keys of rows first_row .. first_row + rows - 1 of a sampling call: fold_in(key, row)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, first_row + jnp.arange(rows, dtype=jnp.int32))


def step_keys(keys: jax.Array, step) -> jax.Array:
    """Each row's key for decode step `step`: fold_in(keys[r], step), keys [R] -> [R]."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def _constrain_cache(cache, model: Model):
    if model.mesh is None:
        return cache
    return jax.tree.map(lambda names, x: constrain(x, model.mesh, names), model.cache_logical_axes(), cache,
                        is_leaf=is_axis_names)


def decode_segments(max_new_tokens: int, segments: int) -> tuple[int, ...]:
    """The new-token counts at which the decode segments end (the last is max_new_tokens).

    At most `segments` segments of at least 32 tokens each, ends rounded up to multiples of 8:
    decode_segments(128, 4) == (32, 64, 96, 128); decode_segments(40, 4) == (40,)."""
    N = max_new_tokens
    k = max(1, min(segments, N // 32))
    return tuple(sorted({min(N, -(-(N * (j + 1) // k) // 8) * 8) for j in range(k)}))  # j = k - 1 gives N


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The cache with `length` slots: the new slots, appended at the end, are empty (not valid)."""
    extra = length - cache.length
    if extra < 0:
        raise ValueError(f"grow_cache: cannot shrink a {cache.length}-slot cache to {length}")
    if extra == 0:
        return cache
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))  # noqa: E731 -- [B, K, S, H]
    return cache.replace(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                         valid=jnp.pad(cache.valid, ((0, 0), (0, extra))))


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _generate(params, prompt, prompt_mask, key, first_row=0, *, model: Model, cfg: SampleConfig):
    """The decode loop for rows first_row .. first_row + R - 1 of a `sample` call (their keys and
    group ids); first_row is traced, so every group of a grouped call shares one program."""
    R, P = prompt.shape
    N = cfg.max_new_tokens
    keys = row_keys(key, first_row, R)
    ends = decode_segments(N, cfg.cache_segments)
    params = model.unstack_layers(params)  # sliced once, not on every step of the loop
    cache = _constrain_cache(model.init_cache(R, P + ends[0]), model)
    hidden, cache = model.forward(params, prompt, prompt_mask, cache=cache)
    logits = model.logits(params, hidden[:, -1])  # left padding: the last slot is every row's last token
    penalized = cfg.repetition_penalty != 1.0
    # [R, V] bool, carried only when the penalty is on (None is an empty pytree in the loop's carry)
    seen = constrain(seen_tokens(prompt, prompt_mask, logits.shape[-1]), model.mesh, ("batch", "vocab")) \
        if penalized else None

    def body(c):
        i, logits, cache, toks, lps, slps, live, done, seen = c
        drawn_from = penalize_repeats(logits, seen, cfg.repetition_penalty) if penalized else logits
        tok, slp = choose_row_tokens(drawn_from, step_keys(keys, i), cfg)
        lp = logprobs_from_logits(logits, tok)
        alive = ~done
        tok = jnp.where(alive, tok, cfg.pad_id)
        toks = toks.at[:, i].set(tok)
        lps = lps.at[:, i].set(jnp.where(alive, lp, 0.0))
        slps = slps.at[:, i].set(jnp.where(alive, slp, 0.0))
        live = live.at[:, i].set(alive.astype(jnp.int32))
        done = done | _is_stop(tok, cfg)
        if penalized:  # a finished row's pad token is never read again
            seen = seen.at[jnp.arange(R), tok].set(True)
        hidden, cache = model.forward(params, tok[:, None], alive[:, None].astype(jnp.int32), cache=cache)
        return i + 1, model.logits(params, hidden[:, 0]), cache, toks, lps, slps, live, done, seen

    carry = (jnp.int32(0), logits, cache, jnp.full((R, N), cfg.pad_id, jnp.int32),
             jnp.zeros((R, N), jnp.float32), jnp.zeros((R, N), jnp.float32),
             jnp.zeros((R, N), jnp.int32), jnp.zeros((R,), bool), seen)
    for j, end in enumerate(ends):
        if j:  # the next segment's cache: P + end slots, so its steps read no more than they need
            carry = carry[:2] + (_constrain_cache(grow_cache(carry[2], P + end), model),) + carry[3:]

        def cond(c, end=end):
            i, done = c[0], c[7]
            return (i < end) & ~jnp.all(done)

        carry = lax.while_loop(cond, body, carry)
    _, _, _, toks, lps, slps, live, done, _ = carry

    zeros = jnp.zeros((R, P - 1), jnp.float32)
    return Rollout(
        tokens=jnp.concatenate([prompt, toks], axis=1),
        attention_mask=jnp.concatenate([prompt_mask, live], axis=1),
        loss_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), live], axis=1),
        logprobs=jnp.concatenate([zeros, lps], axis=1),
        sampling_logprobs=jnp.concatenate([zeros, slps], axis=1),
        lengths=live.sum(axis=1),
        stopped_at_eos=done,
        group_ids=(first_row + jnp.arange(R, dtype=jnp.int32)) // cfg.n,
        prompt_length=P,
    )


def sample(params, prompt_tokens, prompt_mask, key, *, model: Model, cfg: SampleConfig) -> Rollout:
    """Sample `cfg.n` completions per prompt with a KV cache.

    prompt_tokens, prompt_mask: [B, P0] int (left padding preferred; other
    padding is realigned). key: a PRNG key; the same key gives the same
    samples (row r draws with fold_in(key, r), then fold_in(·, step): `row_keys`, so a row's
    sample depends neither on the rows after it nor on `cfg.cpu_row_groups`). Returns a
    `Rollout` with R = B * n rows.

    When `model.mesh` is set, pass `params` already sharded; the rows are split over the batch
    axes (B * n must divide by data * fsdp: B a multiple of `prompt_multiple(model, cfg.n)`). On
    several processes (a mesh over all their devices, `rljax.distributed`) every process passes
    the same global prompts and key, decodes its own block of rows and gets the Rollout of all
    B * n rows as global arrays, the samples one process with that mesh draws; read them with
    `rljax.distributed.to_host`.
    """
    c = model.config
    tokens, mask = prepare_prompts(prompt_tokens, prompt_mask, vocab_size=c.vocab_size,
                                   max_new_tokens=cfg.max_new_tokens, max_seq_len=c.max_seq_len,
                                   pad_id=cfg.pad_id, min_bucket=cfg.min_prompt_bucket,
                                   special=special_ids(cfg, "SampleConfig"))
    if cfg.n > 1:
        tokens, mask = np.repeat(tokens, cfg.n, axis=0), np.repeat(mask, cfg.n, axis=0)
    tokens, mask = _own_rows(tokens, mask, model, "sample", cfg.n)
    groups = row_groups(len(tokens), params, model, cfg)
    if groups == 1:
        return _generate(params, _place(tokens, model), _place(mask, model), key, model=model, cfg=cfg)

    def decode(rows):
        return _generate(params, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), key, rows.start, model=model,
                         cfg=cfg)

    return concat_rows(in_row_groups(decode, len(tokens), groups))


def in_row_groups(run, rows: int, groups: int) -> list:
    """[run(slice of group 0), ..., run(slice of group groups - 1)] over `rows` rows split evenly, each
    group's result ready, the groups at once on host threads: the first on this one, the others in
    a pool. XLA:CPU runs a computation on the thread that calls it where dispatch is inline
    (`rljax.host_memory`), and this thread's malloc arena is the one the train step's buffers reuse."""
    size = rows // groups

    def ready(j):
        return jax.block_until_ready(run(slice(j * size, (j + 1) * size)))

    with ThreadPoolExecutor(groups - 1, thread_name_prefix="rljax-decode") as pool:
        rest = [pool.submit(ready, j) for j in range(1, groups)]
        return [ready(0)] + [f.result() for f in rest]


def concat_rows(parts: list):
    """The groups' results (pytrees of the same structure) joined along their leading row axis, in one
    compiled program (run leaf by leaf, each concatenation would compile a program of its own)."""
    return _concat_rows(parts)


@jax.jit
def _concat_rows(parts: list):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


MIN_ROWS_PER_GROUP = 8
ROW_GROUP_WEIGHT_BYTES = 96 * 2**20


def row_groups(rows: int, params, model: Model, cfg, cores: int | None = None, per_row: int = 1) -> int:
    """How many groups `sample` decodes `rows` rows in (`SampleConfig.cpu_row_groups`); with
    per_row, how many groups of prompts `beam_search` or `value_guided_beam_search` runs, each
    prompt decoding per_row sequences (its beams, or its W·E candidates). cfg: any of the three
    configs (its cpu_row_groups).

    1 unless the backend is the CPU, the model has no mesh and `params` are concrete arrays (not
    traced by a caller's `jax.jit`); else the largest divisor of `rows` that is at most
    cfg.cpu_row_groups, or with 0 (auto) at most `cores` (default: the cores this process may
    use), ROW_GROUP_WEIGHT_BYTES / (the parameters' bytes in the compute dtype) and rows x per_row
    / MIN_ROWS_PER_GROUP.

    Why the weight bound: every group reads all the weights on every step. On a 2-core Xeon (bf16
    weights read), two groups decoded a d256 x 4-layer model 1.9x faster than one (8 MiB of
    weights), d384 x 8 layers 1.24x (34 MiB), d512 x 8 layers 0.93x (50 MiB) and d1024 x 8 layers
    0.74x (200 MiB); docs/performance.md."""
    if cfg.cpu_row_groups == 1 or model.mesh is not None or jax.default_backend() != "cpu":
        return 1
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
        return 1  # inside a caller's trace: tracing state is per thread, and the caller compiles one program
    if cfg.cpu_row_groups:
        most = cfg.cpu_row_groups
    else:
        cores = cores or usable_cores()
        weight_bytes = sum(x.size for x in jax.tree.leaves(params)) * jnp.dtype(model.config.compute_dtype).itemsize
        most = min(cores, ROW_GROUP_WEIGHT_BYTES // max(1, weight_bytes), rows * per_row // MIN_ROWS_PER_GROUP)
    return max(g for g in range(1, max(1, min(most, rows)) + 1) if rows % g == 0)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _place(x: np.ndarray, model: Model):
    return jnp.asarray(x) if model.mesh is None else shard_batch(x, model.mesh)


def _spans_processes(model: Model) -> bool:
    return model.mesh is not None and jax.process_count() > 1


def prompt_multiple(model: Model, n: int = 1) -> int:
    """The smallest m such that `sample` (n samples per prompt), `beam_search` (n = 1) and
    `value_guided_beam_search` (n = 1) take any multiple of m prompts on `model`: its mesh splits
    the B * n rows over data x fsdp, and on several processes each process decodes B * n / count
    of them. 1 without a mesh. Callers with a ragged last batch pad it to a multiple (e.g. with
    copies of a prompt) and drop the copies' rows, as `rljax.eval.complete` does."""
    if model.mesh is None:
        return 1
    rows = math.lcm(math.prod(model.mesh.shape[a] for a in ("data", "fsdp")), jax.process_count())
    return rows // math.gcd(rows, n)


def filled_prompts(prompts: list, model: Model, n: int = 1, size: int | None = None) -> list:
    """`prompts` followed by copies of its first, up to `size` (default: as many as there are) rounded
    up to a multiple of `prompt_multiple(model, n)`: what a caller with any number of prompts passes to
    `sample` (one shape for every call of `size`), dropping the copies' rows after."""
    m = prompt_multiple(model, n)
    target = -(-(len(prompts) if size is None else size) // m) * m
    return list(prompts) + [prompts[0]] * (target - len(prompts))


def _own_rows(tokens: np.ndarray, mask: np.ndarray, model: Model, name: str, n: int = 1):
    """This process's rows of the prepared global rows [R, P] (the same on every process, bucketed
    to the global width) when the model's mesh spans several processes: rows `process_slice(R)`,
    which `shard_batch` assembles into the global batch. Every row otherwise. With a mesh, R must
    split over its batch axes (and the processes): a ValueError naming `name` and the multiple."""
    if model.mesh is None:
        return tokens, mask
    count, m = jax.process_count(), prompt_multiple(model, n)
    shards = math.prod(model.mesh.shape[a] for a in ("data", "fsdp"))
    if len(tokens) % math.lcm(shards, count):
        over = f"data x fsdp = {shards} of the mesh" + (f" and the {count} processes" if count > 1 else "")
        raise ValueError(f"{name}: {len(tokens) // n} prompts{f' x n = {n}' if n > 1 else ''} do not split over "
                         f"the {over}: pass a multiple of {m} prompts (`prompt_multiple`; e.g. pad with copies of "
                         "a prompt and drop their rows, as `rljax.eval.complete` does)")
    if count == 1:
        return tokens, mask
    own = process_slice(len(tokens))
    return tokens[own], mask[own]


# ----------------------------------------------------------------------------- beam search


@dataclass(frozen=True)
class BeamConfig:
    """Beam search. A hypothesis of n generated tokens (eos included) with
    summed log-probability s scores s / n**length_penalty (0 = raw sum; > 0
    favours longer outputs). With early_stopping, search ends once no live
    beam can still beat the worst of the num_beams finished ones. A hypothesis
    ends at eos_id or at any of stop_ids (kept, and counted in its length).
    cpu_row_groups: on CPU, search the prompts as this many groups at once on host threads, as
    `SampleConfig.cpu_row_groups` does for sampling (0: auto; 1: off). A prompt's hypotheses do
    not depend on the grouping (with early stopping a group ends once its own prompts are
    settled, and further steps could not change a settled prompt's finished hypotheses); their
    scores may differ by rounding, each group size being its own compiled program (1 ulp seen)."""

    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    eos_id: int = 2
    pad_id: int = 0
    early_stopping: bool = True
    min_prompt_bucket: int = 16
    stop_ids: tuple[int, ...] = ()
    cpu_row_groups: int = 0

    def __post_init__(self):
        _check_types(self, "BeamConfig", ints=("num_beams", "max_new_tokens", "min_prompt_bucket", "cpu_row_groups"),
                     reals=("length_penalty",), bools=("early_stopping",))
        _check_token_ids(self, "BeamConfig")
        if self.num_beams < 1:
            raise ValueError(f"BeamConfig.num_beams: must be >= 1, got {self.num_beams}")
        _check_cpu_row_groups(self, "BeamConfig")
        if self.max_new_tokens < 1:
            raise ValueError(f"BeamConfig.max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@struct.dataclass
class BeamResult:
    """Finished hypotheses, best first. tokens/attention_mask [B, K, P + N];
    scores (length-penalised), logprob_sums, lengths [B, K]."""

    tokens: jax.Array
    attention_mask: jax.Array
    scores: jax.Array
    logprob_sums: jax.Array
    lengths: jax.Array
    prompt_length: int = struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _beam(params, prompt, prompt_mask, *, model: Model, cfg: BeamConfig):
    B, P = prompt.shape
    K, N, V = cfg.num_beams, cfg.max_new_tokens, model.config.vocab_size
    # candidates kept per step: enough that K of them do not stop (each live beam adds at most one
    # candidate per stop token, so K * (1 + S) with S stop tokens; 2K with eos alone)
    C = min(K * (1 + len(_stop_tokens(cfg))), K * V)
    alpha = cfg.length_penalty
    params = model.unstack_layers(params)  # sliced once, not on every step of the loop
    cache = model.init_cache(B, P + N)
    hidden, cache = model.forward(params, prompt, prompt_mask, cache=cache)
    logits = model.logits(params, hidden[:, -1])
    # Every beam starts as a copy of its prompt; only beam 0 is live at step 0.
    cache = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0) if x.ndim else x, cache)
    logits = jnp.repeat(logits, K, axis=0)
    rows = jnp.arange(B)[:, None]

    def cond(c):
        i, alive_lp, fin_score = c[0], c[2], c[4]
        if not cfg.early_stopping:
            return i < N
        # Best score a live beam can still reach: its sum can only fall, its length is in [i+1, N].
        best_len = jnp.float32(N) if alpha >= 0 else (i + 1).astype(jnp.float32)
        bound = jnp.max(alive_lp, axis=1) / best_len**alpha
        return (i < N) & ~jnp.all(fin_score[:, -1] >= bound)

    def body(c):
        i, alive_seq, alive_lp, fin_seq, fin_score, fin_lp, fin_len, logits, cache = c
        cand = alive_lp[:, :, None] + jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(B, K, V)
        top_lp, top_idx = lax.top_k(cand.reshape(B, K * V), C)  # [B, C]
        src, tok = top_idx // V, (top_idx % V).astype(jnp.int32)
        seq = alive_seq[rows, src].at[:, :, i].set(tok)  # [B, C, N]
        is_eos = _is_stop(tok, cfg)
        length = (i + 1).astype(jnp.float32)
        # Candidates ending here (eos, or the length limit) join the finished pool.
        ends = is_eos | (i == N - 1)
        score = jnp.where(ends, top_lp / length**alpha, -jnp.inf)
        all_score = jnp.concatenate([fin_score, score], axis=1)
        fin_score, pick = lax.top_k(all_score, K)
        fin_seq = jnp.concatenate([fin_seq, seq], axis=1)[rows, pick]
        fin_lp = jnp.concatenate([fin_lp, top_lp], axis=1)[rows, pick]
        fin_len = jnp.concatenate([fin_len, jnp.full((B, C), i + 1, jnp.int32)], axis=1)[rows, pick]
        # The K best candidates that did not end stay live.
        alive_lp, keep = lax.top_k(jnp.where(is_eos, -jnp.inf, top_lp), K)
        alive_seq = seq[rows, keep]
        parent = (jnp.arange(B)[:, None] * K + src[rows, keep]).reshape(-1)
        cache = jax.tree.map(lambda x: x[parent] if x.ndim else x, cache)
        next_tok = alive_seq[:, :, i].reshape(-1, 1)
        hidden, cache = model.forward(params, next_tok, jnp.ones_like(next_tok), cache=cache)
        return i + 1, alive_seq, alive_lp, fin_seq, fin_score, fin_lp, fin_len, model.logits(params, hidden[:, 0]), cache

    neg = jnp.full((B, K), -jnp.inf, jnp.float32)
    init = (jnp.int32(0), jnp.full((B, K, N), cfg.pad_id, jnp.int32), neg.at[:, 0].set(0.0),
            jnp.full((B, K, N), cfg.pad_id, jnp.int32), neg, neg, jnp.zeros((B, K), jnp.int32), logits, cache)
    _, _, _, fin_seq, fin_score, fin_lp, fin_len, _, _ = lax.while_loop(cond, body, init)
    gen_mask = (jnp.arange(N)[None, None, :] < fin_len[:, :, None]).astype(jnp.int32)
    fin_seq = jnp.where(gen_mask > 0, fin_seq, cfg.pad_id)
    return BeamResult(
        tokens=jnp.concatenate([jnp.broadcast_to(prompt[:, None], (B, K, P)), fin_seq], axis=2),
        attention_mask=jnp.concatenate([jnp.broadcast_to(prompt_mask[:, None], (B, K, P)), gen_mask], axis=2),
        scores=fin_score, logprob_sums=fin_lp, lengths=fin_len, prompt_length=P,
    )


def beam_search(params, prompt_tokens, prompt_mask, *, model: Model, cfg: BeamConfig) -> BeamResult:
    """Beam search with a KV cache; returns the `num_beams` best finished hypotheses per prompt.

    prompt_tokens, prompt_mask: [B, P0]. Each step expands the K live beams
    by every token, keeps the 2K best extensions (K(1 + S) with S stop tokens) by summed
    log-probability, moves those ending in eos or a stop id (or at max_new_tokens) to the finished pool
    (ranked by length-penalised score) and continues with the K best others. On CPU the prompts
    are searched in groups on host threads (`BeamConfig.cpu_row_groups`).
    """
    c = model.config
    tokens, mask = prepare_prompts(prompt_tokens, prompt_mask, vocab_size=c.vocab_size,
                                   max_new_tokens=cfg.max_new_tokens, max_seq_len=c.max_seq_len,
                                   pad_id=cfg.pad_id, min_bucket=cfg.min_prompt_bucket,
                                   special=special_ids(cfg, "BeamConfig"))
    tokens, mask = _own_rows(tokens, mask, model, "beam_search")
    groups = row_groups(len(tokens), params, model, cfg, per_row=cfg.num_beams)
    if groups == 1:
        return _beam(params, _place(tokens, model), _place(mask, model), model=model, cfg=cfg)

    def search(rows):
        return _beam(params, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), model=model, cfg=cfg)

    return concat_rows(in_row_groups(search, len(tokens), groups))


# ----------------------------------------------------------------------------- value-guided step beam search


@dataclass(frozen=True)
class ValueSearchConfig:
    """Value-guided step beam search (OREO's test-time search).

    beams W: partial solutions kept per prompt; expansions E: next steps sampled from
    each (None: E = W, the paper's B × B candidates; beams = 1, expansions = K is
    best-of-K selection of every single next step); step_end_ids: tokens that end a
    step (e.g. the separator's id); a step also ends at eos or after max_step_tokens;
    max_new_tokens N: the length limit of a solution (reaching it finishes it);
    max_rounds: the round limit (one step per round). temperature, top_k, top_p: the
    step sampler (temperature 0: greedy steps). stop_ids: extra tokens that end the
    solution like eos_id (an HF tokenizer's other `eos_ids`). The KV cache holds
    P + cache_room = P + max_rounds · max_step_tokens slots (each round's steps write side by side).
    cpu_row_groups: on CPU, search the prompts as this many groups at once, each on its own host
    thread, as `SampleConfig.cpu_row_groups` does for sampling (0: auto, one group per core while
    each keeps at least MIN_ROWS_PER_GROUP candidate rows; 1: off). A prompt's result does not
    depend on the grouping; with trace=True the search runs as one group.
    """

    beams: int = 3
    expansions: int | None = None
    step_end_ids: tuple[int, ...] = ()
    max_step_tokens: int = 32
    max_new_tokens: int = 128
    max_rounds: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = 2
    pad_id: int = 0
    min_prompt_bucket: int = 16
    stop_ids: tuple[int, ...] = ()
    cpu_row_groups: int = 0

    def __post_init__(self):
        _check_types(self, "ValueSearchConfig", ints=("beams", "expansions", "max_step_tokens", "max_new_tokens",
                                                      "max_rounds", "top_k", "min_prompt_bucket", "cpu_row_groups"),
                     reals=("temperature", "top_p"))
        _check_token_ids(self, "ValueSearchConfig")
        for f in ("beams", "max_step_tokens", "max_new_tokens", "max_rounds"):
            if getattr(self, f) < 1:
                raise ValueError(f"ValueSearchConfig.{f}: must be >= 1, got {getattr(self, f)}")
        if self.expansions is not None and self.expansions < 1:
            raise ValueError(f"ValueSearchConfig.expansions: must be >= 1 or None, got {self.expansions}")
        _check_cpu_row_groups(self, "ValueSearchConfig")
        object.__setattr__(self, "step_end_ids", _token_id_tuple(self.step_end_ids, "ValueSearchConfig.step_end_ids"))
        self.sampling  # validates temperature, top_k, top_p

    @property
    def width(self) -> int:
        """E, the continuations sampled per beam."""
        return self.beams if self.expansions is None else self.expansions

    @property
    def cache_room(self) -> int:
        """The KV cache's slots after the prompt: max_rounds · max_step_tokens."""
        return self.max_rounds * self.max_step_tokens

    @property
    def sampling(self) -> SampleConfig:
        return SampleConfig(max_new_tokens=self.max_step_tokens, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, eos_id=self.eos_id, pad_id=self.pad_id, stop_ids=self.stop_ids,
                            cpu_row_groups=self.cpu_row_groups)


@struct.dataclass
class SearchResult:
    """The best solution per prompt: tokens, attention_mask [B, P + N] (prompt left-padded,
    solution right-padded), scores [B] (the scorer's value of it), lengths [B],
    finished [B] (False: the round limit came first and this is the best live beam);
    pool_tokens [B, W, N], pool_scores [B, W] (the finished pool, best first, −inf where
    empty); rounds: rounds run; generated: tokens sampled in all (the search's cost);
    trace: with `trace=True`, per round a dict of numpy arrays, else None: candidates [B, W·E, N]
    (each candidate's solution so far), lengths, scores, finished and valid [B, W·E] (False for
    unused slots: round 0 extends the prompt alone, and a beam that is not live has no
    children); kept [B, W]: the candidates chosen as the next beams, best first, of which only
    those valid, unfinished and scored above −inf are live. Candidate j of round r + 1 extends
    candidate kept[:, j // E] of round r (the search tree)."""

    tokens: jax.Array
    attention_mask: jax.Array
    scores: jax.Array
    lengths: jax.Array
    finished: jax.Array
    pool_tokens: jax.Array
    pool_scores: jax.Array
    rounds: int = struct.field(pytree_node=False)
    generated: int = struct.field(pytree_node=False)
    prompt_length: int = struct.field(pytree_node=False)
    trace: list | None = struct.field(pytree_node=False, default=None)


def scored_index(tokens: jax.Array, attention_mask: jax.Array, skip_ids) -> jax.Array:
    """Where a scorer reads each row: the last real token that is not one of `skip_ids`.

        t*(r) = max{t : attention_mask[r, t] = 1, tokens[r, t] ∉ skip_ids}   (the last real token if none)

    tokens, attention_mask [R, T] (left or right padded) -> [R] int32. A model trained at some
    positions only is read at the last of them: OREO's value V_t is fitted only where a completion
    token follows, never at a trailing eos (skip the stop ids, `oreo_training.value_scorer`); a process
    reward model's labels sit on each step's last text token, never on the separator or eos
    (skip those too, `rewards.learned.prm_search_scorer`). Causal attention makes the hidden state
    at t* the same with or without the skipped tokens after it."""
    real = attention_mask > 0
    keep = real & ~jnp.isin(tokens, jnp.asarray(tuple(skip_ids), tokens.dtype))
    return jnp.where(keep.any(axis=1), last_token_index(keep), last_token_index(real)).astype(jnp.int32)


def scorer_at_index(model: Model, head: Callable, skip_ids, name: str, hint: str) -> Callable:
    """`scorer(params, tokens, attention_mask) -> [R]` (jitted): head(params, hidden) of `model` at each
    row's `scored_index` (the last real token not in skip_ids); the scorer's `skip_ids` attribute holds
    them, for `value_guided_beam_search` to check against its stop ids. name and hint: for errors
    (an empty skip_ids is refused, hint saying which ids to pass)."""
    skip = tuple(int(t) for t in skip_ids)
    if not skip:
        raise ValueError(f"{name}: no ids to read before; pass {hint}")

    @jax.jit
    def read(params, tokens, attention_mask):
        hidden, _ = model.forward(params, tokens, attention_mask, read_at=scored_index(tokens, attention_mask, skip))
        return head(params, hidden)

    def scorer(params, tokens, attention_mask):
        return read(params, tokens, attention_mask)

    scorer.skip_ids = skip
    scorer.__name__ = name
    return scorer


def _scorer_name(scorer) -> str:
    return getattr(scorer, "__name__", type(scorer).__name__)


def _check_scorer_stops(scorer, cfg: ValueSearchConfig) -> None:
    """A scorer that reads before trailing tokens (its `skip_ids`, set by `value_scorer` and
    `prm_search_scorer`) must skip every id that ends this search's solutions, or a finished
    candidate is read at its stop token, where the model was never trained."""
    skip = getattr(scorer, "skip_ids", None)
    if skip is None:
        return
    missing = [t for t in _stop_tokens(cfg) if t >= 0 and t not in set(skip)]
    if missing:
        raise ValueError(f"value_guided_beam_search: scorer {_scorer_name(scorer)} reads before the trailing ids "
                         f"{tuple(skip)}, but this search also ends solutions at {tuple(missing)} "
                         f"(ValueSearchConfig.eos_id / stop_ids); build the scorer with the search's stop ids, e.g. "
                         "value_scorer(value_model, stop_ids=(cfg.eos_id, *cfg.stop_ids))")


def _checked_scores(raw, valid: jax.Array, scorer, *, round_: int, per_prompt: int, first_row: int) -> jax.Array:
    """The scorer's output, checked on the host (the round already syncs there): one finite score per
    candidate, [R]. NaN would be silently ranked (top_k puts it anywhere), +inf wins everything and
    −inf is the search's own mark for an empty slot, so any of them on a live candidate is an error
    naming the scorer, the prompt and the candidate; slots that are not valid may hold anything."""
    s, live = to_host((raw, valid))  # one collective where they span processes
    name = _scorer_name(scorer)
    if s.shape != valid.shape:
        raise ValueError(f"value_guided_beam_search: scorer {name} returned shape {s.shape}; expected "
                         f"{tuple(valid.shape)}, one score per candidate")
    if jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(np.float32)  # bfloat16 scores are numbers too (numpy reads their kind as "V")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"value_guided_beam_search: scorer {name} returned dtype {s.dtype}, not real numbers")
    bad = np.flatnonzero(live & ~np.isfinite(s))
    if len(bad):
        j = int(bad[0])
        raise ValueError(f"value_guided_beam_search: scorer {name} returned {s[j]} for candidate {j % per_prompt} "
                         f"of prompt {first_row + j // per_prompt} in round {round_} ({len(bad)} non-finite "
                         "scores in all); scores must be finite")
    return raw


@functools.partial(jax.jit, static_argnames=("model", "cfg", "slots"))
def _search_start(params, prompt, prompt_mask, *, model: Model, cfg: ValueSearchConfig, slots: int):
    """Prompt forward for W copies of every prompt: cache, next logits [B·W, V]."""
    W = cfg.beams
    prompt, prompt_mask = jnp.repeat(prompt, W, axis=0), jnp.repeat(prompt_mask, W, axis=0)
    cache = _constrain_cache(model.init_cache(prompt.shape[0], slots), model)
    hidden, cache = model.forward(params, prompt, prompt_mask, cache=cache)
    return cache, model.logits(params, hidden[:, -1])


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _search_expand(params, cache, logits, gen, glen, valid, keys, *, model: Model, cfg: ValueSearchConfig):
    """Sample one step from each of the W beams E times. In: cache and logits of B·W beams,
    gen [B·W, N], glen [B·W], valid [B·W], keys [B] (this round's key per prompt). Out:
    the B·W·E candidates' cache, logits, gen, glen, valid, finished and tokens sampled."""
    E, N, scfg = cfg.width, cfg.max_new_tokens, cfg.sampling
    params = model.unstack_layers(params)  # sliced once, not on every step of the loop
    R = gen.shape[0] * E
    src = jnp.repeat(jnp.arange(gen.shape[0]), E)
    cache = jax.tree.map(lambda x: x[src] if x.ndim else x, cache)
    logits, gen, glen, valid = logits[src], gen[src], glen[src], valid[src]
    beam_keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, R // keys.shape[0]),
                                             jnp.arange(R) % (R // keys.shape[0]))
    ends = jnp.asarray(cfg.step_end_ids + _stop_tokens(cfg), jnp.int32)
    rows = jnp.arange(R)

    def cond(c):
        i, alive = c[0], c[-1]
        return (i < cfg.max_step_tokens) & jnp.any(alive)

    def body(c):
        i, logits, cache, gen, glen, eos, alive = c
        tok, _ = choose_row_tokens(logits, step_keys(beam_keys, i), scfg)
        tok = jnp.where(alive, tok, cfg.pad_id)
        gen = gen.at[rows, jnp.minimum(glen, N - 1)].set(jnp.where(alive, tok, gen[rows, jnp.minimum(glen, N - 1)]))
        glen = glen + alive.astype(glen.dtype)
        eos = eos | (alive & _is_stop(tok, cfg))
        hidden, cache = model.forward(params, tok[:, None], alive[:, None].astype(jnp.int32), cache=cache)
        logits = jnp.where(alive[:, None], model.logits(params, hidden[:, 0]), logits)
        alive = alive & ~jnp.isin(tok, ends) & (glen < N)
        return i + 1, logits, cache, gen, glen, eos, alive

    alive = valid & (glen < N)
    init = (jnp.int32(0), logits, cache, gen, glen, jnp.zeros((R,), bool), alive)
    _, logits, cache, gen2, glen2, eos, _ = lax.while_loop(cond, body, init)
    finished = valid & (eos | (glen2 >= N))
    return cache, logits, gen2, glen2, valid, finished, jnp.sum(glen2 - glen)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _search_select(cache, logits, gen, glen, valid, finished, scores, pool_gen, pool_len, pool_score, *,
                   cfg: ValueSearchConfig):
    """Finished candidates join the pool (best W kept); the W best unfinished become the beams."""
    W, E = cfg.beams, cfg.width
    B = pool_gen.shape[0]
    C = W * E
    rows = jnp.arange(B)[:, None]
    s = scores.reshape(B, C).astype(jnp.float32)
    fin, ok = finished.reshape(B, C), valid.reshape(B, C)
    g, gl = gen.reshape(B, C, -1), glen.reshape(B, C)
    all_score = jnp.concatenate([pool_score, jnp.where(fin, s, -jnp.inf)], axis=1)
    pool_score, pick = lax.top_k(all_score, W)
    pool_gen = jnp.concatenate([pool_gen, g], axis=1)[rows, pick]
    pool_len = jnp.concatenate([pool_len, gl], axis=1)[rows, pick]
    live_score, keep = lax.top_k(jnp.where(ok & ~fin, s, -jnp.inf), W)
    src = (jnp.arange(B)[:, None] * C + keep).reshape(-1)
    cache = jax.tree.map(lambda x: x[src] if x.ndim else x, cache)
    new_valid = (live_score > -jnp.inf).reshape(-1)
    return (cache, logits[src], gen[src], glen[src], new_valid, live_score.reshape(-1), pool_gen, pool_len,
            pool_score, keep)


def value_guided_beam_search(params, prompt_tokens, prompt_mask, scorer, scorer_params, key, *, model: Model,
                             cfg: ValueSearchConfig, keys=None, trace: bool = False) -> SearchResult:
    """Value-guided step beam search: keep W partial solutions per prompt; each round,
    sample E next steps from each (up to a step end, eos or the length limit), score
    the W·E candidates with `scorer`, move candidates that finished
    (eos or max_new_tokens) to a pool of the W best finished ones, keep the W best
    unfinished as the new beams, until no beam is left or after max_rounds. Returns the
    highest-scored finished candidate (the best live beam where none finished). Round 0
    extends the prompt alone (E candidates).

    scorer(scorer_params, tokens [R, P+N], attention_mask [R, P+N]) -> [R]: each candidate's
    solution so far, a finished one ending in its stop token (eos_id or a stop id), an unfinished
    one usually in a step end. It must read each where its model was trained:
    `rljax.oreo_training.value_scorer(value_model, stop_ids=(cfg.eos_id, *cfg.stop_ids))` with the
    value params reads V before a trailing stop token (OREO never fits V at eos);
    `rljax.rewards.learned.prm_search_scorer` reads a process reward model at the last step-text
    token (its labels are never on a separator or eos). A scorer with `skip_ids` (those two) that
    misses one of the search's stop ids is refused. It runs once per round on all candidates of
    all prompts, outside jit; its scores are checked on the host: a shape other than [R] or a
    non-finite score of a candidate (NaN, ±inf) is an error naming the scorer, prompt and round.
    All beams of all prompts are batched on device and the policy's KV cache carries
    over between rounds (candidates copy their beam's cache rows; the kept ones survive).
    Prompt i samples with keys[i] (default fold_in(key, i)), so its result does not
    depend on the other prompts in the batch (given the same padded prompt width), nor on
    `cfg.cpu_row_groups`: on CPU the prompts are searched as groups on host threads (`row_groups`),
    padded to one width first; `rounds` is then the most any group ran and `generated` their sum.
    """
    c = model.config
    _check_scorer_stops(scorer, cfg)
    if not cfg.step_end_ids:
        warnings.warn("value_guided_beam_search: no step_end_ids, so steps end only at eos or after "
                      f"max_step_tokens={cfg.max_step_tokens}", stacklevel=2)
    tokens, mask = prepare_prompts(prompt_tokens, prompt_mask, vocab_size=c.vocab_size, max_new_tokens=cfg.cache_room,
                                   max_seq_len=c.max_seq_len, pad_id=cfg.pad_id, min_bucket=cfg.min_prompt_bucket,
                                   special=special_ids(cfg, "ValueSearchConfig"),
                                   room_field=f"ValueSearchConfig.max_rounds x max_step_tokens ({cfg.max_rounds} x "
                                              f"{cfg.max_step_tokens})")
    B = tokens.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(B)) if keys is None else keys
    if keys.shape[0] != B:
        raise ValueError(f"value_guided_beam_search: {keys.shape[0]} keys for {B} prompts")
    if _spans_processes(model):  # each process places its own prompts' rows and keys of the global batch
        tokens, mask = _own_rows(tokens, mask, model, "value_guided_beam_search")
        own_keys = np.asarray(jax.random.key_data(keys))[process_slice(B)]
        keys = jax.random.wrap_key_data(shard_batch(own_keys, model.mesh), impl=jax.random.key_impl(keys))
    groups = 1 if trace else row_groups(B, params, model, cfg.sampling, per_row=cfg.beams * cfg.width)
    if groups == 1:
        return _value_search(params, _place(tokens, model), _place(mask, model), keys, scorer, scorer_params,
                             model=model, cfg=cfg, trace=trace)

    def search(rows):
        return _value_search(params, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), keys[rows], scorer,
                             scorer_params, model=model, cfg=cfg, trace=False, first_row=rows.start)

    parts = in_row_groups(search, B, groups)
    rounds, generated = max(r.rounds for r in parts), sum(r.generated for r in parts)
    return concat_rows([r.replace(rounds=rounds, generated=generated) for r in parts])  # static fields alike


def _value_search(params, prompt, pmask, keys, scorer, scorer_params, *, model: Model, cfg: ValueSearchConfig,
                  trace: bool, first_row: int = 0) -> SearchResult:
    """`value_guided_beam_search` on prepared prompts [B, P] (on device) with their keys [B];
    first_row: the batch index of prompt 0 (a row group's offset, for error messages)."""
    B, P = prompt.shape
    W, N = cfg.beams, cfg.max_new_tokens
    cache, logits = _search_start(params, prompt, pmask, model=model, cfg=cfg, slots=P + cfg.cache_room)
    gen = jnp.full((B * W, N), cfg.pad_id, jnp.int32)
    glen = jnp.zeros((B * W,), jnp.int32)
    valid = jnp.tile(jnp.arange(W) == 0, B)  # round 0: one beam, the prompt itself
    pool_gen = jnp.full((B, W, N), cfg.pad_id, jnp.int32)
    pool_len = jnp.zeros((B, W), jnp.int32)
    pool_score = jnp.full((B, W), -jnp.inf, jnp.float32)
    live_score = jnp.full((B * W,), -jnp.inf, jnp.float32)
    C = W * cfg.width
    cand_prompt = jnp.repeat(prompt, C, axis=0)
    cand_pmask = jnp.repeat(pmask, C, axis=0)
    steps, generated, rounds = [], 0, 0
    while rounds < cfg.max_rounds and bool(to_host(valid.any())):
        round_keys = step_keys(keys, rounds)
        cache, logits, gen, glen, valid, finished, n_new = _search_expand(params, cache, logits, gen, glen, valid,
                                                                          round_keys, model=model, cfg=cfg)
        seq = jnp.concatenate([cand_prompt, gen], axis=1)
        seq_mask = jnp.concatenate([cand_pmask, (jnp.arange(N)[None] < glen[:, None]).astype(jnp.int32)], axis=1)
        raw = _checked_scores(scorer(scorer_params, seq, seq_mask), valid, scorer, round_=rounds, per_prompt=C,
                              first_row=first_row)
        scores = jnp.where(valid, raw, -jnp.inf)
        if trace:
            steps.append({k: np.asarray(v) for k, v in to_host(dict(
                candidates=gen.reshape(B, C, N), lengths=glen.reshape(B, C), scores=scores.reshape(B, C),
                finished=finished.reshape(B, C), valid=valid.reshape(B, C))).items()})
        (cache, logits, gen, glen, valid, live_score, pool_gen, pool_len, pool_score,
         keep) = _search_select(cache, logits, gen, glen, valid, finished, scores, pool_gen, pool_len, pool_score,
                                cfg=cfg)
        if trace:
            steps[-1]["kept"] = to_host(keep)
        generated += int(to_host(n_new))
        rounds += 1
    live_best = jnp.argmax(live_score.reshape(B, W), axis=1)
    has_pool = pool_score[:, 0] > -jnp.inf
    rows = jnp.arange(B)
    best_gen = jnp.where(has_pool[:, None], pool_gen[:, 0], gen.reshape(B, W, N)[rows, live_best])
    best_len = jnp.where(has_pool, pool_len[:, 0], glen.reshape(B, W)[rows, live_best])
    best_score = jnp.where(has_pool, pool_score[:, 0], live_score.reshape(B, W)[rows, live_best])
    gen_mask = (jnp.arange(N)[None] < best_len[:, None]).astype(jnp.int32)
    return SearchResult(tokens=jnp.concatenate([prompt, jnp.where(gen_mask > 0, best_gen, cfg.pad_id)], axis=1),
                        attention_mask=jnp.concatenate([pmask, gen_mask], axis=1), scores=best_score,
                        lengths=best_len, finished=has_pool, pool_tokens=pool_gen, pool_scores=pool_score,
                        rounds=rounds, generated=generated, prompt_length=P, trace=steps if trace else None)
