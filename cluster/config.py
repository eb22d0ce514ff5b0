"""One typed configuration for the whole system: per stage its model, placement and scaling.

The same file drives the in-process pipeline, the Serve application, batch jobs and the cluster
config. It is validated once at load; a bad field fails with its path and value.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnistage.actors.payloads import NEXTGPT_SIGNAL_TOKENS, DecodeLimits, Modality


class ConfigError(ValueError):
    """A configuration file or preset name that cannot be used."""


class _Strict(BaseModel):
    # A misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    num_cpus: float = Field(0.1, ge=0, description="CPUs per replica. Fractional so the ten or so pools of one app fit on a small node.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica; fractional values share a GPU.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, e.g. to pin a pool to a node type.")


class Batching(_Strict):
    max_batch_size: int = Field(8, ge=1, description="Largest batch one forward pass takes.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long a partial batch waits for more requests; 0 takes what queued up while the last batch ran."
    )


class Scaling(_Strict):
    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle, so the first request does not wait for a model load.")
    max_replicas: int = Field(1, ge=1, description="Upper bound for the autoscaler.")
    policy: Literal["ongoing_requests", "utilisation"] = Field(
        "ongoing_requests",
        description=(
            "'ongoing_requests': Serve's default, replicas = requests in flight / target_ongoing_requests. "
            "'utilisation': replicas = the seconds of model work the pool did per second, plus its backlog, "
            "over target_utilisation (omnistage.pipelines.autoscaling), which counts a request by what it costs; "
            "not for the LLM pool."
        ),
    )
    target_ongoing_requests: float = Field(2, gt=0, description="Autoscaler target per replica (policy 'ongoing_requests').")
    target_utilisation: float = Field(
        0.7, gt=0, le=1, description="Share of each replica's time spent on model work that the autoscaler aims for (policy 'utilisation')."
    )
    upscale_delay_s: float = Field(30, ge=0, description="Load must persist this long before replicas are added (Serve's default).")
    downscale_delay_s: float = Field(600, ge=0, description="Idleness must persist this long before replicas are removed (Serve's default).")
    metrics_interval_s: float = Field(10, gt=0, description="How often replicas report load to the autoscaler (Serve's default).")
    look_back_period_s: float = Field(30, gt=0, description="Window the autoscaler averages load over (Serve's default).")

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class QueueLimits(_Strict):
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once; at least max_batch_size so batches can fill.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests waiting per caller before new ones are refused; -1 for no limit.")


class HealthChecks(_Strict):
    period_s: float = Field(10, gt=0, description="How often Serve calls a replica's health check (Serve's default).")
    timeout_s: float = Field(30, gt=0, description="A check unanswered after this counts as failed (Serve's default).")


class PoolConfig(_Strict):
    """How one deployment's replicas are placed, scaled, queued and checked."""

    scaling: Scaling = Field(default_factory=Scaling)
    resources: Resources = Field(default_factory=Resources)
    queue: QueueLimits = Field(default_factory=QueueLimits)
    health: HealthChecks = Field(
        default_factory=HealthChecks,
        description="Serve replaces a replica after three failed checks in a row.",
    )


class StageConfig(PoolConfig):
    model: str = Field(
        "tiny",
        description="A built-in preset name (see `omnistage models list`) or a local checkpoint directory.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU (CPUs lack fast half-precision kernels)."
    )
    device: str = Field("auto", description="auto picks CUDA when the replica has a GPU, else CPU; or e.g. 'cpu', 'cuda:0'.")
    stuck_after_s: float | None = Field(
        None,
        gt=0,
        description="A replica whose model worker has spent longer than this on one call (a hung kernel, a deadlock) "
        "fails its health check, so Serve replaces it; set it above the slowest legitimate batch. None: no limit.",
    )


class BatchedStageConfig(StageConfig):
    """A stage that takes batches of items (every stage but the LLM, which schedules per step)."""

    batching: Batching = Field(default_factory=Batching)

    def rows_per_call(self) -> int:
        """Items one call takes: the batch size."""
        return self.batching.max_batch_size


class ImageEncoderConfig(BatchedStageConfig):
    # None rather than a number: the config reaches Serve replicas and batch actors as a dict with
    # every field filled, where "left unset" would be lost, but an explicit None survives.
    feature_layer: int | None = Field(
        None,
        description="Hidden-state layer to use. None: the checkpoint's own choice (LLaVA's vision_feature_layer, "
        "BLIP-2's last_hidden_state), else -2, the second to last, as LLaVA takes.",
    )
    drop_cls: bool | None = Field(
        None,
        description="Drop the CLS token and keep patch tokens only. None: the checkpoint's own choice (LLaVA's "
        "'default' strategy drops it, BLIP-2 keeps it), else drop it, as LLaVA does.",
    )


class VideoEncoderConfig(ImageEncoderConfig):
    num_frames: int | None = Field(
        None,
        ge=1,
        description="Frames sampled uniformly per video. None: the checkpoint's video processor's num_frames where it "
        "names one (Video-LLaVA, LLaVA-NeXT-Video), else 5, as the survey's models use.",
    )


class AudioEncoderConfig(BatchedStageConfig):
    feature_layer: int = Field(-1, description="Hidden-state layer of the audio encoder to use.")


class InputProjectorConfig(BatchedStageConfig):
    placement: Literal["pool", "encoders"] = Field(
        "pool",
        description=(
            "'pool': a pool of its own, scaled on its own. 'encoders': every encoder replica loads it too and "
            "projects each batch it encodes, which saves a request one hop per medium; its scaling, resources "
            "and queue settings then do not apply (the encoders' do)."
        ),
    )


class VLLMConfig(_Strict):
    """vLLM's own settings for an LLM pool with ``engine.backend: vllm`` (actors/vllm_engine.py),
    passed to its engine under vLLM's names."""

    max_num_seqs: int = Field(32, ge=1, description="Sequences vLLM decodes together (its scheduler's batch bound).")
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Context length vLLM plans its KV cache for; None takes the checkpoint's max_position_embeddings. "
        "Smaller values let more sequences share the cache.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of the GPU's memory vLLM takes for weights and KV cache (vLLM's default). On the CPU "
        "build it is the share of the host's memory instead: set it low (e.g. 0.1) where other pools share the node.",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="KV cache size, exactly; None sizes it from gpu_memory_utilization. On CPU an explicit size also "
        "skips the warm-up pass that the automatic sizing measures with.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of a shared prompt prefix (a system prompt) across requests (vLLM's default)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weights and activations in vLLM; auto takes the stage's dtype, which the transformers copy that "
        "embeds prompts and computes signal-token states also uses, so both sides agree.",
    )
    enforce_eager: bool | None = Field(
        None,
        description="Run the model eagerly, without torch.compile and CUDA graphs: a faster start, slower steps. "
        "None: eager on CPU (compiling there takes minutes of start-up on a few cores), compiled on GPU.",
    )
    python: str | None = Field(
        ".venv-vllm/bin/python",
        description="Interpreter the pool's replicas run under (Ray's runtime_env py_executable): an environment with "
        "vLLM and omnistage (`make vllm-env` builds .venv-vllm). A relative path is taken from the directory the "
        "app is deployed from. None: the node's own interpreter, for a worker image that already has vLLM.",
    )


class EngineConfig(_Strict):
    """The LLM's engine: the backend, and the bounds of the built-in continuous-batching engine
    (actors/engine.py) or vLLM's settings (``vllm``)."""

    backend: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="builtin: omnistage's own engine over transformers (any decoder-only or encoder-decoder model, "
        "any device). vllm: vLLM (paged attention, prefix caching, CUDA graphs), in its own environment; "
        "decoder-only models whose head size vLLM's attention takes.",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM's settings; read only with backend vllm.")
    max_running_seqs: int = Field(
        32,
        ge=1,
        description="Sequences decoded together in one step. More raises throughput until a step (every running "
        "stream's time per token) grows too long.",
    )
    max_kv_tokens: int = Field(
        131_072,
        ge=1,
        description="Bound on the running batch's padded KV cache, in token slots (rows x columns). A request is "
        "admitted only while the cache, grown by every row's remaining max_tokens, stays within it, so admission "
        "waits instead of running out of memory; size it to the memory left beside the weights.",
    )
    max_prefill_tokens: int = Field(
        512,
        ge=1,
        description="Prompt tokens prefilled per step; a longer prompt is prefilled in chunks of this size, so it "
        "delays the running sequences' next token by one chunk's work at most.",
    )
    max_waiting: int = Field(
        256,
        ge=0,
        description="Requests queued for admission per replica; beyond it new ones get 503 with Retry-After, so a "
        "client backs off instead of waiting past its deadline.",
    )

    @model_validator(mode="after")
    def _bounds_of_the_backend(self) -> EngineConfig:
        # Compared with the defaults, not the fields set: a dumped config sets every field.
        fields = type(self).model_fields
        builtin_only = [
            name for name in ("max_kv_tokens", "max_prefill_tokens", "max_running_seqs") if getattr(self, name) != fields[name].default
        ]
        if self.backend == "vllm" and builtin_only:
            raise ValueError(
                f"{builtin_only} bound the built-in engine; with backend vllm set engine.vllm (max_num_seqs, "
                "max_model_len, gpu_memory_utilization) instead"
            )
        return self

    @property
    def max_batch(self) -> int:
        """Sequences one step decodes together, whichever backend runs them."""
        return self.vllm.max_num_seqs if self.backend == "vllm" else self.max_running_seqs


class SamplingDefaults(_Strict):
    """What a request that leaves a field unset gets, whichever way it arrives (HTTP, SDK,
    ``LocalPipeline``, batch jobs): the model's own generation defaults, as a checkpoint's
    ``generation_config.json`` gives them to vLLM or transformers."""

    max_tokens: int = Field(256, ge=1, description="max_tokens of a chat or caption that sets none.")
    temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Greedy, as transformers' generate for a checkpoint without sampling settings; OpenAI's API "
        "defaults to 1.0, so set 1.0 for that behaviour.",
    )
    top_p: float = Field(1.0, gt=0, le=1)
    generation_max_tokens: int = Field(
        32, ge=1, description="Text budget before the forced signal tokens on media generation routes and jobs."
    )


class LLMConfig(StageConfig):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    queue: QueueLimits = Field(
        default_factory=lambda: QueueLimits(max_ongoing_requests=64, max_queued_requests=128),
        description="A replica takes more requests than it decodes at once (engine.max_running_seqs), so the engine "
        "admits the next waiting one the step a sequence finishes.",
    )
    signal_tokens: dict[Modality, int] = Field(
        default_factory=lambda: dict(NEXTGPT_SIGNAL_TOKENS),
        description="Signal tokens per output modality; NExT-GPT's counts by default.",
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")

    @model_validator(mode="before")
    @classmethod
    def _no_batching(cls, data: object) -> object:
        if isinstance(data, dict) and "batching" in data:
            raise ValueError(
                f"the LLM schedules every decode step itself: set engine.max_running_seqs instead of batching "
                f"(got batching {data['batching']!r})"
            )
        return data

    @model_validator(mode="after")
    def _queue_fills_the_batch(self) -> LLMConfig:
        if self.queue.max_ongoing_requests < self.engine.max_batch:
            bound = "engine.vllm.max_num_seqs" if self.engine.backend == "vllm" else "engine.max_running_seqs"
            raise ValueError(
                f"queue.max_ongoing_requests ({self.queue.max_ongoing_requests}) must be at least "
                f"{bound} ({self.engine.max_batch}), or the engine can never fill its batch"
            )
        return self

    @model_validator(mode="after")
    def _scales_on_sequences(self) -> LLMConfig:
        # An engine steps back to back whenever it has one sequence, so seconds of work say nothing
        # of its spare capacity; sequences in flight do (what Serve's default policy counts).
        if self.scaling.policy != "ongoing_requests":
            raise ValueError(
                f"the LLM pool scales on sequences in flight: expected scaling.policy 'ongoing_requests' "
                f"(with target_ongoing_requests), got {self.scaling.policy!r}"
            )
        return self

    def rows_per_call(self) -> int:
        """Rows a batch job hands the engine at once: twice what it decodes together, so that a
        finished row's place is taken at the next step."""
        return 2 * self.engine.max_batch


class OutputProjectorConfig(BatchedStageConfig):
    pass


class GeneratorConfig(BatchedStageConfig):
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(
        1.0, ge=0, description="Classifier-free guidance; above 1 needs a text encoder in the checkpoint for the empty prompt."
    )


class ImageGeneratorConfig(GeneratorConfig):
    height: int | None = Field(None, ge=8, description="Pixels; None uses the UNet's native size.")
    width: int | None = Field(None, ge=8, description="Pixels; None uses the UNet's native size.")


class VideoGeneratorConfig(ImageGeneratorConfig):
    num_frames: int = Field(8, ge=1, description="Frames per clip.")
    fps: int = Field(8, ge=1, description="Frame rate of the encoded clip.")
    format: Literal["mp4", "gif"] = Field("mp4", description="Container of the encoded clip.")


class AudioGeneratorConfig(GeneratorConfig):
    audio_length_s: float = Field(1.0, gt=0, le=60, description="Seconds of audio per clip.")


class Stages(_Strict):
    """The pools of one deployment. A missing encoder or generator means that modality is refused."""

    image_encoder: ImageEncoderConfig | None = None
    video_encoder: VideoEncoderConfig | None = None
    audio_encoder: AudioEncoderConfig | None = None
    input_projector: InputProjectorConfig | None = None
    llm: LLMConfig
    output_projector: OutputProjectorConfig | None = None
    image_generator: ImageGeneratorConfig | None = None
    video_generator: VideoGeneratorConfig | None = None
    audio_generator: AudioGeneratorConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Stages:
        encoders = [m for m in ("image", "video", "audio") if getattr(self, f"{m}_encoder")]
        generators = [m for m in ("image", "video", "audio") if getattr(self, f"{m}_generator")]
        if encoders and self.input_projector is None:
            raise ValueError(f"encoders {encoders} are configured but input_projector is missing")
        if generators and self.output_projector is None:
            raise ValueError(f"generators {generators} are configured but output_projector is missing")
        missing = [m for m in generators if m not in self.llm.signal_tokens]
        if missing:
            raise ValueError(
                f"generators {missing} have no signal tokens: llm.signal_tokens is {self.llm.signal_tokens}"
            )
        return self

    def input_modalities(self) -> list[Modality]:
        return [m for m in ("image", "video", "audio") if getattr(self, f"{m}_encoder")]

    def output_modalities(self) -> list[Modality]:
        return [m for m in ("image", "video", "audio") if getattr(self, f"{m}_generator")]


class InputLimits(_Strict):
    """Bounds on what one request may carry, checked before or while decoding (413 or 400)."""

    max_media_items: int = Field(8, ge=0, description="Media parts per request.")
    max_image_pixels: int = Field(16_777_216, ge=1, description="width x height, read from the header before decoding (4096x4096).")
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"], description="Pillow format names accepted."
    )
    max_audio_seconds: float = Field(600, gt=0, description="Longer audio is refused before its samples are read.")
    max_video_frames: int = Field(3600, ge=1, description="Reading a video stops with 413 past this many frames.")
    max_video_frame_pixels: int = Field(4_194_304, ge=1, description="width x height of a frame (2048x2048).")

    def decode_limits(self) -> DecodeLimits:
        """The limits that travel with each media file to the encoder pool that decodes it."""
        return DecodeLimits(
            max_image_pixels=self.max_image_pixels,
            image_formats=tuple(self.image_formats),
            max_audio_seconds=self.max_audio_seconds,
            max_video_frames=self.max_video_frames,
            max_video_frame_pixels=self.max_video_frame_pixels,
        )


class ServerConfig(_Strict):
    """The HTTP front of the Serve app."""

    host: str = Field("127.0.0.1", description="Loopback by default: exposing the server is an explicit choice.")
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(120, gt=0, description="A request still running after this gets 408.")
    metrics_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Where `omnistage serve` exports Prometheus metrics (Ray's and each stage's) when it starts its "
        "own Ray; a joined cluster exports on the port its `ray start --metrics-export-port` gave.",
    )
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Larger request bodies get 413 before parsing.")
    limits: InputLimits = Field(default_factory=InputLimits)
    api_key_hashes_file: str | None = Field(
        None,
        description="A file of SHA-256 hex digests of accepted API keys, one per line; with it (or OMNISTAGE_API_KEYS "
        "set), every /v1 route needs 'Authorization: Bearer KEY'. /healthz stays open.",
    )
    remote_media_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) media URLs the server fetches; empty refuses remote URLs (only data URLs).",
    )
    ingress: PoolConfig = Field(default_factory=PoolConfig, description="Scaling, resources and queues of the HTTP ingress.")


class CacheConfig(_Strict):
    """The encoder feature cache: shared through Redis when a URL is set, else in-process."""

    enabled: bool = Field(True, description="Cache encoder outputs keyed by input content and model.")
    redis_url: str | None = Field(
        None,
        description="redis://[:password@]host:port/db shared by every replica; unset reads OMNISTAGE_REDIS_URL, "
        "and without either each replica keeps its own in-process cache.",
    )
    ttl_s: int = Field(3600, ge=1, description="Entries expire after this; a chat's repeated image stays warm for an hour.")
    max_value_bytes: int = Field(16 * 1024 * 1024, ge=1, description="Larger features are not cached (a long video's would crowd out the rest).")
    local_max_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Size bound of the in-process LRU cache.")
    stages: list[str] = Field(
        default_factory=lambda: ["image_encoder", "video_encoder", "audio_encoder"],
        description="Stages whose outputs are cached: the encoders, the costliest per medium.",
    )


class OmnistageConfig(_Strict):
    name: str = Field(description="Shown as the model id in the API.")
    stages: Stages
    server: ServerConfig = Field(default_factory=ServerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)


def preset_names() -> list[str]:
    """The YAML presets shipped in ``omnistage.cluster/presets``."""
    folder = resources.files("omnistage.cluster") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path) -> OmnistageConfig:
    """Load a shipped preset by name (``"tiny"``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        source = str(path)
    elif str(name_or_path) in preset_names():
        text = (resources.files("omnistage.cluster") / "presets" / f"{name_or_path}.yaml").read_text()
        source = f"preset {name_or_path!r}"
    else:
        raise ConfigError(
            f"expected a preset name ({', '.join(preset_names())}) or a YAML file path, got {str(name_or_path)!r}"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping, got {type(data).__name__}")
    try:
        return OmnistageConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"{source} is invalid: {problems}") from None
