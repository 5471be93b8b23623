"""The per-token pieces of generation: requests and results, each row's sampling, stop strings and
detokenising, and the checks a request must pass. lorakit.serve.scheduler runs them in a batch.

Each row samples from its own torch.Generator, so a seeded request gives the same tokens whatever
else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.io.pretrained import position_limit

SEEDS = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes (negative seeds wrap around)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling is reproducible per request given the seed, whatever else is in the batch
    stop: list[str] = field(default_factory=list)
    media: dict | None = None  # extra model inputs for this request's prefill: an image's pixel_values, ... (images.py)


@dataclass
class GenerationResult:
    token_ids: list[int]  # every token generated, including the EOS or the one that completed a stop string
    text: str  # the decoded tokens (special tokens skipped), cut before the stop string if one matched
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int


class Row:
    """One request's decoding state: its tokens, its random stream, and the text released so far."""

    def __init__(self, index: int, request: GenerationRequest, tokenizer, eos_ids: set[int]):
        self.index, self.request, self.tokenizer, self.eos_ids = index, request, tokenizer, eos_ids
        self.generator = torch.Generator()
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)
        self.token_ids: list[int] = []
        self.sent = ""  # text already released; stop strings and partial characters are held back
        self.finish_reason: str | None = None
        self.position_offset = 0  # added to its token count for the next token's position (M-RoPE; mrope.py)

    def push(self, token: int) -> str:
        """Take the next token; return the text it makes final (maybe empty)."""
        self.token_ids.append(token)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stops = [i for i in (text.find(s, len(self.sent)) for s in self.request.stop if s) if i >= 0]
        if stops:
            self.finish_reason, end = "stop", min(stops)
        elif token in self.eos_ids:
            self.finish_reason, end = "stop", len(text)
        elif len(self.token_ids) >= self.request.max_new_tokens:
            self.finish_reason, end = "length", len(text)
        else:
            end = _releasable(text, len(self.sent), self.request.stop)
        delta = text[len(self.sent):end]
        self.sent += delta
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(self.token_ids, self.sent, self.finish_reason, len(self.request.prompt_ids))


def _releasable(text: str, sent: int, stops: list[str]) -> int:
    """How much of `text` is final: not a partial UTF-8 character (decoded as U+FFFD) at the end,
    and not an ending that could still grow into a stop string. Only the text after the first
    `sent` characters (released already) is looked at, so the work per token stays small."""
    end = len(text.rstrip("\ufffd"))
    starts = (next((i for i in range(max(sent, end - len(s) + 1), end) if s.startswith(text[i:end])), end)
              for s in stops)
    return min(starts, default=end)


def check_request(r: GenerationRequest, model) -> None:
    """ValueError naming the field if `model` cannot generate request `r`."""
    vocab_size = model.get_input_embeddings().num_embeddings
    limit = position_limit(model.config)  # max_position_embeddings, GPT-2's n_positions, ...
    if not r.prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one token")
    if not all(0 <= t < vocab_size for t in r.prompt_ids):
        raise ValueError(f"prompt_ids must be token ids in [0, {vocab_size})")
    if r.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    if r.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {r.top_p}")
    if r.seed is not None and not SEEDS[0] <= r.seed <= SEEDS[1]:
        raise ValueError(f"seed must be an integer from {SEEDS[0]} to {SEEDS[1]} (64 bits), got {r.seed}")
    if limit and len(r.prompt_ids) + r.max_new_tokens > limit[0]:
        raise ValueError(f"{len(r.prompt_ids)} prompt tokens + max_new_tokens={r.max_new_tokens} "
                         f"exceed the model's {limit[0]} positions ({limit[1]})")


def eos_ids(model, tokenizer) -> set[int]:
    """EOS as the tokenizer and the model's generation config (as HF generate) define it."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
    return ids - {None}


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Greedy for temperature 0; else temperature + top-p (nucleus) sampling, each row drawing
    from its own generator (one uniform number per step, inverse-CDF over the sorted vocabulary)."""
    tokens = logits.argmax(-1)
    sampled = [i for i, row in enumerate(rows) if row.request.temperature > 0]
    if sampled:
        temperature = torch.tensor([rows[i].request.temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([rows[i].request.top_p for i in sampled], device=logits.device)
        chosen = logits[sampled].float()
        chosen = chosen - chosen.amax(-1, keepdim=True)  # <= 0, so a tiny temperature gives -inf, never NaN
        probs = torch.softmax(chosen / temperature.clamp(min=torch.finfo(torch.float32).tiny)[:, None], dim=-1)
        probs, order = probs.sort(dim=-1, descending=True)
        probs[probs.cumsum(-1) - probs >= top_p[:, None]] = 0  # the smallest top set holding top_p of the mass
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(logits.device)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
        tokens[sampled] = order.gather(-1, pick).squeeze(-1)
    return tokens.tolist()
