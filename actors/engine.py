"""The LLM stage's engine: continuous batching over a transformers model.

Requests are added at any time (``add``); every ``step`` the scheduler retires the sequences that
finished, admits waiting ones under the engine's bounds (their prompts are prefilled, long ones in
chunks, and they join the running batch) and decodes one token for every running sequence. Each
step returns, per request that moved, its new text and, once it is done, its ``LLMResult``.

The running batch shares one left-padded KV cache (every row's next token sits in the last
column, each row keeps its own position ids and attention mask). A sequence that joins is padded
to the batch's width and concatenated; rows that finish are dropped and fully padded leading
columns trimmed. This works with any transformers model that takes an attention mask and
position ids with a ``DynamicCache`` (LLaMA, Qwen2, OPT, Persimmon), with encoder-decoder
models (Flan-T5), whose encoder states are padded alongside, and with decoders that read media
through cross-attention layers (IDEFICS): each row's media states are padded to the batch's most
items alongside, and each row's next position reads the items its last prompt position read.

The interface (``add``, ``abort``, ``step``, ``has_work``) is the one vLLM's ``LLMEngine`` has;
docs/serving.md describes it for other backends.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from omnistage.actors.errors import InvalidInputError, OverloadedError
from omnistage.actors.payloads import LLMRequest, LLMResult, Modality, SignalGroup

if TYPE_CHECKING:
    from collections.abc import Callable

    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import EngineConfig

# Tokens of context kept before the undecoded ones when the detokenisation window moves on.
_DETOKENIZE_CONTEXT = 4


def signal_states(hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """The states behind signal tokens (GILL, NExT-GPT): the last layer's hidden state at the
    position that predicted each token plus that token's own input embedding."""
    return hidden + token_embeds


def forward_to_head(model, **inputs) -> tuple[object, torch.Tensor]:
    """``model(**inputs)`` and its LM head's input: the last layer's (normed) hidden states at the
    positions whose logits are kept, caught by a hook for this call only, so no forward returns
    the hidden states of every layer."""
    caught = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    return out, caught[-1]


class TextStream:
    """One sequence's text, detokenised incrementally (as in TGI and vLLM) and cut at its first
    stop string: only the window of ``decode_ids`` (text tokens less special ones) from
    ``prefix_offset`` is decoded each time, never the whole text. The tokens before
    ``read_offset`` in the window give the decoder context (a SentencePiece word-start space, a
    UTF-8 character split across byte tokens), and ``window_text`` is what they decoded to.

    ``visible(text, done)`` maps the text so far to what the client is shown of it, when that is
    not the text itself (a grounding model's answer without its location tokens); it must grow by
    appending, so that the deltas add up to ``visible`` of the whole text."""

    def __init__(self, tokenizer, stop: list[str], visible: Callable[[str, bool], str] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.visible = visible
        self.text = ""
        self.decode_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.window_text = ""
        self.emitted = 0  # characters of ``text`` already returned as deltas

    def update(self, final: bool = False) -> bool:
        """Extend ``text`` by the newly decodable characters; True when that reached a stop string
        (``text`` then ends before it)."""
        decode_ids = self.decode_ids
        window = self._text_of(decode_ids[self.prefix_offset :])
        # A window ending in U+FFFD is an incomplete multi-byte character: wait for its last byte.
        if len(window) > len(self.window_text) and (final or not window.endswith("\ufffd")):
            start = len(self.text)
            self.text += window[len(self.window_text) :]
            self.read_offset, self.window_text = len(decode_ids), window
            if self.read_offset - self.prefix_offset > 2 * _DETOKENIZE_CONTEXT:
                self.prefix_offset = self.read_offset - _DETOKENIZE_CONTEXT
                self.window_text = self._text_of(decode_ids[self.prefix_offset : self.read_offset])
            if self.stop:
                longest = max(len(s) for s in self.stop)
                hits = [i for s in self.stop if s and (i := self.text.find(s, max(0, start - longest + 1))) >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    return True
        return False

    def flush(self) -> None:
        """Decode what is left once the sequence is done (an incomplete character included)."""
        if self.read_offset < len(self.decode_ids):
            self.update(final=True)

    def delta(self, done: bool) -> str:
        """The text not returned yet, holding back a possible stop-string prefix until it is clear."""
        text = self.text if self.visible is None else self.visible(self.text, done)
        end = len(text)
        if not done and self.stop:
            end = max(self.emitted, end - max(len(s) for s in self.stop) + 1)
        delta, self.emitted = text[self.emitted : end], max(self.emitted, end)
        return delta

    def _text_of(self, ids: list[int]) -> str:
        # Special tokens are left out of ``decode_ids`` already: asking the tokenizer to skip them
        # makes slow tokenizers rebuild their special-token list on every call.
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class StepOutput:
    """What one step did for one request: its new text (``""`` when none is ready) and, once the
    request is done, its result. ``ttft_s`` and ``tpot_s`` (time to first token, time per output
    token after it) come with the result."""

    request_id: str
    delta: str
    result: LLMResult | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass
class _Sequence:
    """One request's decoding state, from admission to its result."""

    request_id: str
    request: LLMRequest
    prompt_ids: list[int]
    prompt_len: int  # with each placeholder expanded to its medium's tokens
    generator: torch.Generator | None  # None for greedy requests
    pending: list[Modality]  # forced modalities whose group has not been emitted yet
    arrival: float
    embeds: torch.Tensor | None = None  # (prompt_len, d) once admitted
    prefilled: int = 0
    cache: object | None = None  # own KV cache while a long prompt is prefilled in chunks
    mask: torch.Tensor | None = None
    # Cross-attention media (LLM.cross_attention_media): (n_items, tokens, width), (prompt_len, n_items)
    cross_states: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None
    token_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    forced: deque[int] = field(default_factory=deque)
    group: list[np.ndarray] = field(default_factory=list)
    signals: list[SignalGroup] = field(default_factory=list)
    stream: TextStream | None = None
    text_done: bool = False
    finish_reason: str = "length"
    done: bool = False
    aborted: bool = False
    first_token: float | None = None

    def remaining(self, group_sizes: dict[str, int]) -> int:
        """Tokens this sequence may still add to the cache: the text budget plus the signal tokens
        still to come (the rest of a group being emitted, and every pending group)."""
        text = 0 if self.text_done else self.request.max_tokens - len(self.text_ids)
        return text + len(self.forced) + sum(group_sizes[m] for m in self.pending)


class _Batch:
    """Rows decoded together: a left-padded KV cache, each row's mask, next position and next input.

    Dimensions:
        mask: (rows, width) 1 where a row has a token in that cache column
        positions: (rows,) position id of each row's next token
        next_input: (rows, 1, d) next input embeddings; for encoder-decoder models (rows, 1)
            decoder token ids
        encoder_states, encoder_mask: (rows, source_len, d), (rows, source_len); encoder-decoder only
        cross_states, cross_last: (rows, n_items, tokens, width) media padded with zeros to the most
            items, (rows, n_items) 0/1 which of them each row's next position reads; cross-attention only
    """

    def __init__(self, seqs, cache, mask, positions, next_input, encoder_states=None, encoder_mask=None, cross=None):
        self.seqs: list[_Sequence] = seqs
        self.cache = cache
        self.mask = mask
        self.positions = positions
        self.next_input = next_input
        self.encoder_states = encoder_states
        self.encoder_mask = encoder_mask
        self.cross_states, self.cross_last = cross if cross is not None else (None, None)

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class EngineBase:
    """What both LLM engines (this one and ``VLLMEngine``) share: running a list of requests to
    completion through ``_enqueue``, ``step`` and ``abort``."""

    def generate(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Run ``requests`` to completion (batch jobs and in-process use): the engine keeps as many
        of them decoding as its bounds allow, admitting the next as one finishes. A request the
        model cannot take raises before any of them runs."""
        ids = [f"generate-{id(self)}-{i}" for i in range(len(requests))]
        results: dict[str, LLMResult] = {}
        try:
            # A caller that waits for its whole list is not an online client to push back on:
            # the waiting bound does not apply.
            for rid, request in zip(ids, requests):
                self._enqueue(rid, request)
            while len(results) < len(ids):
                for out in self.step():
                    if out.result is not None:
                        results[out.request_id] = out.result
        finally:
            for rid in ids:
                self.abort(rid)
        return [results[rid] for rid in ids]


class Engine(EngineBase):
    """Continuous batching for an ``LLM`` stage; see the module docstring.

    Bounds (``EngineConfig``): at most ``max_running_seqs`` sequences decode at once; a sequence is
    admitted only while the padded KV cache, grown by every row's remaining budget, stays within
    ``max_kv_tokens`` (so admission waits instead of running out of memory); at most
    ``max_prefill_tokens`` prompt tokens are prefilled per step (longer prompts in chunks), so a long
    prompt delays the running sequences' next token by at most one chunk; at most ``max_waiting``
    requests wait, beyond which ``add`` raises ``OverloadedError``.

    Not thread-safe: one thread calls ``step``; ``add`` and ``abort`` may come from another thread
    only between steps (the Serve adapter runs all three on one worker thread).
    """

    def __init__(self, llm: LLM, config: EngineConfig):
        self.llm = llm
        self.config = config
        self.model = llm.model
        self.device = llm.device
        self.waiting: deque[_Sequence] = deque()
        self.chunking: _Sequence | None = None  # a long prompt being prefilled chunk by chunk
        self.batch: _Batch | None = None
        self.sequences: dict[str, _Sequence] = {}
        self.group_sizes = {m: len(ids) for m, ids in llm.groups.items()}
        self.special_ids = frozenset(llm.tokenizer.all_special_ids)
        self.generated_tokens = 0
        self._check_cache_layout()

    def _check_cache_layout(self) -> None:
        from transformers import DynamicCache

        config = self.model.config.get_text_config(decoder=True)
        kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
        if kinds - {DynamicLayer.__name__}:
            raise ValueError(
                f"the engine batches full-attention KV caches (DynamicLayer); {type(self.model).__name__} "
                f"uses {sorted(kinds)} (sliding-window or linear attention), which it cannot merge"
            )

    # Requests in and out

    def add(self, request_id: str, request: LLMRequest) -> None:
        """Queue ``request``; raises ``InvalidInputError`` for one the model cannot take and
        ``OverloadedError`` when the waiting queue is full."""
        if len(self.waiting) >= self.config.max_waiting:
            raise OverloadedError(f"the LLM's waiting queue is full ({self.config.max_waiting} requests); retry later")
        self._enqueue(request_id, request)

    def _enqueue(self, request_id: str, request: LLMRequest) -> None:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        request = self.llm.with_defaults(request)
        prompt_ids, prompt_len = self.llm.prepare(request)
        worst = prompt_len + request.max_tokens + sum(self.group_sizes[m] for m in set(request.force_modalities))
        if worst > self.config.max_kv_tokens:
            raise InvalidInputError(
                f"expected the prompt ({prompt_len} tokens with media) plus max_tokens ({request.max_tokens}) and "
                f"forced signal tokens to fit this server's KV cache of {self.config.max_kv_tokens} tokens, got {worst}"
            )
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        seq = _Sequence(
            request_id=request_id,
            request=request,
            prompt_ids=prompt_ids,
            prompt_len=prompt_len,
            generator=generator,
            pending=list(dict.fromkeys(request.force_modalities)),
            arrival=time.perf_counter(),
            stream=TextStream(self.llm.tokenizer, request.stop, self.llm.visible_text),
        )
        self.sequences[request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Forget ``request_id``; a running sequence frees its row at the next step."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        seq.aborted = True
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq is self.chunking:
            self.chunking = None

    def abort_all(self) -> None:
        """Drop every request and the running batch (after a failed step, whose cache is unknown)."""
        for seq in self.sequences.values():
            seq.aborted = True
        self.sequences.clear()
        self.waiting.clear()
        self.chunking = self.batch = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.chunking or self.batch)

    @property
    def num_running(self) -> int:
        return (len(self.batch.seqs) if self.batch else 0) + (1 if self.chunking else 0)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_tokens(self) -> int:
        """Cache slots in use: the running batch's rows x columns, plus a chunked prompt's cache."""
        used = self.batch.mask.numel() if self.batch else 0
        return used + (self.chunking.mask.numel() if self.chunking is not None and self.chunking.mask is not None else 0)

    # One step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        # 1. Schedule: which waiting prompts are prefilled this step
        whole, chunk = self._schedule()
        # 2. Decode one token for every running sequence
        if self.batch is not None:
            outputs += self._decode()
        # 3. Prefill: whole prompts together, a long one by its next chunk; done ones join the batch
        joined = []
        if chunk is not None:
            joined += self._prefill([chunk[0]], [chunk[1]])
        if whole:
            joined += self._prefill(whole, [s.prompt_len for s in whole])
        for batch in joined:
            outputs += self._postprocess(batch)
            self.batch = batch if self.batch is None else self._merge(self.batch, batch)
        # 4. Retire finished (and aborted) sequences at once
        self._retire()
        return outputs

    def _schedule(self) -> tuple[list[_Sequence], tuple[_Sequence, int] | None]:
        budget = self.config.max_prefill_tokens
        chunk = None
        if self.chunking is not None:
            n = min(self.chunking.prompt_len - self.chunking.prefilled, budget)
            chunk, budget = (self.chunking, n), budget - n
        whole: list[_Sequence] = []
        while self.waiting and budget > 0 and self.num_running + len(whole) < self.config.max_running_seqs:
            seq = self.waiting[0]
            if not self._kv_fits(whole + [seq]):
                break  # first come, first served: later requests wait behind this one
            if seq.prompt_len <= budget:
                whole.append(seq)
                budget -= seq.prompt_len
            elif self.chunking is None and not self.llm.is_encoder_decoder:
                self.chunking, chunk, budget = seq, (seq, budget), 0
            elif not whole and chunk is None:
                whole.append(seq)  # an encoder reads its prompt whole: over budget, but alone
                budget = 0
            else:
                break
            self.waiting.popleft()
            seq.embeds = self.llm.embed_prompt(seq.request, seq.prompt_ids)
            if self.llm.cross_attention is not None:
                seq.cross_states, seq.cross_mask = self.llm.cross_attention_media(seq.request, seq.prompt_ids)
        return whole, chunk

    def _kv_fits(self, new: list[_Sequence]) -> bool:
        """Whether the padded cache stays within ``max_kv_tokens`` until every row is done, with
        ``new`` admitted: rows x (widest prompt or batch width + largest remaining budget)."""
        seqs = [*(self.batch.seqs if self.batch else []), *([self.chunking] if self.chunking else []), *new]
        width = max([self.batch.width if self.batch else 0, *(s.prompt_len for s in seqs if s.prefilled < s.prompt_len)])
        grow = max(s.remaining(self.group_sizes) for s in seqs)
        return len(seqs) * (width + grow) <= self.config.max_kv_tokens

    def _forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Logits and LM-head input (``forward_to_head``) at each row's last position, and the updated cache."""
        keep = {} if self.llm.is_encoder_decoder else {"logits_to_keep": 1}
        out, head_input = forward_to_head(self.model, **inputs, use_cache=True, **keep)
        return out.logits[:, -1], head_input[:, -1], out.cache

    def _prefill(self, seqs: list[_Sequence], lengths: list[int]) -> list[_Batch]:
        """Prefill the next ``lengths[i]`` prompt tokens of each sequence (left-padded together);
        returns the sequences whose prompts are complete as a batch, with their first token chosen."""
        if self.llm.is_encoder_decoder:
            return [self._prefill_seq2seq(seqs)]
        pieces = [s.embeds[s.prefilled : s.prefilled + n] for s, n in zip(seqs, lengths)]
        rows, width = len(pieces), max(lengths)
        embeds = pieces[0].new_zeros(rows, width, pieces[0].shape[-1])
        new_mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for i, piece in enumerate(pieces):
            embeds[i, width - piece.shape[0] :] = piece
            new_mask[i, width - piece.shape[0] :] = 1
        # Only a chunked prompt (always alone) continues a cache of its own.
        first = seqs[0]
        cache = first.cache if first.cache is not None else _new_cache()
        mask = new_mask if first.mask is None else torch.cat([first.mask, new_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cross, media = None, {}
        if self.llm.cross_attention is not None:
            cross, media = self._cross_prefill(seqs, lengths, width)
        logits, hidden, cache = self._forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions[:, -width:], cache=cache, **media)
        for s, n in zip(seqs, lengths):
            s.prefilled += n
        if first.prefilled < first.prompt_len:
            first.cache, first.mask = cache, mask
            return []
        if first is self.chunking:
            self.chunking, first.cache, first.mask = None, None, None
        for s in seqs:
            s.embeds = s.cross_states = s.cross_mask = None
        tokens = self._choose(seqs, logits, hidden)
        return [_Batch(seqs, cache, mask, positions[:, -1] + 1, self._next_input(tokens), cross=cross)]

    def _cross_prefill(self, seqs: list[_Sequence], lengths: list[int], width: int) -> tuple[tuple, dict]:
        """The rows' cross-attention media padded with zeros to the most items, and the model's
        inputs for this prefill: each row's mask rows for its next ``lengths[i]`` positions,
        left-padded to ``width`` with positions that read nothing. Returns ((states, each row's
        last prompt position's mask row, which every generated position reads, as transformers'
        generate repeats it), model inputs)."""
        n_items = max(s.cross_states.shape[0] for s in seqs)
        states = torch.stack([_pad_to(s.cross_states, n_items, 0, left=False) for s in seqs])
        mask = torch.zeros(len(seqs), width, n_items, dtype=torch.long, device=self.device)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            piece = s.cross_mask[s.prefilled : s.prefilled + n]
            mask[i, width - n :, : piece.shape[1]] = piece
        last = torch.stack([_pad_to(s.cross_mask[-1], n_items, 0, left=False) for s in seqs])
        return (states, last), self.llm.cross_attention.model_inputs(states, mask)

    def _prefill_seq2seq(self, seqs: list[_Sequence]) -> _Batch:
        """The encoder reads each prompt whole; the decoder's first step starts from
        ``decoder_start_token_id``."""
        from transformers import DynamicCache, EncoderDecoderCache

        rows, width = len(seqs), max(s.prompt_len for s in seqs)
        embeds = seqs[0].embeds.new_zeros(rows, width, seqs[0].embeds.shape[-1])
        # Right-padded: the encoder attends both ways, so padding sides only differ in the mask.
        encoder_mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            embeds[i, : s.prompt_len] = s.embeds
            encoder_mask[i, : s.prompt_len] = 1
            s.prefilled, s.embeds = s.prompt_len, None
        encoder_states = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=encoder_mask).last_hidden_state
        start = torch.full((rows, 1), self.model.config.decoder_start_token_id, dtype=torch.long, device=self.device)
        mask = torch.ones(rows, 1, dtype=torch.long, device=self.device)
        logits, hidden, cache = self._forward(
            encoder_outputs=(encoder_states,),
            attention_mask=encoder_mask,
            decoder_input_ids=start,
            decoder_attention_mask=mask,
            cache=EncoderDecoderCache(_new_cache(), DynamicCache()),
        )
        tokens = self._choose(seqs, logits, hidden)
        return _Batch(seqs, cache, mask, mask.new_ones(rows), self._next_input(tokens), encoder_states, encoder_mask)

    def _decode(self) -> list[StepOutput]:
        batch = self.batch
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.seqs), 1)], dim=1)
        if self.llm.is_encoder_decoder:
            inputs = {
                "encoder_outputs": (batch.encoder_states,),
                "attention_mask": batch.encoder_mask,
                "decoder_input_ids": batch.next_input,
                "decoder_attention_mask": mask,
            }
        else:
            inputs = {"inputs_embeds": batch.next_input, "attention_mask": mask, "position_ids": batch.positions[:, None]}
            if batch.cross_states is not None:
                inputs |= self.llm.cross_attention.model_inputs(batch.cross_states, batch.cross_last[:, None])
        logits, hidden, batch.cache = self._forward(**inputs, cache=batch.cache)
        batch.mask, batch.positions = mask, batch.positions + 1
        batch.next_input = self._next_input(self._choose(batch.seqs, logits, hidden))
        return self._postprocess(batch)

    # Tokens

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's next token (sampled, or forced by its signal group), recording signal states.
        Returns the (rows,) tokens to feed next; finished rows get the pad token."""
        sampled = self._sample(seqs, logits)
        tokens = [self._advance(seq, token) for seq, token in zip(seqs, sampled)]
        chosen = torch.tensor(tokens, device=self.device)
        signal_rows = [i for i, token in enumerate(tokens) if token in self.llm.signal_modality]
        if signal_rows:
            # Hidden state at the predicting position plus the signal token's own embedding (GILL,
            # NExT-GPT); one host copy for all rows that emitted a signal token this step.
            rows = torch.tensor(signal_rows, device=self.device)
            states = signal_states(hidden[rows], self.llm.embed_tokens(chosen[rows])).float().cpu().numpy()
            for state, i in zip(states, signal_rows):
                self._record_signal(seqs[i], tokens[i], state)
        return chosen

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Sampled tokens for every row in one pass: greedy rows take the argmax; the others draw by
        the exponential race (argmax of p / q, q ~ Exp(1)), which samples from p, with q drawn from
        the request's own generator so its output does not depend on its batch."""
        logits = logits.float().index_fill_(1, self.llm.banned, float("-inf"))
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if s.generator is not None and not (s.forced or s.text_done or s.aborted)]
        if rows:
            index = torch.tensor(rows, device=self.device)
            temperature = torch.tensor([seqs[i].request.temperature for i in rows], device=self.device)
            probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
            top_p = torch.tensor([seqs[i].request.top_p for i in rows], device=self.device)
            if bool((top_p < 1).any()):
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
                probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
            q = torch.empty_like(probs)
            for j, i in enumerate(rows):
                q[j].exponential_(generator=seqs[i].generator)
            tokens[index] = (probs / q).argmax(-1)
        return tokens.tolist()

    def _advance(self, seq: _Sequence, sampled: int) -> int:
        """Apply the sampled token to ``seq`` (or the forced one) and return the token fed next."""
        groups = self.llm.groups
        if seq.aborted:
            return self.llm.pad_id
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        if seq.forced:
            token = seq.forced.popleft()
        elif not seq.text_done:
            token = sampled
            if token in self.llm.eos_ids:
                seq.text_done, seq.finish_reason = True, "stop"
                token = groups[seq.pending[0]][0] if seq.pending else None
        else:
            token = groups[seq.pending[0]][0] if seq.pending else None
        if token is None:
            seq.done = True
            return self.llm.pad_id
        seq.token_ids.append(token)
        self.generated_tokens += 1
        modality = self.llm.signal_modality.get(token)
        if modality is None:
            seq.text_ids.append(token)
            if token not in self.special_ids:
                seq.stream.decode_ids.append(token)
            self._detokenize(seq)
        elif token == groups[modality][0]:
            seq.forced = deque(groups[modality][1:])
            seq.group = []
            if modality in seq.pending:
                seq.pending.remove(modality)
        seq.done = seq.text_done and not seq.forced and not seq.pending
        return token

    def _record_signal(self, seq: _Sequence, token: int, state: np.ndarray) -> None:
        modality = self.llm.signal_modality[token]
        seq.group.append(state)
        if len(seq.group) == self.group_sizes[modality]:
            seq.signals.append(SignalGroup(modality=modality, hidden=np.stack(seq.group)))

    def _detokenize(self, seq: _Sequence) -> None:
        """Extend the text by the newly decodable characters, then check stop strings and length."""
        if seq.stream.update():
            seq.text_done, seq.finish_reason = True, "stop"
        elif len(seq.text_ids) >= seq.request.max_tokens:
            seq.text_done, seq.finish_reason = True, "length"

    def _next_input(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.llm.is_encoder_decoder:
            return tokens[:, None]
        return self.llm.embed_tokens(tokens)[:, None]

    def _postprocess(self, batch: _Batch) -> list[StepOutput]:
        """Each row's new text, holding back a possible stop-string prefix until it is clear, and
        the results of rows that are done."""
        outputs = []
        now = time.perf_counter()
        for seq in batch.seqs:
            if seq.aborted:
                continue
            if seq.done:
                seq.stream.flush()
            delta = seq.stream.delta(seq.done)
            if not seq.done:
                if delta:
                    outputs.append(StepOutput(seq.request_id, delta))
                continue
            del self.sequences[seq.request_id]
            n = len(seq.token_ids)
            outputs.append(
                StepOutput(
                    seq.request_id,
                    delta,
                    LLMResult(
                        **self.llm.answer(seq.stream.text),
                        finish_reason=seq.finish_reason,
                        prompt_tokens=seq.prompt_len,
                        token_ids=seq.token_ids,
                        signals=seq.signals,
                    ),
                    ttft_s=seq.first_token - seq.arrival,
                    tpot_s=(now - seq.first_token) / (n - 1) if n > 1 else None,
                )
            )
        return outputs

    # The running batch's cache

    def _retire(self) -> None:
        batch = self.batch
        if batch is None:
            return
        keep = [i for i, seq in enumerate(batch.seqs) if not (seq.done or seq.aborted)]
        if len(keep) == len(batch.seqs):
            return
        if not keep:
            self.batch = None
            return
        index = torch.tensor(keep, device=self.device)
        for layer in _layers(batch.cache):
            _set_kv(layer, layer.keys[index], layer.values[index])
        batch.seqs = [batch.seqs[i] for i in keep]
        batch.mask, batch.positions, batch.next_input = batch.mask[index], batch.positions[index], batch.next_input[index]
        if batch.encoder_states is not None:
            batch.encoder_states, batch.encoder_mask = batch.encoder_states[index], batch.encoder_mask[index]
        if batch.cross_states is not None:
            batch.cross_states, batch.cross_last = batch.cross_states[index], batch.cross_last[index]
        # Columns that only the retired rows used are padding for everyone left.
        first = int(batch.mask.any(0).nonzero()[0])
        if first:
            batch.mask = batch.mask[:, first:]
            for layer in _self_attention_layers(batch.cache):
                _set_kv(layer, layer.keys[:, :, first:], layer.values[:, :, first:])

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """One batch of ``a``'s rows then ``b``'s, left-padded to the wider of the two."""
        width = max(a.width, b.width)
        for la, lb in zip(_self_attention_layers(a.cache), _self_attention_layers(b.cache)):
            _set_kv(
                la,
                torch.cat([_pad_to(la.keys, width, -2, left=True), _pad_to(lb.keys, width, -2, left=True)]),
                torch.cat([_pad_to(la.values, width, -2, left=True), _pad_to(lb.values, width, -2, left=True)]),
            )
        a.mask = torch.cat([_pad_to(a.mask, width, -1, left=True), _pad_to(b.mask, width, -1, left=True)])
        a.seqs = a.seqs + b.seqs
        a.positions = torch.cat([a.positions, b.positions])
        a.next_input = torch.cat([a.next_input, b.next_input])
        if a.cross_states is not None:
            # Padding items are masked out of every row that does not have them.
            n_items = max(a.cross_states.shape[1], b.cross_states.shape[1])
            a.cross_states = torch.cat([_pad_to(a.cross_states, n_items, 1, left=False), _pad_to(b.cross_states, n_items, 1, left=False)])
            a.cross_last = torch.cat([_pad_to(a.cross_last, n_items, 1, left=False), _pad_to(b.cross_last, n_items, 1, left=False)])
        if a.encoder_states is not None:
            from transformers import DynamicCache, EncoderDecoderCache

            source = max(a.encoder_states.shape[1], b.encoder_states.shape[1])
            a.encoder_states = torch.cat([_pad_to(a.encoder_states, source, 1, left=False), _pad_to(b.encoder_states, source, 1, left=False)])
            a.encoder_mask = torch.cat([_pad_to(a.encoder_mask, source, 1, left=False), _pad_to(b.encoder_mask, source, 1, left=False)])
            # Cross-attention keys are recomputed from the merged encoder states at the next step.
            a.cache = EncoderDecoderCache(a.cache.self_attention_cache, DynamicCache())
        return a


class _InPlaceLayer(DynamicLayer):
    """A full-attention KV cache layer that writes each step's keys and values into buffers with
    spare columns. ``DynamicLayer`` concatenates instead, which copies (and allocates anew) the
    whole cache at every decode step.

    ``keys`` and ``values`` are views of the filled columns, (rows, kv_heads, width, head_dim).
    """

    is_croppable = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.is_initialized, self.device = True, key_states.device
            self._place(key_states, value_states)
            return self.keys, self.values
        width, new = self.keys.shape[-2], key_states.shape[-2]
        if width + new > self._k.shape[-2]:
            self._place(self.keys, self.values, room=new)
        self._k[:, :, width : width + new] = key_states
        self._v[:, :, width : width + new] = value_states
        self.keys, self.values = self._k[:, :, : width + new], self._v[:, :, : width + new]
        return self.keys, self.values

    def _place(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """New buffers holding ``keys`` and ``values``, with ``room`` columns and a quarter more spare."""
        rows, heads, width, dim = keys.shape
        capacity = width + room + max(16, (width + room) // 4)
        self._k, self._v = keys.new_empty(rows, heads, capacity, dim), values.new_empty(rows, heads, capacity, dim)
        self._k[:, :, :width], self._v[:, :, :width] = keys, values
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]


def _new_cache():
    """A ``DynamicCache`` whose layers write in place (``_InPlaceLayer``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _InPlaceLayer
    return cache


def _set_kv(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, _InPlaceLayer):
        layer._place(keys, values)
    else:
        layer.keys, layer.values = keys, values


def _self_attention_layers(cache) -> list:
    return getattr(cache, "self_attention_cache", cache).layers


def _layers(cache) -> list:
    """Every cache layer that holds per-row tensors (cross-attention ones too, once computed)."""
    cross = getattr(cache, "cross_attention_cache", None)
    return _self_attention_layers(cache) + ([layer for layer in cross.layers if layer.is_initialized] if cross else [])


def _pad_to(t: torch.Tensor, width: int, dim: int, *, left: bool) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``width``, on the left or the right."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    after = t.dim() - 1 - dim % t.dim()  # F.pad lists the last dimension first
    return F.pad(t, [0, 0] * after + ([missing, 0] if left else [0, missing]))
