"""The LLM stage's engine on vLLM (``engine.backend: vllm``), behind the built-in engine's interface.

The stage renders the prompt and splices the projected media into its input embeddings as
always; vLLM (paged attention, prefix caching, CUDA graphs) takes those as ``prompt_embeds`` and
decodes. ``add``, ``step``, ``abort``, ``has_work`` and ``generate`` behave as ``Engine``'s do,
so the Serve pool's loop and batch jobs drive either engine the same way. vLLM's ``LLMEngine``
is that same add/step/abort shape over the engine core ``AsyncLLM`` drives; its core runs in this
process, so a step runs on the pool's model thread, as the built-in engine's does.

Signal tokens, as the built-in engine does them:

- A logits processor inside vLLM's sampler (``_SignalRow``, one per request) reads each request's
  tokens so far and forces the rest of a group once its first token is sampled, bans the
  placeholders and a group's later tokens, ends the text at ``max_tokens`` or a stop string, then
  forces the groups of ``force_modalities`` not emitted yet (a sampled end of sequence becomes the
  next group's first token) and finally the end of sequence.
- vLLM hands back no hidden states from generation (its ``extract_hidden_states`` is a
  speculative-decoding method that writes chosen layers to a KV connector). So when a request has
  emitted signal tokens, one prefill pass of the stage's transformers model over the prompt and
  the emitted tokens reads the last layer's state at the positions that predicted them, as the
  built-in engine reads them while decoding. Text-only requests cost nothing extra.

vLLM cannot serve everything the built-in engine can: encoder-decoder backbones (Flan-T5), and on
the CPU build head sizes its attention kernels lack, are refused at load with the reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch

from omnistage.actors.engine import EngineBase, StepOutput, TextStream, forward_to_head, signal_states
from omnistage.actors.errors import InvalidInputError, OverloadedError
from omnistage.actors.multimodal import is_multimodal_checkpoint
from omnistage.actors.payloads import LLMRequest, LLMResult, SignalGroup

if TYPE_CHECKING:
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import EngineConfig

log = structlog.get_logger(__name__)

# The key of a request's signal-token settings in vLLM's SamplingParams.extra_args.
_ARGS_KEY = "omnistage_signals"


class _SignalRow:
    """One request's signal-token rule inside vLLM's sampler, advanced from its output tokens.

    ``args`` (the request's ``extra_args`` entry): ``max_text`` (its max_tokens), ``groups`` (the
    token ids of every configured group), ``pending`` (first tokens of the forced groups, in
    order), ``banned``, ``eos``, ``stop`` (stop strings) and ``temperature``.
    """

    def __init__(self, args: dict, output_ids: list[int], device: torch.device, tokenizer_of):
        self.out = output_ids  # vLLM's own list, extended in place as tokens are sampled
        self.seen = 0
        self.max_text = args["max_text"]
        self.groups = {ids[0]: ids for ids in args["groups"]}
        self.signal_ids = {t for ids in args["groups"] for t in ids}
        self.pending = list(args["pending"])
        self.banned = torch.tensor(args["banned"], dtype=torch.long, device=device)
        self.eos = torch.tensor(args["eos"], dtype=torch.long, device=device)
        self.temperature = args["temperature"]
        self.forced: deque[int] = deque()
        self.text_tokens = 0
        self.text_done = False
        # Stop strings are found in the decoded text, as the engine's own stream finds them.
        self.stream = TextStream(tokenizer_of(), args["stop"]) if args["stop"] else None
        self.special = set(self.stream.tokenizer.all_special_ids) if self.stream else set()

    def advance(self) -> None:
        for token in self.out[self.seen :]:
            if self.forced:
                self.forced.popleft()
            elif token in self.groups:
                self.forced = deque(self.groups[token][1:])
                if token in self.pending:
                    self.pending.remove(token)
            elif token not in self.signal_ids:
                self.text_tokens += 1
                if self.stream is not None and token not in self.special:
                    self.stream.decode_ids.append(token)
        if self.seen < len(self.out) and not self.text_done:
            self.text_done = self.text_tokens >= self.max_text or (self.stream is not None and self.stream.update())
        self.seen = len(self.out)

    def apply(self, logits: torch.Tensor) -> None:
        """Constrain this request's row of logits (vocab,) in place."""
        self.advance()
        forced = self.forced[0] if self.forced else None
        if forced is None and self.text_done:
            forced = self.pending[0] if self.pending else int(self.eos[0])
        if forced is not None:
            logits.fill_(float("-inf"))
            logits[forced] = 0.0
            return
        logits.index_fill_(0, self.banned, float("-inf"))
        if self.pending:
            # The built-in engine replaces a sampled end of sequence by the next forced group's first
            # token: that token takes the end of sequence's probability (its max under greedy).
            first, eos = self.pending[0], logits[self.eos]
            both = torch.cat([logits[first : first + 1], eos])
            t = self.temperature
            logits[first] = both.max() if t == 0 else t * torch.logsumexp(both / t, 0)
            logits[self.eos] = float("-inf")


@functools.cache
def _signal_processor():
    """vLLM's logits processor class for ``_SignalRow`` (built on first use: only the vLLM pool's
    environment has vLLM)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    class SignalTokens(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, _SignalRow] = {}
            self.device = device
            self.tokenizer_path = vllm_config.model_config.model

        @functools.cached_property
        def tokenizer(self):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.tokenizer_path)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _, output_ids in batch_update.added:
                args = (params.extra_args or {}).get(_ARGS_KEY) if params is not None else None
                self.rows.pop(index, None)
                if args is not None:
                    self.rows[index] = _SignalRow(args, output_ids, self.device, lambda: self.tokenizer)
            for a, b, direction in batch_update.moved:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_a is not None:
                    self.rows[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    self.rows[a] = row_b

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for index, row in self.rows.items():
                row.apply(logits[index])
            return logits

    return SignalTokens


@dataclass
class _Request:
    """One request's state on this side of vLLM."""

    request: LLMRequest
    prompt_len: int
    embeds: torch.Tensor  # (prompt_len, d): kept for the signal-state pass
    stream: TextStream
    arrival: float
    token_ids: list[int]
    first_token: float | None = None
    stopped: bool = False  # the text ended at a stop string


class VLLMEngine(EngineBase):
    """The ``Engine`` interface over vLLM; see the module docstring. Settings: ``config.vllm``;
    ``config.max_waiting`` bounds the requests beyond ``max_num_seqs`` as for the built-in engine.

    Not thread-safe, like ``Engine``: one thread calls ``add``, ``step`` and ``abort``."""

    def __init__(self, llm: LLM, config: EngineConfig):
        self.llm = llm
        self.config = config
        self.settings = config.vllm
        self.sequences: dict[str, _Request] = {}
        self.generated_tokens = 0
        self.group_sizes = {m: len(ids) for m, ids in llm.groups.items()}
        self.special_ids = frozenset(llm.tokenizer.all_special_ids)
        self._check_servable()
        model_dir = self._model_dir()
        self.max_model_len = self.settings.max_model_len or llm.max_context
        self.engine = self._start(model_dir)

    def _check_servable(self) -> None:
        llm = self.llm
        if llm.is_encoder_decoder:
            raise ValueError(
                f"engine.backend vllm expected a decoder-only language model (vLLM takes prompt embeddings only for "
                f"those), got the encoder-decoder {type(llm.model).__name__} in {str(llm.checkpoint)!r}; "
                "use engine.backend builtin for it"
            )
        from vllm import ModelRegistry
        from vllm.platforms import current_platform

        config = llm.model.config
        architecture = type(llm.model).__name__
        if architecture not in ModelRegistry.get_supported_archs():
            raise ValueError(
                f"engine.backend vllm expected a language model class vLLM implements, got {architecture} "
                f"in {str(llm.checkpoint)!r}; use engine.backend builtin for it"
            )
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head not in sizes:
                raise ValueError(
                    f"vLLM's CPU attention expected a head size in {sizes}, got {head} (hidden_size "
                    f"{config.hidden_size} / {config.num_attention_heads} heads) in {str(llm.checkpoint)!r}; "
                    "use engine.backend builtin for it"
                )

    def _model_dir(self) -> str:
        """The checkpoint vLLM loads: the stage's own directory, or the stage's language model saved
        apart when the checkpoint is a multimodal one (LLaVA's language part) or the stage added
        tokens to it, so vLLM's vocabulary is the stage's."""
        llm = self.llm
        if not is_multimodal_checkpoint(llm.checkpoint) and not llm.added_tokens:
            return str(llm.checkpoint)
        path = tempfile.mkdtemp(prefix="omnistage-vllm-")
        weakref.finalize(self, shutil.rmtree, path, True)
        llm.model.save_pretrained(path)
        llm.tokenizer.save_pretrained(path)
        log.info("vllm_language_model_saved", checkpoint=str(llm.checkpoint), path=path)
        return path

    def _start(self, model_dir: str):
        # The engine core steps in this process, on the thread that calls step(), as the built-in
        # engine does; a core process of its own would busy-wait beside the pool's.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        s = self.settings
        args = EngineArgs(
            model=model_dir,
            # Prompts arrive as embeddings and text is decoded here (stop strings, signal tokens).
            skip_tokenizer_init=True,
            enable_prompt_embeds=True,
            dtype=str(self.llm.dtype).removeprefix("torch.") if s.dtype == "auto" else s.dtype,
            max_num_seqs=s.max_num_seqs,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_memory_bytes=s.kv_cache_memory_bytes,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=current_platform.is_cpu() if s.enforce_eager is None else s.enforce_eager,
            logits_processors=[_signal_processor()],
            disable_log_stats=True,
        )
        start = time.perf_counter()
        engine = LLMEngine.from_engine_args(args)
        log.info("vllm_engine_started", model=model_dir, seconds=round(time.perf_counter() - start, 1))
        return engine

    # Requests in and out

    def add(self, request_id: str, request: LLMRequest) -> None:
        """Queue ``request``; raises ``InvalidInputError`` for one the model cannot take and
        ``OverloadedError`` when more than ``max_waiting`` wait beyond vLLM's running batch."""
        if self.num_waiting >= self.config.max_waiting:
            raise OverloadedError(f"the LLM's waiting queue is full ({self.config.max_waiting} requests); retry later")
        self._enqueue(request_id, request)

    @torch.inference_mode()
    def _enqueue(self, request_id: str, request: LLMRequest) -> None:
        from vllm import SamplingParams

        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        llm = self.llm
        request = llm.with_defaults(request)
        prompt_ids, prompt_len = llm.prepare(request)
        pending = list(dict.fromkeys(request.force_modalities))
        worst = prompt_len + request.max_tokens + sum(self.group_sizes[m] for m in pending)
        if worst > self.max_model_len:
            raise InvalidInputError(
                f"expected the prompt ({prompt_len} tokens with media) plus max_tokens ({request.max_tokens}) and "
                f"forced signal tokens to fit vLLM's max_model_len of {self.max_model_len} tokens, got {worst}"
            )
        embeds = llm.embed_prompt(request, prompt_ids)
        signals = {
            "max_text": request.max_tokens,
            "groups": list(llm.groups.values()),
            "pending": [llm.groups[m][0] for m in pending],
            "banned": llm.banned.tolist(),
            "eos": sorted(llm.eos_ids),
            "stop": list(request.stop),
            "temperature": request.temperature,
        }
        params = SamplingParams(
            # The signal rule ends every request; the room left in the context is only the last bound.
            max_tokens=self.max_model_len - prompt_len,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=sorted(llm.eos_ids),
            detokenize=False,
            extra_args={_ARGS_KEY: signals},
        )
        self.engine.add_request(request_id, {"prompt_embeds": embeds.detach().cpu()}, params)
        self.sequences[request_id] = _Request(
            request=request,
            prompt_len=prompt_len,
            embeds=embeds,
            stream=TextStream(llm.tokenizer, request.stop),
            arrival=time.perf_counter(),
            token_ids=[],
        )

    def abort(self, request_id: str) -> None:
        if self.sequences.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])

    def abort_all(self) -> None:
        ids, self.sequences = list(self.sequences), {}
        if ids:
            self.engine.abort_request(ids)

    def has_work(self) -> bool:
        return bool(self.sequences)

    @property
    def num_running(self) -> int:
        return min(len(self.sequences), self.settings.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self.sequences) - self.settings.max_num_seqs)

    @property
    def kv_tokens(self) -> int:
        """Tokens the running requests hold in vLLM's paged cache (prompt and generated)."""
        return sum(seq.prompt_len + len(seq.token_ids) for seq in self.sequences.values())

    # One step

    def step(self) -> list[StepOutput]:
        if not self.engine.has_unfinished_requests():
            return []
        outputs = []
        for out in self.engine.step():
            seq = self.sequences.get(out.request_id)
            if seq is None:
                continue  # aborted while its last step ran
            completion = out.outputs[0]
            new = list(completion.token_ids[len(seq.token_ids) :])
            if new and seq.first_token is None:
                seq.first_token = time.perf_counter()
            self.generated_tokens += len(new)
            for token in new:
                seq.token_ids.append(token)
                if token not in self.llm.signal_modality and token not in self.llm.eos_ids and token not in self.special_ids:
                    seq.stream.decode_ids.append(token)
            if not seq.stopped and new:
                seq.stopped = seq.stream.update()
            if out.finished:
                del self.sequences[out.request_id]
                seq.stream.flush()
                outputs.append(self._finish(out.request_id, seq, completion.finish_reason))
            elif delta := seq.stream.delta(done=False):
                outputs.append(StepOutput(out.request_id, delta))
        return outputs

    def _finish(self, request_id: str, seq: _Request, vllm_reason: str | None) -> StepOutput:
        token_ids = [t for t in seq.token_ids if t not in self.llm.eos_ids]
        text_tokens = sum(1 for t in token_ids if t not in self.llm.signal_modality)
        # vLLM's "length" here means the context filled up; the text's own bound is max_tokens.
        length = vllm_reason == "length" or (not seq.stopped and text_tokens >= seq.request.max_tokens)
        now = time.perf_counter()
        n = len(seq.token_ids)
        first = seq.first_token if seq.first_token is not None else now
        return StepOutput(
            request_id,
            seq.stream.delta(done=True),
            LLMResult(
                text=seq.stream.text,
                finish_reason="length" if length else "stop",
                prompt_tokens=seq.prompt_len,
                token_ids=token_ids,
                signals=self._signal_groups(seq, token_ids),
            ),
            ttft_s=first - seq.arrival,
            tpot_s=(now - first) / (n - 1) if n > 1 else None,
        )

    @torch.inference_mode()
    def _signal_groups(self, seq: _Request, token_ids: list[int]) -> list[SignalGroup]:
        """The states behind each complete signal group: one prefill of the transformers model over
        the prompt and the tokens before the last signal token, keeping the LM head's input at the
        positions that predicted a signal token (``signal_states``, as the built-in engine keeps them)."""
        llm = self.llm
        at = [j for j, t in enumerate(token_ids) if t in llm.signal_modality]
        if not at:
            return []
        device = llm.device
        emitted = llm.embed_tokens(torch.tensor(token_ids[: at[-1]], dtype=torch.long, device=device))
        embeds = torch.cat([seq.embeds, emitted])[None]
        keep = torch.tensor([seq.prompt_len + j - 1 for j in at], device=device)
        _, hidden = forward_to_head(llm.model, inputs_embeds=embeds, logits_to_keep=keep, use_cache=False)
        tokens = torch.tensor([token_ids[j] for j in at], device=device)
        states = signal_states(hidden[0], llm.embed_tokens(tokens)).float().cpu().numpy()
        groups, current = [], []
        for token, state in zip(tokens.tolist(), states):
            modality = llm.signal_modality[token]
            if token == llm.groups[modality][0]:
                current = []
            current.append(state)
            if len(current) == self.group_sizes[modality]:
                groups.append(SignalGroup(modality=modality, hidden=np.stack(current)))
        return groups
