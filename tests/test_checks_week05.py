"""Both directions for week 5's checks: the reference passes; a stub and typical mistakes fail, naming the mistake."""


import torch

from helpers import judges, socratic
from check_harness import both_directions, run_quiet
from helpers.checks import week05


# --- sentiment_to_score
def ss_argmax(logits, threshold):
    return logits.argmax(-1) - 1


def ss_raw_logits(logits, threshold):
    m = logits[:, 2] - logits[:, 0]
    return (m > threshold).long() - (m < -threshold).long()


def ss_swapped(logits, threshold):
    return -judges.sentiment_to_score(logits, threshold)


def ss_no_negative(logits, threshold):
    p = logits.softmax(-1)
    return (p[:, 2] - p[:, 0] > threshold).long()


def ss_margin(logits, threshold):
    p = logits.softmax(-1)
    return p[:, 2] - p[:, 0]


def ss_naive_exp(logits, threshold):
    e = logits.exp()
    p = e / e.sum(-1, keepdim=True)
    m = p[:, 2] - p[:, 0]
    return (m > threshold).long() - (m < -threshold).long()


# --- turn_mask
def tm_exclusive(tokens, stop, eos):
    ends = tokens == eos
    k = len(stop)
    ends[:, k - 1:] |= (tokens.unfold(1, k, 1) == torch.tensor(stop)).all(-1)
    return ends.long().cumsum(-1) == 0


def tm_first_token(tokens, stop, eos):
    return socratic.turn_mask(tokens, stop[:1], eos)


def tm_no_eos(tokens, stop, eos):
    return socratic.turn_mask(tokens, stop, -12345)


def tm_no_cut(tokens, stop, eos):
    return torch.ones_like(tokens, dtype=torch.bool)


def tm_loop_last(tokens, stop, eos):
    out = torch.zeros_like(tokens, dtype=torch.bool)
    k = len(stop)
    for i, row in enumerate(tokens.tolist()):
        end = len(row) - 1
        for t in range(len(row)):
            if row[t] == eos or (t >= k - 1 and row[t - k + 1:t + 1] == list(stop)):
                end = t  # keeps overwriting: the last end, not the first
        out[i, :end + 1] = True
    return out


# --- lora_parameter_count
def lc_full(model, targets, r):
    return sum(i * o for i, o in week05._layers(model, targets))


def lc_only_a(model, targets, r):
    return sum(r * i for i, o in week05._layers(model, targets))


def lc_hidden(model, targets, r):
    h = getattr(model.config, "hidden_size", None) or model.config.n_embd
    return len(week05._layers(model, targets)) * r * 2 * h


def lc_linear_only(model, targets, r):
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
            total += r * (m.in_features + m.out_features)
    return total


CASES = [
    (week05.check_sentiment_to_score, judges.sentiment_to_score, [
        (ss_argmax, "dead zone"), (ss_raw_logits, "raw logits"), (ss_swapped, "sign is flipped"),
        (ss_no_negative, "negative side"), (ss_margin, "{-1, 0, +1}"), (ss_naive_exp, "nan"),
    ]),
    (week05.check_turn_mask, socratic.turn_mask, [
        (tm_exclusive, "excluded"), (tm_first_token, "first token alone"), (tm_no_eos, "EOS is ignored"),
        (tm_no_cut, "nothing is cut"), (tm_loop_last, "last"),
        (lambda t, s, e: ~socratic.turn_mask(t, s, e), "inverted"),
    ]),
    (week05.check_lora_parameter_count, socratic.lora_parameter_count, [
        (lc_full, "full matrices"), (lc_only_a, "only A"), (lc_hidden, "hidden x hidden"),
        (lc_linear_only, "Conv1D"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_checks_pass_repeatedly_with_fresh_seeds():
    for _ in range(3):
        run_quiet(week05.check_turn_mask, socratic.turn_mask)
        run_quiet(week05.check_sentiment_to_score, judges.sentiment_to_score)
