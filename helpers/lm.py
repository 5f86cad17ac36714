"""Log-probabilities, sampling and generation: the language-model plumbing every week uses (taught in week 0).

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.
Convention: ``logits[:, t]`` is the distribution of token ``t + 1`` (what a causal LM outputs at position ``t``),
so the log-prob of the tokens a model was fed is ``token_logprobs(logits[:, :-1], input_ids[:, 1:])``;
:func:`sequence_logprobs` does that shift for you.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each label under ``logits``; 0 where ``mask`` is 0 (padding).

    Args: logits (B, T, V), labels (B, T) int, mask (B, T) bool/0-1 or None.
    Returns: (B, T) float. Naive equivalent: ``logits.softmax(-1).gather(-1, labels[..., None]).log()``, which
    underflows to -inf for very negative logits; ``log_softmax`` does not.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), stable: subtracts the max first
    out = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out


def sequence_logprob(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over the positions where ``mask`` is 1: log P(sequence). (B, T) -> (B,)."""
    return (token_lp * mask.to(token_lp.dtype)).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (never dividing by padding)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each categorical distribution: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability adds up to at least ``top_p``; the rest get -inf.

    The most likely token always survives. (..., V) -> (..., V). ``top_p = 1`` keeps everything.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the mass *before* it already reaches top_p.
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from (B, V) logits with temperature and nucleus (top-p) filtering. Returns (B,).

    ``temperature = 0`` means greedy.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    filtered = top_p_filter(logits.float() / temperature, top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs of ``input_ids[:, 1:]`` under ``model``: (B, T) -> (B, T-1).

    Positions that are padding (``attention_mask``) or, if given, outside ``response_mask`` are 0. Position ids
    count real tokens only, as in generation, so left-padded rows get the same log-probs as unpadded ones.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    mask = attention_mask[:, 1:].bool()
    if response_mask is not None:
        mask = mask & response_mask[:, 1:].bool()
    return token_logprobs(logits, input_ids[:, 1:], mask)


@dataclass
class Rollout:
    """A batch of prompts and sampled responses, left-padded prompt then right-padded response.

    ``input_ids`` (B, T) = prompt tokens (left-padded) followed by response tokens (right-padded);
    ``attention_mask`` (B, T) is 1 on real tokens; ``response_mask`` (B, T) is 1 on response tokens up to and
    including the first end-of-sequence token.
    """

    prompts: list[str]
    responses: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 24, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 64, seed: int | None = None, progress: bool = False) -> Rollout:
    """Sample responses to ``prompts`` (batched, KV cache) and return them with the tensors RL needs."""
    from tqdm.auto import tqdm

    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padded tokenizer: call helpers.zoo.prepare_tokenizer(tokenizer)")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_len = enc["input_ids"].shape[1]
    rows, texts = [], []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="generate", disable=not progress, leave=False, file=sys.stdout):
        ids = enc["input_ids"][i:i + batch_size].to(device)
        att = enc["attention_mask"][i:i + batch_size].to(device)
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        rows.append(out[:, prompt_len:].cpu())
    new = torch.nn.utils.rnn.pad_sequence([r for batch in rows for r in batch], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)  # (B, N)
    # Response mask: tokens up to and including the first EOS.
    is_eos = new == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    resp_mask = (~after_eos) & (new != tokenizer.pad_token_id)
    for row, m in zip(new, resp_mask):
        texts.append(tokenizer.decode(row[m & (row != eos)], skip_special_tokens=True))
    input_ids = torch.cat([enc["input_ids"], torch.where(resp_mask, new, tokenizer.pad_token_id)], 1)
    attention_mask = torch.cat([enc["attention_mask"], resp_mask.long()], 1)
    response_mask = torch.cat([torch.zeros_like(enc["attention_mask"]), resp_mask.long()], 1)
    return Rollout(list(prompts), texts, input_ids, attention_mask, response_mask, prompt_len)
