"""Response-token log-probs: the batch layout, sequence log-probs, and reference log-probs.

Batch layout. A row holds a prompt and a response, `mask` 1 on both and `loss_mask` 1 on the
response tokens only (the positions whose token is a prediction target; the first response token
is predicted from the last prompt token, so a prompt needs at least one token). A pair batch is
a dict of arrays

    chosen_tokens, chosen_mask, chosen_loss_mask        int32 [B, T]
    rejected_tokens, rejected_mask, rejected_loss_mask  int32 [B, T]
    weights                                             float32 [B] (0 on padding pairs)
    ref_chosen, ref_rejected                            float32 [B] summed reference log-probs
                                                        (once `with_reference` added them)
    chosen_win_prob, rejected_win_prob                  float32 [B] optional: each response's
                                                        win probability against the policy
                                                        (soft SPPO; 0.5 on padding pairs)

and an SFT batch is `tokens, mask, loss_mask` [B, T] alike. `make_pair_batch` lays a row out
as `[pad | prompt][response | pad]`: prompts left-padded to P columns, responses right-padded
after them, P and T - P rounded up to a multiple of `length_bucket` (so a run compiles for a
handful of shapes). When that would pass max_length it packs the row instead,
`[prompt | response | pad]`, T rounded up the same way but at most max_length.

Log-probs are computed without the [B, T, V] logits: the final hidden states at the positions
that predict a response token are gathered and fed to the fused
`eva_jax.kernels.target_logprobs`, so the LM head runs at response positions only. In the first
layout the chosen and rejected rows of a pair share their first P columns, the prompt: it runs
through the model once per pair, and both responses attend to its keys and values
(`shared_prompt_length` finds P).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import kernels, models, sharding

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "chosen_loss_mask", "rejected_tokens",
             "rejected_mask", "rejected_loss_mask", "weights")
REFERENCE_KEYS = ("ref_chosen", "ref_rejected")
WIN_PROB_KEYS = ("chosen_win_prob", "rejected_win_prob")
SFT_KEYS = ("tokens", "mask", "loss_mask")
# impl="auto" on CPU: up to this many bytes of float32 [N, V] logits, the plain LM head (3
# matmuls, "dense": kept logits, a hand-written backward) beats the kernels' chunked walk, whose
# backward recomputes the logits (4 matmuls); there memory is plentiful and compute is not.
# Larger heads, and accelerators, take the kernel.
CPU_PLAIN_HEAD_BYTES = 512 * 2**20


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def _truncate(prompt, response, max_length: int, max_prompt_length: int, what: str):
  """Prompt cut from the left to max_prompt_length, response cut from the right to fit."""
  prompt = [int(t) for t in prompt][-max_prompt_length:]
  response = [int(t) for t in response][:max_length - len(prompt)]
  if not prompt:
    raise ValueError(f"{what}: empty prompt (the first response token is predicted from the "
                     "last prompt token, so a prompt needs at least one token)")
  if not response:
    raise ValueError(f"{what}: empty response")
  return prompt, response


def _check_lengths(max_length, max_prompt_length, length_bucket):
  max_length = _check_positive("max_length", max_length)
  max_prompt_length = _check_positive("max_prompt_length", max_prompt_length)
  _check_positive("length_bucket", length_bucket)
  if max_prompt_length >= max_length:
    raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length "
                     f"({max_length}) to leave room for the response")
  return max_length, max_prompt_length


def _fill_rows(rows, num_rows: int, length: int, pad_id: int, prompt_columns: Optional[int]):
  """int32 tokens, mask, loss_mask [num_rows, length] from (prompt, response) rows.

  With `prompt_columns` P each prompt ends at column P (left-padded) and its response starts
  there; without, each row is packed from column 0."""
  tokens = np.full((num_rows, length), pad_id, np.int32)
  mask = np.zeros((num_rows, length), np.int32)
  loss_mask = np.zeros((num_rows, length), np.int32)
  for i, (prompt, response) in enumerate(rows):
    start = 0 if prompt_columns is None else prompt_columns - len(prompt)
    mid, end = start + len(prompt), start + len(prompt) + len(response)
    tokens[i, start:end] = prompt + response
    mask[i, start:end] = 1
    loss_mask[i, mid:end] = 1
  return tokens, mask, loss_mask


def _layout(rows, max_length: int, length_bucket: int) -> tuple[int, Optional[int]]:
  """(T, P): prompts in P columns and responses after them when that fits in max_length,
  else packed rows (P None) with T rounded up but never past max_length."""
  prompt_columns = _round_up(max(len(p) for p, _ in rows), length_bucket)
  length = prompt_columns + _round_up(max(len(r) for _, r in rows), length_bucket)
  if length <= max_length:
    return length, prompt_columns
  longest = max(len(p) + len(r) for p, r in rows)
  return max(min(_round_up(longest, length_bucket), max_length), longest), None


def make_pair_batch(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                    rejected_ids: Sequence[Sequence[int]], *, max_length: int,
                    max_prompt_length: int, pad_id: int, ref_chosen=None, ref_rejected=None,
                    chosen_win_prob=None, rejected_win_prob=None, batch_multiple: int = 1,
                    length_bucket: int = 64) -> dict:
  """A pair batch (module docstring) from token-id lists, one entry per pair.

  Truncation (as TRL's DPO): the prompt keeps its last `max_prompt_length` tokens, then each
  response keeps its first `max_length - len(prompt)` tokens. Responses should end with EOS.
  The batch is padded with weight-0 pairs to a multiple of `batch_multiple` (the mesh's batch
  sharding, `sharding.batch_multiple(mesh)`); the row layout and T are described in the module
  docstring. `ref_chosen`/`ref_rejected` ([num pairs] floats) are attached when given (see
  also `with_reference`), and so are `chosen_win_prob`/`rejected_win_prob` ([num pairs] in
  [0, 1], `losses.win_probabilities`; padding pairs get ½).
  """
  max_length, max_prompt_length = _check_lengths(max_length, max_prompt_length, length_bucket)
  batch_multiple = _check_positive("batch_multiple", batch_multiple)
  if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids) or not len(prompt_ids):
    raise ValueError(f"make_pair_batch needs equally many (>0) prompts, chosen and rejected "
                     f"responses, got {len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}")
  chosen, rejected = [], []
  for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
    chosen.append(_truncate(p, c, max_length, max_prompt_length, f"pair {i} (chosen)"))
    rejected.append(_truncate(p, r, max_length, max_prompt_length, f"pair {i} (rejected)"))
  num_pairs = len(chosen)
  size = _round_up(num_pairs, batch_multiple)
  length, prompt_columns = _layout(chosen + rejected, max_length, length_bucket)
  # Padding pairs: one target token each (so length-averaged losses stay finite), weight 0.
  filler = [([pad_id], [pad_id])] * (size - num_pairs)
  batch = {}
  for side, rows in (("chosen", chosen), ("rejected", rejected)):
    tokens, mask, loss_mask = _fill_rows(rows + filler, size, length, pad_id, prompt_columns)
    batch.update({f"{side}_tokens": tokens, f"{side}_mask": mask,
                  f"{side}_loss_mask": loss_mask})
  batch["weights"] = (np.arange(size) < num_pairs).astype(np.float32)
  if (ref_chosen is None) != (ref_rejected is None):
    raise ValueError("make_pair_batch: give both ref_chosen and ref_rejected, or neither")
  if ref_chosen is not None:
    batch = with_reference([batch], ref_chosen, ref_rejected, num_pairs=[num_pairs])[0]
  if (chosen_win_prob is None) != (rejected_win_prob is None):
    raise ValueError("make_pair_batch: give both chosen_win_prob and rejected_win_prob, or "
                     "neither")
  if chosen_win_prob is not None:
    for key, values in zip(WIN_PROB_KEYS, (chosen_win_prob, rejected_win_prob)):
      values = np.asarray(values, np.float64).reshape(-1)
      if len(values) != num_pairs or not ((values >= 0) & (values <= 1)).all():
        raise ValueError(f"make_pair_batch: {key} needs one value in [0, 1] per pair "
                         f"({num_pairs}), got {len(values)} values from {values.min(initial=0)} "
                         f"to {values.max(initial=0)} (nan: {np.isnan(values).any()})")
      batch[key] = np.concatenate([values, np.full(size - num_pairs, 0.5)]).astype(np.float32)
  return batch


def make_sft_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   *, max_length: int, max_prompt_length: int, pad_id: int,
                   batch_multiple: int = 1, length_bucket: int = 64) -> dict:
  """An SFT batch {tokens, mask, loss_mask} [B, T] of packed rows (module docstring); truncation
  and padding as make_pair_batch. Padding rows have an all-zero loss_mask (the SFT loss is a
  mean over real target tokens).
  """
  max_length, max_prompt_length = _check_lengths(max_length, max_prompt_length, length_bucket)
  batch_multiple = _check_positive("batch_multiple", batch_multiple)
  if len(prompt_ids) != len(response_ids) or not len(prompt_ids):
    raise ValueError(f"make_sft_batch needs equally many (>0) prompts and responses, got "
                     f"{len(prompt_ids)} and {len(response_ids)}")
  rows = [_truncate(p, r, max_length, max_prompt_length, f"example {i}")
          for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
  size = _round_up(len(rows), batch_multiple)
  longest = max(len(p) + len(r) for p, r in rows)
  length = max(min(_round_up(longest, length_bucket), max_length), longest)
  tokens, mask, loss_mask = _fill_rows(rows, size, length, pad_id, None)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def with_reference(batches: Sequence[dict], ref_chosen, ref_rejected,
                   num_pairs: Optional[Sequence[int]] = None) -> list[dict]:
  """Copies of `batches` with `ref_chosen`/`ref_rejected` [B] attached, split in batch order.

  `ref_*` hold one value per pair of all batches, concatenated (what `reference_logprobs`
  returns); `num_pairs[i]` is how many of them batch i takes (default: its whole batch), the
  rest of its rows (weight-0 padding) get 0.
  """
  ref_chosen = np.asarray(ref_chosen, np.float32).reshape(-1)
  ref_rejected = np.asarray(ref_rejected, np.float32).reshape(-1)
  sizes = [len(b["weights"]) for b in batches]
  num_pairs = list(sizes if num_pairs is None else num_pairs)
  if len(num_pairs) != len(batches) or sum(num_pairs) != len(ref_chosen) or any(
      n > s for n, s in zip(num_pairs, sizes)) or len(ref_rejected) != len(ref_chosen):
    raise ValueError(f"with_reference: {len(ref_chosen)} chosen / {len(ref_rejected)} rejected "
                     f"reference values do not match the batches' pair counts {num_pairs}")
  out, start = [], 0
  for batch, size, n in zip(batches, sizes, num_pairs):
    new = dict(batch)
    for key, values in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
      column = np.zeros(size, np.float32)
      column[:n] = values[start:start + n]
      new[key] = column
    out.append(new)
    start += n
  return out


def num_targets_bucket(loss_mask_BxT, bucket: int = 64) -> int:
  """The static gather width for `sequence_logprobs`: the most targets in a row, rounded up.

  Reads the mask on the host (a device array is fetched); never more than T - 1.
  """
  loss_mask = np.asarray(loss_mask_BxT)
  most = int(loss_mask[:, 1:].sum(axis=1).max())
  return max(1, min(_round_up(most, bucket), loss_mask.shape[1] - 1))


def shared_prompt_length(batch: dict, multiple: int = 64) -> Optional[int]:
  """P for `pair_logprobs`: how many leading columns the chosen and rejected rows of every pair
  share (same tokens and mask, no target), rounded down to `multiple` and below T; None if 0.

  Reads the batch on the host. Batches of make_pair_batch's first layout share their prompt
  columns; packed rows usually share nothing after rounding.
  """
  get = lambda key: np.asarray(batch[key])
  same_BxT = ((get("chosen_tokens") == get("rejected_tokens"))
              & (get("chosen_mask") == get("rejected_mask"))
              & (get("chosen_loss_mask") == 0) & (get("rejected_loss_mask") == 0))
  shared_T = same_BxT.all(axis=0)
  length = len(shared_T) if shared_T.all() else int(np.argmin(shared_T))
  length = min(length, len(shared_T) - 1) // multiple * multiple
  return length or None


def _summed_target_logprobs(config, params, hidden_BxSxD, targets_BxS, weights_BxS, impl,
                            num_targets):
  """Sums over S of log p(target | hidden) where weights > 0, and the weight sums; [B] each."""
  if num_targets is not None and num_targets < 1:
    raise ValueError(f"num_targets must be a positive int or None, got {num_targets}")
  weights_BxS = weights_BxS.astype(jnp.float32)
  if num_targets is not None and num_targets < targets_BxS.shape[1]:
    # A stable sort puts each row's target positions first, in order: the gather indices.
    order_BxR = jnp.argsort(weights_BxS == 0, axis=1, stable=True)[:, :num_targets]
    hidden_BxSxD = jnp.take_along_axis(hidden_BxSxD, order_BxR[..., None], axis=1)
    targets_BxS = jnp.take_along_axis(targets_BxS, order_BxR, axis=1)
    weights_BxS = jnp.take_along_axis(weights_BxS, order_BxR, axis=1)
  b, s, d = hidden_BxSxD.shape
  if impl == "auto" and jax.default_backend() == "cpu" and (
      4 * b * s * config.vocab_size <= CPU_PLAIN_HEAD_BYTES):
    impl = "dense"
  w_out_DxV = models.output_projection(config, params).astype(config.jnp_dtype)
  hidden_NxD = nn.with_logical_constraint(hidden_BxSxD.reshape(b * s, d),
                                          ("act_batch", "act_embed"))
  targets_N = targets_BxS.reshape(b * s).astype(jnp.int32)
  split = sharding.vocab_parallel_axes(config.vocab_size)
  if split is not None:
    # Each device keeps its vocabulary slice of the head (and of its gradient); rows move.
    vocab_axes, row_axes = split
    logprob_N = kernels.vocab_parallel_target_logprobs(
        hidden_NxD, w_out_DxV, targets_N, axes=vocab_axes, row_axes=row_axes,
        softcap=config.final_logit_softcap, impl=impl)
  else:
    # The head gathered along D (the vocabulary split as the rules say) and the rows split
    # over the batch, so the kernel's blocks and their gradients need no resharding.
    w_out_DxV = nn.with_logical_constraint(w_out_DxV, ("act_embed", "act_vocab"))
    logprob_N = kernels.target_logprobs(hidden_NxD, w_out_DxV, targets_N,
                                        softcap=config.final_logit_softcap, impl=impl)
  # jnp.where, not a product: nothing at a masked position (say a non-finite value) can leak.
  logprob_BxS = jnp.where(weights_BxS > 0, logprob_N.reshape(b, s), 0.0)
  return jnp.sum(logprob_BxS, axis=1), jnp.sum(weights_BxS, axis=1)


def sequence_logprobs(config: models.ModelConfig, params: dict, tokens_BxT, attention_mask_BxT,
                      loss_mask_BxT, *, impl: str = "auto", num_targets: Optional[int] = None):
  """Summed log-probs of the response tokens of each row, and their count.

  Position t's hidden state predicts token t + 1, so token t counts when loss_mask[t] is 1
  (loss_mask[:, 0] is ignored: nothing predicts the first token).

  Args:
    config, params: the policy (a causal LM).
    tokens_BxT, attention_mask_BxT, loss_mask_BxT: int [B, T], padding anywhere.
    impl: `eva_jax.kernels.target_logprobs` implementation ("chunked", "pallas",
      "reference", "dense"), or "auto": the kernels' choice, except the plain head ("dense")
      on CPU when its logits are small (CPU_PLAIN_HEAD_BYTES).
    num_targets: static; when given, the LM head runs only at the first `num_targets` target
      positions of each row (it must be >= the most targets in any row: see
      `num_targets_bucket`); None runs it at all T - 1 positions (masked).

  Returns:
    (summed_logprobs [B] float32 nats, lengths [B] float32 target counts).
  """
  if config.is_reward_model:
    raise ValueError("sequence_logprobs needs a causal LM, got a reward model config")
  hidden_BxTxD = models.forward_hidden(config, params, tokens_BxT, attention_mask_BxT)
  return _summed_target_logprobs(config, params, hidden_BxTxD[:, :-1], tokens_BxT[:, 1:],
                                 loss_mask_BxT[:, 1:], impl, num_targets)


def _interleave(batch: dict, key: str):
  """chosen_{key} and rejected_{key} [B, ...] as [2B, ...]: row 2i chosen, row 2i + 1 rejected.

  Interleaved (not concatenated) so that a batch sharded along B stays sharded along 2B without
  moving rows between devices."""
  c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
  if c.shape != r.shape:
    raise ValueError(f"chosen_{key} {c.shape} and rejected_{key} {r.shape} differ in shape")
  return jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])


def _shared_prompt_predictors(config, params, batch: dict, prompt_length: int):
  """Hidden states [2B, T - P, D] predicting columns P.. of the interleaved rows, running the
  P shared prompt columns once per pair: a prefill into a KV cache, then both responses
  attend to it (models.decode_step, the sampler's path, differentiable)."""
  p = prompt_length
  b, t = batch["chosen_tokens"].shape
  mask_2BxT = _interleave(batch, "mask")
  positions_2BxT = models.positions_from_mask(mask_2BxT)
  positions_BxT = positions_2BxT[::2]
  prompt_valid_BxT = (batch["chosen_mask"] > 0) & (jnp.arange(t) < p)[None]
  hidden_BxPxD, cache = models.decode_step(
      config, params, batch["chosen_tokens"][:, :p], positions_BxT[:, :p],
      models.init_cache(config, b, t), 0, positions_BxT, prompt_valid_BxT)
  cache = jax.tree.map(lambda c_LxBxTxKxE: jnp.repeat(c_LxBxTxKxE, 2, axis=1), cache)
  hidden_2BxRxD, _ = models.decode_step(
      config, params, _interleave(batch, "tokens")[:, p:], positions_2BxT[:, p:], cache, p,
      positions_2BxT, mask_2BxT > 0)
  # The last prompt column predicts the first response column of both rows of the pair.
  last_prompt_2Bx1xD = jnp.repeat(hidden_BxPxD[:, p - 1:], 2, axis=0)
  return jnp.concatenate([last_prompt_2Bx1xD, hidden_2BxRxD[:, :-1]], axis=1)


def pair_logprobs(config: models.ModelConfig, params: dict, batch: dict, *, impl: str = "auto",
                  num_targets: Optional[int] = None, prompt_length: Optional[int] = None):
  """(chosen, rejected, chosen_lengths, rejected_lengths), each [B], of a pair batch.

  The 2B rows run as one batch. With a static `prompt_length` P (`shared_prompt_length`), the
  first P columns, which the two rows of a pair share, run once per pair instead of twice
  (same result, less compute). `num_targets` as in sequence_logprobs.
  """
  if prompt_length is None:
    logps_2B, lengths_2B = sequence_logprobs(
        config, params, _interleave(batch, "tokens"), _interleave(batch, "mask"),
        _interleave(batch, "loss_mask"), impl=impl, num_targets=num_targets)
  else:
    if not 0 < prompt_length < batch["chosen_tokens"].shape[1]:
      raise ValueError(f"prompt_length must lie in [1, T), got {prompt_length} for T = "
                       f"{batch['chosen_tokens'].shape[1]}")
    hidden_2BxSxD = _shared_prompt_predictors(config, params, batch, prompt_length)
    logps_2B, lengths_2B = _summed_target_logprobs(
        config, params, hidden_2BxSxD, _interleave(batch, "tokens")[:, prompt_length:],
        _interleave(batch, "loss_mask")[:, prompt_length:], impl, num_targets)
  logps_Bx2, lengths_Bx2 = logps_2B.reshape(-1, 2), lengths_2B.reshape(-1, 2)
  return logps_Bx2[:, 0], logps_Bx2[:, 1], lengths_Bx2[:, 0], lengths_Bx2[:, 1]


def static_shapes(batch: dict, bucket: int = 64) -> dict:
  """The static arguments of `pair_logprobs` for a host pair batch: {num_targets,
  prompt_length}, each a multiple of `bucket` where it can be (so few shapes compile)."""
  num_targets = max(num_targets_bucket(batch["chosen_loss_mask"], bucket),
                    num_targets_bucket(batch["rejected_loss_mask"], bucket))
  return {"num_targets": num_targets, "prompt_length": shared_prompt_length(batch, bucket)}


@functools.partial(jax.jit, static_argnames=("config", "impl", "num_targets", "prompt_length",
                                             "rules"))
def _reference_forward(params, batch, *, config, impl, num_targets, prompt_length,
                       rules=sharding.DEFAULT_RULES):
  # `rules` (static) are read by the models' activation constraints from the caller's
  # `sharding.activation_rules` context while tracing; a change of rules must retrace.
  del rules
  chosen_B, rejected_B, _, _ = pair_logprobs(config, params, batch, impl=impl,
                                             num_targets=num_targets,
                                             prompt_length=prompt_length)
  return chosen_B, rejected_B


def reference_logprobs(config: models.ModelConfig, params: dict, batches: Sequence[dict], *,
                       mesh=None, impl: str = "auto", bucket: int = 64,
                       rules=sharding.DEFAULT_RULES):
  """Summed response log-probs of every pair under `params`, computed once per iteration.

  One jitted forward per batch shape (no gradient, no optimizer). With `mesh`, each batch is
  sharded along its pairs and the models' activation constraints map through `rules` (the
  run's `sharding.rules_from_config(c.mesh.rules)`). `bucket` as in `static_shapes`.

  Returns:
    (ref_chosen [N], ref_rejected [N]) float32 numpy arrays over all rows of `batches` in order
    (padding pairs included), ready for `with_reference` and to be kept as an artifact.
  """
  chosen, rejected = [], []
  for batch in batches:
    arrays = {k: np.asarray(batch[k]) for k in PAIR_KEYS if k != "weights"}
    static = static_shapes(arrays, bucket)
    if mesh is None:
      c, r = _reference_forward(params, arrays, config=config, impl=impl, **static)
    else:
      with sharding.activation_rules(mesh, rules):
        c, r = _reference_forward(params, sharding.shard_batch(arrays, mesh), config=config,
                                  impl=impl, rules=rules, **static)
    chosen.append(sharding.to_host(c).astype(np.float32))
    rejected.append(sharding.to_host(r).astype(np.float32))
  return np.concatenate(chosen), np.concatenate(rejected)
