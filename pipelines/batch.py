"""Offline jobs on Ray Data: caption media in a dataset, or generate media from its prompts.

Each model stage runs as its own Ray Data actor pool, built from the same config as serving
(``batching.max_batch_size``, ``scaling.min_replicas/max_replicas``, ``resources``) and running
the same stage class; the adapters here only turn Arrow batches into the stages' payloads and
back::

    caption:  read -> prepare (decode, validate: tasks) -> encoder pool -> input projector pool
                   -> LLM pool -> finish -> Parquet
    generate: read -> prepare (validate prompts: tasks) -> LLM pool (signal tokens forced)
                   -> output projector pool -> generator pool -> finish -> Parquet

Every row carries an ``error`` column. A row that a step refuses gets its error there and passes
every later step untouched, so one bad row never fails the job. What counts as the row's fault:
anything raised while reading or decoding its media or prompt, and ``InvalidInputError`` from a
stage's ``check`` or call. Any other exception in a stage is the stage's fault (a bug, a device
out of memory): its block fails and with it the job, and a rerun resumes.

Resume: the output folder is the checkpoint. A run first reads the ids already in the output and
skips them; it then writes new files named after its own run id, so reruns append and never
rewrite. See ``docs/batch.md``.

Payload arrays cross stages as two Arrow columns, raw bytes and shape (``features`` and
``features_shape``): a failed row is a null there, where Arrow tensor columns have no null.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from omnistage.actors.builtin import ensure_presets
from omnistage.actors.errors import InvalidInputError
from omnistage.actors.media import decode, sample_frame_indices
from omnistage.actors.payloads import (
    AudioClip,
    Conditioning,
    Embeddings,
    EncodedMedia,
    Features,
    GenerationRequest,
    LLMRequest,
    Modality,
    SignalGroup,
)
from omnistage.cluster.config import InputLimits, OmnistageConfig, StageConfig, load_config
from omnistage.pipelines.batch_io import (
    MediaReader,
    input_ids,
    input_schema,
    media_root_of,
    read_input,
    resolve,
    row_seed,
    written_ids,
)
from omnistage.pipelines.graph import Graph, generation, ports, understanding
from omnistage.pipelines.messages import ParsedChat, parse_messages
from omnistage.pipelines.schemas import PART_MODALITY

if TYPE_CHECKING:
    import ray.data

log = structlog.get_logger(__name__)

DEFAULT_PROMPTS: dict[str, str] = {
    "image": "Describe this image.",
    "video": "Describe this video.",
    "audio": "Describe this audio.",
}
PART_TYPE: dict[str, str] = {modality: part for part, modality in PART_MODALITY.items()}

# Output columns after the id column (which keeps the input's name and type).
# A grounding model's phrases and their boxes, as the chat API's ``entities`` gives them.
ENTITIES_TYPE = pa.list_(
    pa.struct([("text", pa.string()), ("span", pa.list_(pa.int32())), ("boxes", pa.list_(pa.list_(pa.float64())))])
)
CAPTION_SCHEMA = pa.schema(
    [
        ("modality", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("entities", ENTITIES_TYPE),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("model", pa.string()),
        ("error", pa.string()),
        ("decode_ms", pa.float64()),
        ("encode_ms", pa.float64()),
        ("project_ms", pa.float64()),
        ("llm_ms", pa.float64()),
        ("run_id", pa.string()),
    ]
)
GENERATE_SCHEMA = pa.schema(
    [
        ("modality", pa.string()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("media", pa.binary()),
        ("mime_type", pa.string()),
        ("model", pa.string()),
        ("error", pa.string()),
        ("llm_ms", pa.float64()),
        ("project_ms", pa.float64()),
        ("generate_ms", pa.float64()),
        ("run_id", pa.string()),
    ]
)
# Rows per output file: a crash loses at most the files being written, and generated media are
# much larger per row than captions.
ROWS_PER_FILE = {"caption": 1000, "generate": 100}


def _error(step: str, exc: BaseException) -> str:
    return f"{step}: {type(exc).__name__}: {exc}"


# --- payload arrays as Arrow columns -------------------------------------------------------------


def _pack(arrays: list[np.ndarray | None]) -> tuple[pa.Array, pa.Array]:
    """Arrays (None for failed rows) -> a binary column of their bytes and a column of their shapes."""
    data = pa.array([None if a is None else np.ascontiguousarray(a).tobytes() for a in arrays], pa.binary())
    shapes = pa.array([None if a is None else list(a.shape) for a in arrays], pa.list_(pa.int64()))
    return data, shapes


def _unpack(table: pa.Table, name: str, dtype: type, rows: list[int]) -> list[np.ndarray | None]:
    """The arrays of column ``name`` at ``rows`` (None where null), as writable arrays (torch
    refuses read-only ones)."""
    data, shapes = table.column(name).to_pylist(), table.column(f"{name}_shape").to_pylist()
    return [None if data[i] is None else np.frombuffer(data[i], dtype).reshape(shapes[i]).copy() for i in rows]


def _with_columns(table: pa.Table, columns: dict[str, pa.Array], drop: tuple[str, ...] = ()) -> pa.Table:
    table = table.drop_columns([name for name in drop if name in table.column_names])
    for name, column in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, column) if index >= 0 else table.append_column(name, column)
    return table


def _scatter(values: dict[int, Any], n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([values.get(i) for i in range(n)], type_)


# --- steps that run as tasks ---------------------------------------------------------------------


def rows_to_do(table: pa.Table, *, id_column: str, skip_ids: pa.Array | None) -> pa.Table:
    """Drop rows whose id is in ``skip_ids`` (strings), and rows without an id (they could not be
    resumed). Runs on whole read blocks: ``is_in`` hashes ``skip_ids`` on every call."""
    ids = table.column(id_column)
    keep = pc.is_valid(ids)
    if ids.null_count:
        log.warning("batch_rows_without_id_skipped", count=ids.null_count, id_column=id_column)
    if skip_ids is not None and len(skip_ids):
        keep = pc.and_(keep, pc.invert(pc.is_in(ids.cast(pa.string()), value_set=skip_ids)))
    return table.filter(keep)


def _prompt_text(value: Any, column: str | None) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "null" if value is None else repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise InvalidInputError(f"expected a non-empty text prompt in column {column!r}, got {got}")
    return value


def _decode_row(
    value: bytes | np.ndarray, text: str, modality: Modality, num_frames: int | None, limits: InputLimits | None
) -> tuple[ParsedChat, np.ndarray, int | None]:
    """One row's chat, its decoded medium and (audio) sampling rate, as ``LocalPipeline`` decodes them."""
    part = PART_TYPE[modality]
    chat = parse_messages(
        [{"role": "user", "content": [{"type": part, part: value}, {"type": "text", "text": text}]}],
        accepted=[modality],
        limits=limits,
    )
    medium = chat.media[0][1]
    if isinstance(medium, EncodedMedia):
        # Decoded in this task, as an encoder pool would: of a video only the frames it samples.
        medium = decode(medium, video_frames=num_frames)
    elif modality == "video" and num_frames is not None:
        medium = medium[sample_frame_indices(len(medium), num_frames)]
    if isinstance(medium, AudioClip):
        return chat, medium.samples, medium.sampling_rate
    # A video's sampled frames travel on; the encoder samples them again as the identity.
    return chat, medium, None


def prepare_caption(
    table: pa.Table,
    *,
    modality: Modality,
    id_column: str,
    media_column: str,
    prompt_column: str | None,
    prompt: str,
    media_root: str | None,
    num_frames: int | None,
    seed: int,
    limits: InputLimits | None = None,
) -> pa.Table:
    """Read and decode each row's medium, build its chat; a row that fails gets its error.

    ``limits`` (the config's ``server.limits``) bound pixels, frames and seconds as in serving.
    """
    reader = MediaReader(media_root)
    cells = table.column(media_column).to_pylist()
    prompts = table.column(prompt_column).to_pylist() if prompt_column else [prompt] * table.num_rows
    errors, messages, instructions, decoded, rates, timings = [], [], [], [], [], []
    for cell, text in zip(cells, prompts):
        start = time.perf_counter()
        error = chat = medium = rate = None
        try:
            text = _prompt_text(text, prompt_column)
        except InvalidInputError as exc:
            error = _error("prompt", exc)
        else:
            try:
                chat, medium, rate = _decode_row(reader(cell, media_column), text, modality, num_frames, limits)
            except Exception as exc:  # noqa: BLE001 - reading or decoding one row's medium is that row's problem
                error = _error("decode", exc)
        errors.append(error)
        messages.append(None if chat is None else json.dumps(chat.messages))
        instructions.append(None if chat is None else chat.instructions[0])
        decoded.append(medium)
        rates.append(rate)
        timings.append((time.perf_counter() - start) * 1000)
    data, shapes = _pack(decoded)
    ids = table.column(id_column)
    return pa.table(
        {
            id_column: ids,
            "prompt": pa.array([p if isinstance(p, str) else None for p in prompts], pa.string()),
            "error": pa.array(errors, pa.string()),
            "seed": pa.array([row_seed(seed, i) for i in ids.to_pylist()], pa.int64()),
            "messages": pa.array(messages, pa.string()),
            # The prompt as the input projector reads it with the medium (Features.instruction).
            "instruction": pa.array(instructions, pa.string()),
            "decoded": data,
            "decoded_shape": shapes,
            "decoded_rate": pa.array(rates, pa.int64()),
            "decode_ms": pa.array(timings, pa.float64()),
        }
    )


def prepare_generate(table: pa.Table, *, id_column: str, prompt_column: str, seed: int) -> pa.Table:
    """Check each row's prompt and build its chat; a row that fails gets its error."""
    errors, messages = [], []
    prompts = table.column(prompt_column).to_pylist()
    for value in prompts:
        try:
            chat = parse_messages([{"role": "user", "content": _prompt_text(value, prompt_column)}], accepted=[])
            errors.append(None)
            messages.append(json.dumps(chat.messages))
        except InvalidInputError as exc:
            errors.append(_error("prompt", exc))
            messages.append(None)
    ids = table.column(id_column)
    return pa.table(
        {
            id_column: ids,
            "prompt": pa.array([p if isinstance(p, str) else None for p in prompts], pa.string()),
            "error": pa.array(errors, pa.string()),
            "seed": pa.array([row_seed(seed, i) for i in ids.to_pylist()], pa.int64()),
            "messages": pa.array(messages, pa.string()),
        }
    )


def finish(table: pa.Table, *, id_column: str, schema: pa.Schema, constants: dict[str, Any]) -> pa.Table:
    """The output table: the id column, then ``schema``'s columns in order and with its types."""
    n = table.num_rows
    columns = {id_column: table.column(id_column)}
    for field in schema:
        if field.name in constants:
            columns[field.name] = pa.array([constants[field.name]] * n, field.type)
        elif field.name in table.column_names:
            columns[field.name] = table.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    return pa.table(columns)


# --- stage adapters: one actor pool each ---------------------------------------------------------


class StageUDF:
    """Runs one stage class over the rows of an Arrow batch that have no error yet.

    Each row is first checked alone (``stage.check``); the rest go through the stage as one batch.
    If the stage refuses the batch as a whole (``InvalidInputError``, e.g. items that cannot share
    a batch), the rows are run one at a time so that only the guilty ones fail.
    """

    step: ClassVar[str]  # names the step in errors, and its timing column (``<step>_ms``)
    consumes: ClassVar[tuple[str, ...]] = ()  # input columns dropped once used

    def __init__(self, stage: str, config: StageConfig):
        import ray

        from omnistage.actors.registry import create_stage
        from omnistage.pipelines.logs import configure_logging

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            configure_logging()  # JSON lines, as in the Serve replicas; not when run in-process
        self.stage = create_stage(stage, config)

    def inputs(self, table: pa.Table, rows: list[int]) -> list[Any]:
        raise NotImplementedError

    def columns(self, table: pa.Table, outputs: dict[int, Any], errors: list[str | None]) -> dict[str, pa.Array]:
        """Output columns from the stage's outputs by row; may record errors found in them."""
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        errors = table.column("error").to_pylist()
        rows = [i for i, error in enumerate(errors) if error is None]
        start = time.perf_counter()
        outputs = self._run(rows, self.inputs(table, rows), errors) if rows else {}
        per_row_ms = (time.perf_counter() - start) * 1000 / max(len(rows), 1)
        columns = self.columns(table, outputs, errors)
        columns["error"] = pa.array(errors, pa.string())
        columns[f"{self.step}_ms"] = _scatter(dict.fromkeys(rows, per_row_ms), table.num_rows, pa.float64())
        return _with_columns(table, columns, drop=self.consumes)

    def _run(self, rows: list[int], items: list[Any], errors: list[str | None]) -> dict[int, Any]:
        checked = []
        for row, item in zip(rows, items):
            try:
                self.stage.check(item)
                checked.append((row, item))
            except InvalidInputError as exc:
                errors[row] = _error(self.step, exc)
        if not checked:
            return {}
        try:
            return dict(zip([row for row, _ in checked], self.stage([item for _, item in checked])))
        except InvalidInputError as exc:
            if len(checked) == 1:
                errors[checked[0][0]] = _error(self.step, exc)
                return {}
        log.warning("batch_refused_running_rows_alone", step=self.step, rows=len(checked))
        outputs = {}
        for row, item in checked:
            try:
                outputs[row] = self.stage([item])[0]
            except InvalidInputError as exc:
                errors[row] = _error(self.step, exc)
        return outputs


class EncoderUDF(StageUDF):
    """Decoded media -> encoder features (``features``: (n_tokens, d_encoder) float32)."""

    step = "encode"
    consumes = ("decoded", "decoded_shape", "decoded_rate")

    def __init__(self, config: StageConfig, modality: Modality):
        super().__init__(f"{modality}_encoder", config)
        self.modality = modality

    def inputs(self, table: pa.Table, rows: list[int]) -> list[Any]:
        if self.modality != "audio":
            return _unpack(table, "decoded", np.uint8, rows)
        rates = table.column("decoded_rate").to_pylist()
        samples = _unpack(table, "decoded", np.float32, rows)
        return [AudioClip(samples=s, sampling_rate=rates[i]) for s, i in zip(samples, rows)]

    def columns(self, table: pa.Table, outputs: dict[int, Features], errors: list[str | None]) -> dict[str, pa.Array]:
        data, shapes = _pack([outputs[i].features if i in outputs else None for i in range(table.num_rows)])
        # A tiled image's original (height, width), which its projector unpads by; null otherwise.
        sizes = [list(outputs[i].image_size) if i in outputs and outputs[i].image_size else None for i in range(table.num_rows)]
        return {"features": data, "features_shape": shapes, "image_size": pa.array(sizes, pa.list_(pa.int64()))}


class InputProjectorUDF(StageUDF):
    """Features, with the text the medium came with (``instruction``) and a tiled image's size
    (``image_size``), -> LLM embeddings (``embeds``: (n_tokens', d_llm) float32)."""

    step = "project"
    consumes = ("features", "features_shape", "instruction", "image_size")

    def __init__(self, config: StageConfig, modality: Modality):
        super().__init__("input_projector", config)
        self.modality = modality

    def inputs(self, table: pa.Table, rows: list[int]) -> list[Features]:
        instructions = table.column("instruction").to_pylist()
        sizes = table.column("image_size").to_pylist()
        features = _unpack(table, "features", np.float32, rows)
        return [
            Features(modality=self.modality, features=f, instruction=instructions[i], image_size=sizes[i] and tuple(sizes[i]))
            for f, i in zip(features, rows)
        ]

    def columns(self, table: pa.Table, outputs: dict[int, Embeddings], errors: list[str | None]) -> dict[str, pa.Array]:
        data, shapes = _pack([outputs[i].embeds if i in outputs else None for i in range(table.num_rows)])
        # How the LLM reads them (spliced, or through cross-attention), as the projector decided.
        fusion = pa.array([outputs[i].fusion if i in outputs else None for i in range(table.num_rows)], pa.string())
        return {"embeds": data, "embeds_shape": shapes, "fusion": fusion}


class LLMUDF(StageUDF):
    """Chats (with projected media, when ``modality`` is set) -> answers; with ``force`` set, also
    the signal group of that modality (``signal``: (n_signal_tokens, d_llm) float32)."""

    step = "llm"
    consumes = ("messages", "embeds", "embeds_shape", "fusion")

    def __init__(
        self,
        config: StageConfig,
        *,
        modality: Modality | None,
        force: Modality | None,
        max_tokens: int | None,
        temperature: float | None,
        answer_column: str,
    ):
        super().__init__("llm", config)
        self.modality, self.force = modality, force
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}
        self.answer_column = answer_column

    def inputs(self, table: pa.Table, rows: list[int]) -> list[LLMRequest]:
        messages, seeds = table.column("messages").to_pylist(), table.column("seed").to_pylist()
        embeds = _unpack(table, "embeds", np.float32, rows) if self.modality else [None] * len(rows)
        fusion = table.column("fusion").to_pylist() if self.modality else [None] * table.num_rows
        return [
            LLMRequest(
                messages=json.loads(messages[i]),
                media=[] if e is None else [Embeddings(modality=self.modality, embeds=e, fusion=fusion[i])],
                seed=seeds[i],
                force_modalities=[self.force] if self.force else [],
                **self.sampling,
            )
            for i, e in zip(rows, embeds)
        ]

    def columns(self, table: pa.Table, outputs: dict[int, Any], errors: list[str | None]) -> dict[str, pa.Array]:
        n = table.num_rows
        columns = {
            self.answer_column: _scatter({i: r.text for i, r in outputs.items()}, n, pa.string()),
            "entities": _scatter({i: r.entities for i, r in outputs.items()}, n, ENTITIES_TYPE),
            "finish_reason": _scatter({i: r.finish_reason for i, r in outputs.items()}, n, pa.string()),
            "prompt_tokens": _scatter({i: r.prompt_tokens for i, r in outputs.items()}, n, pa.int32()),
            "completion_tokens": _scatter({i: r.completion_tokens for i, r in outputs.items()}, n, pa.int32()),
        }
        if self.force:
            signals: list[np.ndarray | None] = [None] * n
            for i, result in outputs.items():
                # The forced group is always there; the model may have emitted others of its own.
                group = next((s for s in result.signals if s.modality == self.force), None)
                if group is None:
                    errors[i] = f"llm: the answer has no complete {self.force} signal-token group"
                else:
                    signals[i] = group.hidden
            columns["signal"], columns["signal_shape"] = _pack(signals)
        return columns


class OutputProjectorUDF(StageUDF):
    """Signal groups -> generator conditioning (``conditioning``: (seq_len, d_cond) float32, and
    ``generated``: (n_generated, d_generated) float32 for generators that take a second one)."""

    step = "project"
    consumes = ("signal", "signal_shape")

    def __init__(self, config: StageConfig, modality: Modality):
        super().__init__("output_projector", config)
        self.modality = modality

    def inputs(self, table: pa.Table, rows: list[int]) -> list[SignalGroup]:
        return [SignalGroup(modality=self.modality, hidden=h) for h in _unpack(table, "signal", np.float32, rows)]

    def columns(self, table: pa.Table, outputs: dict[int, Conditioning], errors: list[str | None]) -> dict[str, pa.Array]:
        data, shapes = _pack([outputs[i].embeds if i in outputs else None for i in range(table.num_rows)])
        # A second conditioning where the generator takes one (AudioLDM 2's generated_prompt_embeds).
        generated, generated_shapes = _pack([outputs[i].generated_embeds if i in outputs else None for i in range(table.num_rows)])
        return {"conditioning": data, "conditioning_shape": shapes, "generated": generated, "generated_shape": generated_shapes}


class GeneratorUDF(StageUDF):
    """Conditioning -> encoded media (``media``: PNG, MP4 or GIF, WAV bytes) and ``mime_type``."""

    step = "generate"
    consumes = ("conditioning", "conditioning_shape", "generated", "generated_shape")

    def __init__(self, config: StageConfig, modality: Modality):
        super().__init__(f"{modality}_generator", config)
        self.modality = modality

    def inputs(self, table: pa.Table, rows: list[int]) -> list[GenerationRequest]:
        seeds = table.column("seed").to_pylist()
        embeds = _unpack(table, "conditioning", np.float32, rows)
        generated = _unpack(table, "generated", np.float32, rows)
        return [
            GenerationRequest(conditioning=Conditioning(modality=self.modality, embeds=e, generated_embeds=g), seed=seeds[i])
            for i, e, g in zip(rows, embeds, generated)
        ]

    def columns(self, table: pa.Table, outputs: dict[int, Any], errors: list[str | None]) -> dict[str, pa.Array]:
        n = table.num_rows
        return {
            "media": _scatter({i: m.data for i, m in outputs.items()}, n, pa.binary()),
            "mime_type": _scatter({i: m.mime_type for i, m in outputs.items()}, n, pa.string()),
        }


# --- building the jobs ---------------------------------------------------------------------------


def _config(config: str | OmnistageConfig) -> OmnistageConfig:
    return config if isinstance(config, OmnistageConfig) else load_config(config)


def _stage_config(config: OmnistageConfig, name: str, job: str) -> StageConfig:
    stage = getattr(config.stages, name)
    if stage is None:
        raise ValueError(f"the {job} job needs stages.{name}, but config {config.name!r} has none")
    if name == "llm" and stage.engine.backend != "builtin":
        # Batch actor pools run in this environment, which has no vLLM (the Serve app starts the
        # vLLM pool under its own interpreter).
        raise ValueError(
            f"the {job} job runs the LLM on the built-in engine; expected stages.llm.engine.backend builtin "
            f"in config {config.name!r}, got {stage.engine.backend} (served by the Serve app only)"
        )
    return stage


def _loaded_ports(name: str, stage_config: dict[str, Any]) -> dict[str, Any]:
    from omnistage.actors.registry import create_stage

    return ports(name, create_stage(name, stage_config))


def check_fit(config: OmnistageConfig, names: list[str]) -> None:
    """Load each of stages ``names`` once, in a task placed as its pool's actors will be, and check
    that each fits the next before any row runs: a mismatch fails the job at once, naming both
    shapes, rather than failing every row. Costs one model load per stage."""
    import ray

    stages = {name: getattr(config.stages, name) for name in names}
    ensure_presets(stage.model for stage in stages.values())
    loaded = ray.remote(_loaded_ports)
    refs = {
        name: loaded.options(
            num_cpus=stage.resources.num_cpus, num_gpus=stage.resources.num_gpus, resources=stage.resources.custom or None
        ).remote(name, stage.model_dump(mode="json"))
        for name, stage in stages.items()
    }
    Graph.of(config).check({name: ray.get(ref) for name, ref in refs.items()})


def _pool(stage: StageConfig) -> dict[str, Any]:
    """``map_batches`` arguments that make ``stage`` an actor pool sized and placed by its config."""
    from ray.data import ActorPoolStrategy

    return {
        # Ray Data needs at least one actor; serving's min_replicas 0 (scale to zero) becomes 1.
        "compute": ActorPoolStrategy(min_size=max(stage.scaling.min_replicas, 1), max_size=stage.scaling.max_replicas),
        "batch_size": stage.rows_per_call(),
        "num_cpus": stage.resources.num_cpus,
        "num_gpus": stage.resources.num_gpus,
        "resources": stage.resources.custom or None,
        "batch_format": "pyarrow",
    }


def _block_rows(stages: list[StageConfig]) -> int:
    # Blocks of a few batches: small enough that every pool has work at once (a block is the unit
    # that moves between pools), large enough that per-block overhead stays small.
    return 2 * max(stage.rows_per_call() for stage in stages)


def _rows_to_do(ds: ray.data.Dataset, id_column: str, skip_ids: pa.Array | None) -> ray.data.Dataset:
    """``ds`` without the rows to skip, filtered block by block as read (before the repartition)."""
    skip = None if skip_ids is None else skip_ids.cast(pa.string())
    return ds.map_batches(
        rows_to_do, batch_format="pyarrow", batch_size=None, fn_kwargs={"id_column": id_column, "skip_ids": skip}
    )


def _source(source: str | ray.data.Dataset, columns: dict[str, str | None]) -> ray.data.Dataset:
    """The input as a Dataset, checked to have the named columns."""
    names = input_schema(source).names if isinstance(source, str) else source.schema().names
    missing = {role: name for role, name in columns.items() if name is not None and name not in names}
    if missing:
        wanted = ", ".join(f"{role} column {name!r}" for role, name in missing.items())
        raise ValueError(f"expected {wanted} in the input, got columns {names}")
    return read_input(source) if isinstance(source, str) else source


def caption(
    source: str | ray.data.Dataset,
    *,
    config: str | OmnistageConfig = "shapes",
    modality: Modality = "image",
    id_column: str = "id",
    media_column: str | None = None,
    prompt_column: str | None = None,
    prompt: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
    media_root: str | None = None,
    skip_ids: pa.Array | None = None,
    run_id: str | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of captions: one output row per input row (rows in ``skip_ids`` dropped).

    ``source`` is a path or URI of Parquet or Arrow IPC data, or a Dataset of your own.
    ``media_column`` (default: the modality's name) holds encoded bytes, paths (relative ones are
    read from ``media_root``, by default the input's folder), ``{bytes, path}`` structs, or arrays
    (e.g. the ``image`` column of ``ray.data.read_images``). The prompt is ``prompt_column``'s
    value, else ``prompt``, else "Describe this <modality>.". The schema is the id column then
    :data:`CAPTION_SCHEMA`.
    """
    cfg = _config(config)
    if modality not in DEFAULT_PROMPTS:
        raise ValueError(f"expected a modality in {list(DEFAULT_PROMPTS)}, got {modality!r}")
    encoder, projector, llm = (_stage_config(cfg, name, "caption") for name in understanding(modality))
    media_column = media_column or modality
    ds = _source(source, {"id": id_column, "media": media_column, "prompt": prompt_column})
    check_fit(cfg, understanding(modality))
    if media_root is None and isinstance(source, str):
        media_root = media_root_of(source)

    ds = _rows_to_do(ds, id_column, skip_ids)
    ds = ds.repartition(target_num_rows_per_block=_block_rows([encoder, projector, llm]))
    ds = ds.map_batches(
        prepare_caption,
        batch_format="pyarrow",
        fn_kwargs={
            "modality": modality,
            "id_column": id_column,
            "media_column": media_column,
            "prompt_column": prompt_column,
            "prompt": prompt or DEFAULT_PROMPTS[modality],
            "media_root": media_root,
            "num_frames": _frames_per_video(encoder) if modality == "video" else None,
            "seed": seed,
            "limits": cfg.server.limits,
        },
    )
    ds = ds.map_batches(EncoderUDF, fn_constructor_args=(encoder, modality), **_pool(encoder))
    ds = ds.map_batches(InputProjectorUDF, fn_constructor_args=(projector, modality), **_pool(projector))
    ds = ds.map_batches(
        LLMUDF,
        fn_constructor_args=(llm,),
        fn_constructor_kwargs={
            "modality": modality,
            "force": None,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "answer_column": "answer",
        },
        **_pool(llm),
    )
    constants = {"modality": modality, "model": cfg.name, "run_id": run_id}
    return ds.map_batches(
        finish, batch_format="pyarrow", fn_kwargs={"id_column": id_column, "schema": CAPTION_SCHEMA, "constants": constants}
    )


def generate(
    source: str | ray.data.Dataset,
    *,
    config: str | OmnistageConfig = "shapes",
    modality: Modality = "image",
    id_column: str = "id",
    prompt_column: str = "prompt",
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    skip_ids: pa.Array | None = None,
    run_id: str | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of generated media: one output row per input row (rows in ``skip_ids``
    dropped). The LLM answers each prompt with ``modality``'s signal tokens forced; the media are
    seeded per row from ``seed`` and the row's id. The schema is the id column then
    :data:`GENERATE_SCHEMA`; ``media`` holds PNG, MP4 or GIF (per the generator's ``format``), or
    WAV bytes.
    """
    cfg = _config(config)
    if modality not in DEFAULT_PROMPTS:
        raise ValueError(f"expected a modality in {list(DEFAULT_PROMPTS)}, got {modality!r}")
    llm, projector, generator = (_stage_config(cfg, name, "generate") for name in generation(modality))
    ds = _source(source, {"id": id_column, "prompt": prompt_column})
    check_fit(cfg, generation(modality))

    ds = _rows_to_do(ds, id_column, skip_ids)
    ds = ds.repartition(target_num_rows_per_block=_block_rows([llm, projector, generator]))
    ds = ds.map_batches(
        prepare_generate,
        batch_format="pyarrow",
        fn_kwargs={"id_column": id_column, "prompt_column": prompt_column, "seed": seed},
    )
    ds = ds.map_batches(
        LLMUDF,
        fn_constructor_args=(llm,),
        fn_constructor_kwargs={
            "modality": None,
            "force": modality,
            "max_tokens": max_tokens or llm.defaults.generation_max_tokens,
            # Greedy by default, as on the generation routes: the text shapes the signal states.
            "temperature": temperature,
            "answer_column": "text",
        },
        **_pool(llm),
    )
    ds = ds.map_batches(OutputProjectorUDF, fn_constructor_args=(projector, modality), **_pool(projector))
    ds = ds.map_batches(GeneratorUDF, fn_constructor_args=(generator, modality), **_pool(generator))
    constants = {"modality": modality, "model": cfg.name, "run_id": run_id}
    return ds.map_batches(
        finish, batch_format="pyarrow", fn_kwargs={"id_column": id_column, "schema": GENERATE_SCHEMA, "constants": constants}
    )


# --- running a job to Parquet, with resume and a summary -----------------------------------------


@dataclass
class JobSummary:
    """What one run did. ``rows_done`` counts rows written by this run, failed ones included."""

    job: str
    output: str
    run_id: str
    rows_done: int
    rows_failed: int
    rows_skipped: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 3)}

    def __str__(self) -> str:
        return (
            f"{self.job} run {self.run_id}: {self.rows_done} rows done ({self.rows_failed} failed), "
            f"{self.rows_skipped} already in the output; {self.seconds:.1f} s, "
            f"{self.rows_per_second:.2f} rows/s -> {self.output}"
        )


def _run(job: str, source: str, output: str, id_column: str, build: Any) -> JobSummary:
    """Write ``build(skip_ids=..., run_id=...)`` to ``output`` after skipping the ids already there."""
    from ray.data.datasource import FilenameProvider

    start = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    done = written_ids(output, id_column)
    skip = None if done is None else done.cast(pa.string())
    ids = input_ids(source, id_column)
    skipped = 0 if done is None else len(done)
    if ids is not None:
        _check_unique(ids, id_column)
        skipped = 0 if skip is None else pc.sum(pc.is_in(ids.cast(pa.string()), value_set=skip)).as_py() or 0
        if skipped == len(ids):
            # Nothing left: no pools to start.
            return _summary(job, output, run_id, pa.chunked_array([], pa.string()), skipped, start)
    ds = build(skip_ids=skip, run_id=run_id)  # lazy: checks the options and the stages' fit, starts no pool
    prefix = f"{job}-{run_id}"
    ds.write_parquet(
        output,
        filename_provider=FilenameProvider(dataset_uuid=prefix, file_format="parquet"),
        min_rows_per_file=ROWS_PER_FILE[job],
    )
    return _summary(job, output, run_id, _run_errors(output, prefix), skipped, start)


def _check_unique(ids: pa.Array, id_column: str) -> None:
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]["values"].as_py()
        raise ValueError(
            f"expected unique ids in column {id_column!r} (the resume key), got {len(repeated)} ids "
            f"that repeat, e.g. {example!r}"
        )


def _summary(job: str, output: str, run_id: str, errors: pa.ChunkedArray, skipped: int, start: float) -> JobSummary:
    summary = JobSummary(
        job=job,
        output=output,
        run_id=run_id,
        rows_done=len(errors),
        rows_failed=len(errors) - errors.null_count,
        rows_skipped=skipped,
        seconds=time.perf_counter() - start,
    )
    log.info("batch_job_done", **summary.as_dict())
    return summary


def _run_errors(output: str, prefix: str) -> pa.ChunkedArray:
    """The ``error`` column of the files one run wrote."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = resolve(output)
    files = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(path))
        if info.type == pafs.FileType.File and info.base_name.startswith(prefix)
    ]
    if not files:
        return pa.chunked_array([], pa.string())
    return pq.ParquetDataset(files, filesystem=fs).read(columns=["error"]).column("error")


def run_caption(source: str, output: str, **options: Any) -> JobSummary:
    """Caption ``source`` into the Parquet folder ``output``, skipping ids already there.

    Takes :func:`caption`'s options; returns what the run did. Like any Ray Data job it joins the
    Ray cluster of ``RAY_ADDRESS`` (set under ``ray job submit``) or starts a local one.
    """
    cfg = _config(options.pop("config", "shapes"))
    return _run(
        "caption", source, output, options.get("id_column", "id"), lambda **kw: caption(source, config=cfg, **options, **kw)
    )


def run_generate(source: str, output: str, **options: Any) -> JobSummary:
    """Generate media for ``source``'s prompts into the Parquet folder ``output``, skipping ids
    already there. Takes :func:`generate`'s options; returns what the run did."""
    cfg = _config(options.pop("config", "shapes"))
    return _run(
        "generate", source, output, options.get("id_column", "id"), lambda **kw: generate(source, config=cfg, **options, **kw)
    )


def _frames_per_video(encoder: Any) -> int:
    """What the video encoder samples (its config's, else its checkpoint's, else 5), so the prepare
    step decodes only those frames."""
    from omnistage.actors.video_encoder import frames_per_video

    return frames_per_video(encoder)
