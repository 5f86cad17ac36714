"""Checks for week 5: the sentiment-to-score mapping, the turn stop, and LoRA's parameter count."""

from __future__ import annotations

import torch

from .. import judges, socratic
from . import CheckError, check, diagnose, expect_tensor, fresh_seed, quietly, run_student

# ------------------------------------------------------------------------------------ sentiment -> score


def _signed(margin: torch.Tensor, threshold: float) -> torch.Tensor:
    return (margin > threshold).long() - (margin < -threshold).long()


def _as_scores(got, n: int, label: str) -> torch.Tensor:
    got = expect_tensor(got, (n,), label)
    if got.is_floating_point() and not torch.isfinite(got).all():
        raise CheckError(f"{label} gives nan/inf: compute the probabilities with torch.softmax (stable), "
                         "not exp(logits) / sum.")
    values = set(got.detach().double().unique().tolist())
    if not values <= {-1.0, 0.0, 1.0}:
        shown = sorted(values)[:5]
        raise CheckError(f"{label} must return scores in {{-1, 0, +1}}; got values like {shown}. Compare the "
                         "margin p(positive) - p(negative) with +threshold and -threshold instead of returning it.")
    return got.long()


@check
def check_sentiment_to_score(fn) -> str:
    """``fn(logits (B, 3), threshold) -> (B,)`` in {-1, 0, +1}: the margin p(pos) - p(neg) against +-threshold."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B = 64
    for scale, threshold in ((2.0, 0.5), (3.0, 0.2), (1.0, 0.7)):
        logits = torch.randn(B, 3, generator=g) * scale
        got = _as_scores(run_student(fn, logits.clone(), threshold), B, "sentiment_to_score")
        expected = judges.sentiment_to_score(logits, threshold)
        p = logits.softmax(-1)
        mistakes = {
            "the dead zone is missing: argmax - 1 gives +-1 even when the classifier is unsure; score 0 unless "
            "|p(positive) - p(negative)| > threshold.": logits.argmax(-1) - 1,
            "the margin is taken on raw logits; turn them into probabilities with softmax first.":
                _signed(logits[:, 2] - logits[:, 0], threshold),
            "the sign is flipped: column 0 is negative and column 2 positive, so the margin is p[:, 2] - p[:, 0].":
                _signed(p[:, 0] - p[:, 2], threshold),
            "the negative side is missing: a margin below -threshold must score -1.":
                (p[:, 2] - p[:, 0] > threshold).long(),
            "the neutral column is used as a side of the margin; the margin is p(positive) - p(negative).":
                _signed(p[:, 2] - p[:, 1], threshold),
        }
        diagnose(got, expected, mistakes, label=f"sentiment_to_score (threshold {threshold})", seed=seed)
    # Every verdict is confident: the dead zone must not swallow clear cases; none is confident: all 0.
    sure = torch.tensor([[-6.0, 0.0, 6.0], [6.0, 0.0, -6.0], [0.0, 6.0, 0.0]])
    got = _as_scores(run_student(fn, sure.clone(), 0.5), 3, "sentiment_to_score")
    if got.tolist() != [1, -1, 0]:
        raise CheckError(f"clear positive, clear negative and clear neutral verdicts should score [1, -1, 0], got "
                         f"{got.tolist()}.")
    # Numerical stability: logits in the thousands.
    big = torch.randn(B, 3, generator=g) * 1000
    got = _as_scores(run_student(fn, big.clone(), 0.5), B, "sentiment_to_score")
    if not torch.equal(got, judges.sentiment_to_score(big, 0.5)):
        raise CheckError("sentiment_to_score is wrong for huge logits (~1000): exp() overflows to inf and inf / inf "
                         "is nan, so every comparison fails. Use torch.softmax, which subtracts the maximum first "
                         f"(seed {seed}).")
    return "dead zone, sign and softmax right, stable for huge logits"


# -------------------------------------------------------------------------------------------- turn stop


def _turn_case(seed: int, B: int = 12, T: int = 16, V: int = 9):
    """Random tokens (ids 3..V-1, so no accidental stop or EOS) with stops, partial stops and EOS planted."""
    g = torch.Generator().manual_seed(seed)
    eos, stop = 0, [1, 2]
    tokens = torch.randint(3, V, (B, T), generator=g)
    for i in range(B):
        kind = i % 6
        if kind == 0:  # a stop sequence
            t = int(torch.randint(1, T - 2, (1,), generator=g))
            tokens[i, t:t + 2] = torch.tensor(stop)
        elif kind == 1:  # the stop's first token alone, then the full stop later
            tokens[i, 2] = 1
            tokens[i, 9:11] = torch.tensor(stop)
        elif kind == 2:  # EOS before a stop
            tokens[i, 4] = eos
            tokens[i, 8:10] = torch.tensor(stop)
        elif kind == 3:  # two stops: the first counts
            tokens[i, 3:5] = torch.tensor(stop)
            tokens[i, 10:12] = torch.tensor(stop)
        elif kind == 4:  # a stop before an EOS
            tokens[i, 5:7] = torch.tensor(stop)
            tokens[i, 12] = eos
        # kind 5: neither (the turn ran to the token limit)
    return tokens, stop, eos


def _mask_from_ends(ends: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    before = ends.long().cumsum(-1) - (ends.long() if inclusive else 0)
    return before == 0


@check
def check_turn_mask(fn) -> str:
    """``fn(tokens (B, T), stop: list[int], eos_id) -> (B, T)`` bool: True up to and including the end of the turn."""
    seed = fresh_seed()
    tokens, stop, eos = _turn_case(seed)
    got = expect_tensor(run_student(fn, tokens.clone(), list(stop), eos), tuple(tokens.shape), "turn_mask")
    if got.dtype != torch.bool:
        if not set(got.unique().tolist()) <= {0, 1}:
            raise CheckError("turn_mask should return a boolean mask (True inside the turn).")
        got = got.bool()
    expected = socratic.turn_mask(tokens, stop, eos)
    T = tokens.shape[1]
    is_eos = tokens == eos
    full = torch.zeros_like(is_eos)
    full[:, 1:] = (tokens[:, :-1] == stop[0]) & (tokens[:, 1:] == stop[1])
    starts = torch.zeros_like(is_eos)
    starts[:, :-1] = full[:, 1:]
    first_only = tokens == stop[0]
    last = torch.zeros_like(is_eos)
    for i in range(tokens.shape[0]):
        hits = torch.nonzero(full[i] | is_eos[i]).flatten()
        last[i] = torch.arange(T) <= (hits[-1] if len(hits) else T)
    mistakes = {
        "the stop's tokens are cut off: keep them in the turn (ending the turn is an action, like EOS); "
        "False starts after the stop sequence's last token.": _mask_from_ends(starts | is_eos, inclusive=False),
        "the stop sequence's first token alone ends the turn; the whole sequence must match (check every token "
        "of the window).": _mask_from_ends(first_only | is_eos),
        "EOS is ignored: the turn also ends at the first end-of-text token.": _mask_from_ends(full),
        "the turn ends at the *last* stop; it ends at the first.": last,
        "the token that ends the turn is excluded: keep positions up to and including it.":
            _mask_from_ends(full | is_eos, inclusive=False),
        "the stop sequence is ignored: only EOS ends the turn here.": _mask_from_ends(is_eos),
        "the mask is inverted: True means inside the turn.": ~expected,
        "nothing is cut: positions after the end of the turn must be False.": torch.ones_like(expected),
    }
    if not torch.equal(got, expected):
        for message, wrong in mistakes.items():
            if torch.equal(got, wrong):
                raise CheckError(f"turn_mask: {message} (seed {seed})")
        row = int(torch.nonzero((got != expected).any(-1))[0])
        raise CheckError(f"turn_mask is wrong in row {row} (seed {seed}): tokens {tokens[row].tolist()}, stop "
                         f"{stop}, eos {eos}; expected {expected[row].int().tolist()}, got {got[row].int().tolist()}.")
    # Edge cases: a stop longer than the row, a one-token stop, a turn ending at the very last position.
    short = torch.tensor([[5, 6]])
    out = run_student(fn, short.clone(), [1, 2, 3], eos)
    if not torch.equal(torch.as_tensor(out).bool(), torch.ones(1, 2, dtype=torch.bool)):
        raise CheckError("turn_mask with a stop sequence longer than the row should keep every token "
                         f"(nothing can match); got {torch.as_tensor(out).int().tolist()}.")
    one = torch.tensor([[4, 7, 4, 7], [5, 5, 5, 7]])
    out = torch.as_tensor(run_student(fn, one.clone(), [7], eos)).bool()
    if out.tolist() != [[True, True, False, False], [True, True, True, True]]:
        raise CheckError(f"turn_mask with the one-token stop [7] on {one.tolist()} should give "
                         f"[[1, 1, 0, 0], [1, 1, 1, 1]], got {out.int().tolist()}.")
    return "stops, partial stops, EOS, first-match and edge cases right"


# ------------------------------------------------------------------------------------ LoRA parameters


def _tiny_models():
    """Randomly initialised tiny models of the families the presets use (GPT-2's Conv1D, Llama's GQA, GPT-Neo)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return [
        ("gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0)),
         [["c_attn"], ["c_attn", "c_proj"], ["c_fc"]]),
        ("llama", LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=32, bos_token_id=0, eos_token_id=0)),
         [["q_proj", "k_proj", "v_proj", "o_proj"], ["k_proj"], ["gate_proj", "down_proj"]]),
        ("gpt_neo", GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=24, num_layers=2, num_heads=2,
                                                   attention_types=[[["global", "local"], 1]],
                                                   max_position_embeddings=32, window_size=8, bos_token_id=0,
                                                   eos_token_id=0)),
         [["q_proj", "v_proj"], ["out_proj"]]),
    ]


def _peft_count(model, targets, r) -> int:
    import copy

    from peft import LoraConfig, get_peft_model

    m = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=r, target_modules=list(targets),
                                                        fan_in_fan_out=model.config.model_type == "gpt2"))
    return m.get_nb_trainable_parameters()[0]


def _layers(model, targets):
    out = []
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(socratic._linear_shape(module))
    return out


@check
def check_lora_parameter_count(fn) -> str:
    """``fn(model, target_modules, r) -> int``: the parameters LoRA of rank ``r`` adds to the target modules."""
    seed = fresh_seed()
    r_choices = [1, 4, 8, 16]
    import random

    rng = random.Random(seed)
    for family, model, target_sets in quietly(_tiny_models):
        for targets in target_sets:
            r = rng.choice(r_choices)
            got = run_student(fn, model, list(targets), r, name="lora_parameter_count")
            if isinstance(got, torch.Tensor):
                got = got.item()
            if not isinstance(got, int) and not (isinstance(got, float) and got.is_integer()):
                raise CheckError(f"lora_parameter_count should return an int, got {type(got).__name__} {got!r}.")
            got = int(got)
            expected = _peft_count(model, targets, r)
            if got == expected:
                continue
            layers = _layers(model, targets)
            all_linear = _layers(model, [n.split(".")[-1] for n, m in model.named_modules()
                                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"])
            hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
            mistakes = {
                "this is the size of the full matrices (d_in * d_out); LoRA trains A (r x d_in) and B (d_out x r).":
                    sum(i * o for i, o in layers),
                "only A is counted (r * d_in); B (d_out x r) trains too.": sum(r * i for i, o in layers),
                "only B is counted (r * d_out); A (r x d_in) trains too.": sum(r * o for i, o in layers),
                "r is missing: A and B have r * d_in and d_out * r entries.": sum(i + o for i, o in layers),
                "every linear layer is counted; only the target modules get adapters.":
                    sum(r * (i + o) for i, o in all_linear),
                "every adapted matrix is taken as hidden x hidden; read d_in and d_out from each module (Llama's "
                "k/v projections are smaller with grouped-query attention, GPT-2's c_attn is 3x wider).":
                    len(layers) * r * 2 * hidden,
                "r * r is added per matrix (a square core); LoRA has none: just A and B.":
                    sum(r * (i + o) + r * r for i, o in layers),
            }
            for message, wrong in mistakes.items():
                if got == wrong and wrong != expected:
                    raise CheckError(f"lora_parameter_count on a tiny {family} with targets {targets}, r={r}: "
                                     f"{message} (got {got:,}, expected {expected:,})")
            raise CheckError(f"lora_parameter_count on a tiny {family} with targets {targets}, r={r} gives {got:,}; "
                             f"peft trains {expected:,} parameters. For each target module: r * (d_in + d_out); "
                             "GPT-2's Conv1D stores its weight as (d_in, d_out), nn.Linear as (d_out, d_in).")
    # A target that matches nothing adds nothing.
    model = quietly(_tiny_models)[0][1]
    got = run_student(fn, model, ["no_such_module"], 8, name="lora_parameter_count")
    if int(got) != 0:
        raise CheckError(f"a target that matches no module should add 0 parameters, got {got}.")
    return "matches peft on tiny GPT-2, Llama (grouped-query) and GPT-Neo models"
