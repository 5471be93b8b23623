"""The running batch of continuous batching: requests join it between decode steps and leave it
when they finish (iteration-level scheduling, as in Orca and vLLM), each row with its own adapter.

The rows share one left-padded KV cache (a transformers DynamicCache; per layer, keys and values of
rows x heads x length x dim) with an attention mask that marks each row's padding, so every row's
tokens stay right-aligned. `join` prefills the newcomers' prompts as a batch of their own, samples
their first tokens and writes their cache rows after the running ones (left-padded to the running
length, or the running rows moved right when the newcomers are longer). `step` decodes one token for
every row, with `bank.rows(...)` rebuilt from the rows present and each row's own position ids (on an
M-RoPE model, image rows' positions from mrope.py: three per token at the prefill, then offset). A row
that finishes (or is dropped with `leave`) is overwritten by the last row, and the columns on the left
that no row attends to any more are cut once they are a quarter of the cache. The layers keep spare
rows and columns (RoomyLayer), so that a step, a join or a leave copies only what changes, not the
whole cache.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.serve.bank import AdapterBank
from lorakit.serve.generate import GenerationRequest, GenerationResult, Row, check_request, eos_ids, next_tokens
from lorakit.serve.images import prefill_inputs
from lorakit.serve.mrope import prefill_positions

Event = tuple[Row, str]  # a row and the text its newest token made final (maybe empty)
ROOM = 64  # spare columns after a cache layer's tokens: a copy of the cache every ROOM steps, not every step


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views (rows x heads x length x dim) into buffers with
    spare rows and ROOM spare columns. A decode step writes its token into the room, newcomers are
    written into spare rows, and leaving rows are overwritten by the last ones: the whole layer is
    copied only when the room runs out (DynamicLayer concatenates, copying it every step)."""

    buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def put(self, keys: torch.Tensor, values: torch.Tensor, rows: int = 0) -> None:
        """Hold these keys and values in new buffers, with room for `rows` rows and ROOM more columns."""
        n, length = keys.shape[0], keys.shape[2]
        self.buffers = tuple(t.new_empty(max(n, rows), t.shape[1], length + ROOM, t.shape[3]) for t in (keys, values))
        for buffer, t in zip(self.buffers, (keys, values)):
            buffer[:n, :, :length] = t
        self._view(n, length)

    def _view(self, rows: int, length: int) -> None:
        self.keys, self.values = (buffer[:rows, :, :length] for buffer in self.buffers)

    def held(self) -> bool:
        """Whether keys and values are still the views of the buffers (not set from outside)."""
        return (self.buffers is not None and self.keys.data_ptr() == self.buffers[0].data_ptr()
                and self.keys.stride() == self.buffers[0].stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.put(key_states, value_states)
            return self.keys, self.values
        rows, length, new = self.keys.shape[0], self.keys.shape[2], key_states.shape[2]
        if not self.held() or length + new > self.buffers[0].shape[2]:
            self.put(self.keys, self.values, self.buffers[0].shape[0] if self.buffers else 0)
        for buffer, t in zip(self.buffers, (key_states, value_states)):
            buffer[:rows, :, length:length + new] = t
        self._view(rows, length + new)
        return self.keys, self.values

    def append(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Newcomers' keys and values as the last rows, right-aligned (left-padded with zeros); a copy of
        the whole layer only when there is no room for them (`rows`: how many to make room for then)."""
        n, length, m = self.keys.shape[0], max(self.keys.shape[2], keys.shape[2]), keys.shape[0]
        if not self.held() or n + m > self.buffers[0].shape[0] or length > self.keys.shape[2]:  # no room, or the
            # newcomers are longer: the running rows move right, to stay right-aligned
            self.put(*(_left_pad(t, length, 2) for t in (self.keys, self.values)), max(rows, n + m))
        for buffer, t in zip(self.buffers, (keys, values)):
            buffer[n:n + m, :, :length - t.shape[2]] = 0
            buffer[n:n + m, :, length - t.shape[2]:length] = t
        self._view(n + m, length)

    def move(self, sources: list[int], targets: list[int], rows: int, start: int) -> None:
        """Rows `sources` copied over rows `targets`; then only the first `rows` rows are kept, from
        column `start` on (a copy of the layer when start > 0)."""
        length = self.keys.shape[2]
        if not self.held():
            self.put(self.keys, self.values)
        if sources:
            for buffer in self.buffers:
                buffer[targets, :, :length] = buffer[sources, :, :length]
        self._view(rows, length)
        if start:
            self.put(self.keys[:, :, start:], self.values[:, :, start:], self.buffers[0].shape[0])


def new_cache() -> DynamicCache:
    """An empty cache whose layers (made as the model first writes to them) are RoomyLayers. Every layer
    keeps its whole history (no sliding-window layers), so rows of any length line up."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


class RunningBatch:
    """The rows being generated and their KV cache. Not thread-safe: one thread drives it."""

    def __init__(self, bank: AdapterBank, tokenizer, max_rows: int = 0):
        self.bank, self.tokenizer = bank, tokenizer
        self.max_rows = max_rows  # rows the cache makes room for when it grows (the server's --max_batch_size)
        self.eos_ids = eos_ids(bank.model, tokenizer)
        self.pad = next(t for t in (tokenizer.pad_token_id, *sorted(self.eos_ids), 0) if t is not None)
        self.device = next(bank.model.parameters()).device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # rows x cache length: 1 on a row's tokens, 0 on its padding

    @torch.no_grad()
    def join(self, requests: list[GenerationRequest]) -> list[Event]:
        """Prefill the requests together, sample each one's first token, and add the rows that did not
        finish with it to the batch. One event per request, in order; the requests are not checked
        here (generate.check_request)."""
        rows = [Row(i, r, self.tokenizer, self.eos_ids) for i, r in enumerate(requests)]
        if not rows:
            return []
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        cache = new_cache()
        extra = prefill_inputs(self.bank, requests)  # the images' features, each with its request's adapter
        positions, offsets = prefill_positions(self.bank.model, ids, mask, requests)  # M-RoPE's for images
        for row, offset in zip(rows, offsets):
            row.position_offset = offset
        events = self._forward(rows, ids, mask, positions, cache, extra)
        self._add(rows, cache, mask)
        self.leave([row for row in rows if row.finish_reason is not None])
        return events

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Decode one token for every row; the rows that finish with it leave the batch."""
        if not self.rows:
            return []
        ids = torch.tensor([row.token_ids[-1] for row in self.rows], device=self.device)[:, None]
        offsets = torch.tensor([[row.position_offset] for row in self.rows], device=self.device)
        positions = self.mask.sum(-1, keepdim=True) + offsets  # each row's tokens so far (+ its M-RoPE offset)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        events = self._forward(self.rows, ids, self.mask, positions, self.cache)
        self.leave([row for row in self.rows if row.finish_reason is not None])
        return events

    def leave(self, rows: list[Row]) -> None:
        """Take rows out of the batch and the cache (finished, or their client went away)."""
        gone = set(map(id, rows))
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        rows = len(keep)
        targets = [i for i in range(rows) if id(self.rows[i]) in gone]  # the holes, filled by the last rows
        sources = [i for i in keep if i >= rows]
        for source, target in zip(sources, targets):
            self.rows[target] = self.rows[source]
        self.rows = self.rows[:rows]
        self.mask[targets] = self.mask[sources]
        self.mask = self.mask[:rows]
        start = int(self.mask.any(0).int().argmax())  # the first column some row attends to
        start = start if start >= self.mask.shape[1] // 4 else 0  # cut (a copy) once a quarter is unused
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.move(sources, targets, rows, start)

    def _forward(self, rows: list[Row], ids, mask, positions, cache, extra: dict | None = None) -> list[Event]:
        """One forward of `rows` (their adapters per row; `extra`: more model inputs, for a prefill), the next
        token sampled and pushed for each."""
        with self.bank.rows([row.request.adapter for row in rows]):
            logits = self.bank.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     past_key_values=cache, use_cache=True, logits_to_keep=1,
                                     **(extra or {})).logits[:, -1]
        return [(row, row.push(token)) for row, token in zip(rows, next_tokens(logits, rows))]

    def _add(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Newcomers' rows into the batch, after the running ones; the shorter side is left-padded."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.append(theirs.keys, theirs.values, self.max_rows)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.rows = self.rows + rows


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros before it along `dim`, up to `length`."""
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim) if shape[dim] else t


@torch.no_grad()
def generate_batch(bank: AdapterBank, tokenizer, requests: list[GenerationRequest],
                   on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
    """Generate for all requests together (they join one batch at once; each leaves when it ends);
    results in request order. on_text(i, delta) is called after each token of request i with the text
    it made final (maybe empty): the deltas of a request concatenate to its result.text."""
    for i, request in enumerate(requests):
        try:
            check_request(request, bank.model)
        except ValueError as err:
            raise ValueError(f"request {i}: {err}") from None
    batch = RunningBatch(bank, tokenizer)
    events = batch.join(requests)
    rows = [row for row, _ in events]
    while events:
        if on_text is not None:
            for row, delta in events:
                on_text(row.index, delta)
        events = batch.step()
    return [row.result() for row in rows]
