"""Datasets in and out of the batch jobs: input formats, media cells, resume ids, sample data.

Everything here goes through pyarrow's filesystems, so a local path, ``file://``, ``s3://``,
``gs://`` and ``hdfs://`` all work wherever a path is taken.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import structlog

from omnistage.actors.errors import InvalidInputError, PayloadTooLargeError

if TYPE_CHECKING:
    import ray.data

log = structlog.get_logger(__name__)

PARQUET_EXTENSIONS = ("parquet", "pq")
ARROW_EXTENSIONS = ("arrow", "feather", "ipc", "arrows")
# Where resume moves output files it cannot read (a write cut short by a crash). A leading
# underscore hides the folder from pyarrow's dataset discovery, and the suffix from Ray Data's.
PARTIAL_DIR = "_partial"
# A media file larger than this is refused before it is read whole; decoders bound pixels and
# seconds on top of this.
MAX_MEDIA_BYTES = 256 * 1024 * 1024


# --- paths and filesystems -----------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``path`` (a local path or a URI) and the path inside it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _files_under(fs: pafs.FileSystem, path: str) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def _extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _hidden(path: str, root: str) -> bool:
    """Whether any part of ``path`` below ``root`` starts with ``_`` or ``.`` (pyarrow skips those)."""
    relative = path[len(root) :].lstrip("/")
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def input_format(path: str) -> Literal["parquet", "arrow"]:
    """``parquet`` or ``arrow`` (Arrow IPC: Feather v2 files or IPC streams), from file extensions."""
    fs, local = resolve(path)
    if fs.get_file_info(local).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    extensions = {_extension(f) for f in _files_under(fs, local) if not _hidden(f, local)}
    if extensions & set(PARQUET_EXTENSIONS):
        return "parquet"
    if extensions & set(ARROW_EXTENSIONS):
        return "arrow"
    raise ValueError(
        f"expected Parquet (.{', .'.join(PARQUET_EXTENSIONS)}) or Arrow IPC "
        f"(.{', .'.join(ARROW_EXTENSIONS)}) files in {path!r}, got extensions {sorted(extensions) or 'none'}"
    )


def media_root_of(path: str) -> str:
    """Where relative media paths in the dataset at ``path`` are resolved: its folder."""
    fs, local = resolve(path)
    if fs.get_file_info(local).type == pafs.FileType.Directory:
        return path
    return path.rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(os.path.abspath(path))


# --- reading the input ---------------------------------------------------------------------------


def _ipc_datasource_class() -> type:
    """Defined on first use so that importing this module does not import Ray."""
    from ray.data.datasource import FileBasedDatasource

    class ArrowIPCDatasource(FileBasedDatasource):
        """Arrow IPC files in either layout: the file format (Feather v2, ``ARROW1`` magic) and the
        stream format (e.g. Hugging Face ``datasets`` cache files), one record batch at a time."""

        _FILE_EXTENSIONS = list(ARROW_EXTENSIONS)

        def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> pa.NativeFile:
            return filesystem.open_input_file(path)  # the file format's footer needs seeking

        def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
            is_file_format = f.read(6) == b"ARROW1"
            f.seek(0)
            if is_file_format:
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(pa.ipc.open_stream(f))
            for batch in batches:
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])

    return ArrowIPCDatasource


def _data_files(path: str) -> tuple[pafs.FileSystem, list[str], Literal["parquet", "arrow"]]:
    fmt = input_format(path)
    extensions = PARQUET_EXTENSIONS if fmt == "parquet" else ARROW_EXTENSIONS
    fs, local = resolve(path)
    return fs, [f for f in _files_under(fs, local) if not _hidden(f, local) and _extension(f) in extensions], fmt


def input_schema(path: str) -> pa.Schema:
    """The schema of the input's first data file, read from its footer or header only."""
    fs, files, fmt = _data_files(path)
    if fmt == "parquet":
        return pq.read_schema(files[0], filesystem=fs)
    with fs.open_input_file(files[0]) as f:
        is_file_format = f.read(6) == b"ARROW1"
        f.seek(0)
        return (pa.ipc.open_file(f) if is_file_format else pa.ipc.open_stream(f)).schema


def input_ids(path: str, id_column: str) -> pa.Array | None:
    """The input's id column, read alone (Parquet and Arrow IPC files read only that column), or
    None where pyarrow's datasets cannot read the input (Arrow IPC streams)."""
    import pyarrow.dataset as pads

    fs, files, fmt = _data_files(path)
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet" if fmt == "parquet" else "ipc")
    except (pa.ArrowInvalid, OSError):
        return None
    if id_column not in dataset.schema.names:
        raise ValueError(f"expected id column {id_column!r} in the input, got columns {dataset.schema.names}")
    return dataset.to_table(columns=[id_column]).column(0).combine_chunks()


def read_input(path: str) -> ray.data.Dataset:
    """A Ray Dataset over the Parquet or Arrow IPC data at ``path`` (a file, a folder, a URI)."""
    import ray.data

    if input_format(path) == "parquet":
        return ray.data.read_parquet(path, file_extensions=list(PARQUET_EXTENSIONS))
    return ray.data.read_datasource(_ipc_datasource_class()(path, file_extensions=list(ARROW_EXTENSIONS)))


# --- media cells ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _folder_filesystem(folder: str) -> tuple[pafs.FileSystem, str]:
    # One filesystem per folder: building one per file costs a round trip on object stores.
    return resolve(folder)


class MediaReader:
    """Turns one media cell into what ``parse_messages`` takes: bytes and arrays pass through,
    paths are read through pyarrow's filesystems (relative ones from ``root``), and a Hugging Face
    ``{"bytes", "path"}`` struct gives its bytes, else its path."""

    def __init__(self, root: str | None, max_bytes: int = MAX_MEDIA_BYTES):
        self.root = root
        self.max_bytes = max_bytes

    def __call__(self, value: Any, column: str) -> bytes | np.ndarray:
        if isinstance(value, dict) and {"bytes", "path"} & set(value):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, np.ndarray)):
            return value
        if isinstance(value, str) and value:
            return self.read(value)
        got = "null" if value is None else "an empty string" if value == "" else f"a value of type {type(value).__name__}"
        raise InvalidInputError(
            f"expected media bytes, a path or a {{bytes, path}} struct in column {column!r}, got {got}"
        )

    def _absolute(self, path: str) -> str:
        if is_uri(path) or os.path.isabs(path) or self.root is None:
            return path
        return f"{self.root.rstrip('/')}/{path}" if is_uri(self.root) else os.path.join(self.root, path)

    def read(self, path: str) -> bytes:
        full = self._absolute(path)
        folder, _, name = full.rpartition("/")
        fs, folder_path = _folder_filesystem(folder or "/")
        with fs.open_input_stream(f"{folder_path.rstrip('/')}/{name}") as f:
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(f"expected a media file of at most {self.max_bytes} bytes, got more at {path!r}")
        return data


# --- resume --------------------------------------------------------------------------------------


def written_ids(output: str, id_column: str) -> pa.Array | None:
    """The ids already in the Parquet files under ``output``, or None when it does not exist yet.

    A file that cannot be read (a write cut short by a crash) is moved to ``_partial/`` under
    ``output`` and its rows count as not written, so the next run redoes them.
    """
    fs, path = resolve(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"expected the output {output!r} to be a directory, got a file")
    chunks = []
    for file in _files_under(fs, path):
        if _hidden(file, path) or _extension(file) != "parquet":
            continue
        try:
            names = pq.read_schema(file, filesystem=fs).names
        except pa.ArrowInvalid as exc:  # no footer; an OSError (e.g. a network error) propagates
            aside = f"{path}/{PARTIAL_DIR}/{os.path.basename(file)}.partial"
            fs.create_dir(f"{path}/{PARTIAL_DIR}")
            fs.move(file, aside)
            log.warning("batch_partial_file_moved", file=file, moved_to=aside, reason=type(exc).__name__)
            continue
        if id_column not in names:
            raise ValueError(
                f"expected column {id_column!r} in the output files under {output!r}, but {file!r} has "
                f"columns {names}; is it another job's output, or was the job run with another id column?"
            )
        chunks.extend(pq.read_table(file, columns=[id_column], filesystem=fs).column(0).chunks)
    if not chunks:
        return pa.array([])
    return pa.concat_arrays([c.cast(chunks[0].type) for c in chunks])


def row_seed(seed: int, row_id: Any) -> int:
    """A per-row seed from the job's seed and the row's id: the same row gets the same sample in
    any run, batch or order."""
    return (seed + zlib.crc32(str(row_id).encode())) % 2**31


# --- sample datasets -----------------------------------------------------------------------------

SampleKind = Literal["image", "video", "audio", "text"]


def _world_rng(rng: np.random.Generator):
    import random

    return random.Random(int(rng.integers(2**31)))


def _sample_media(kind: SampleKind, rng: np.random.Generator) -> bytes:
    """One medium of the shapes world, drawn as others would (any light background and size; clips
    of 4 to 16 frames; sounds at other rates), so the default preset has something to caption."""
    from omnistage.actors.media import encode_png, encode_video, encode_wav
    from omnistage.pipelines import shapes

    world = _world_rng(rng)
    if kind == "image":
        return encode_png(shapes.render(shapes.random_spec(world), world.choice((48, 64, 96)), world, varied=True))
    if kind == "video":
        clip = shapes.render_clip(shapes.random_motion(world), world.randint(4, 16), world.choice((32, 48, 64)), world, varied=True)
        return encode_video(clip, fps=8)
    return encode_wav(*shapes.synthesize(shapes.random_sound(world), world, varied=True))


def _sample_prompt(rng: np.random.Generator) -> str:
    """A drawing instruction of the shapes world ("Draw a small red circle on the left"): `batch
    generate` makes images unless told otherwise."""
    from omnistage.pipelines import shapes

    return shapes.instruction(_world_rng(rng))[0]


def _corrupt(index: int, good: bytes, kind: SampleKind) -> bytes | None:
    """Bad media of several sorts, in turn: garbage, empty, another modality, cut inside its
    header (libsndfile reads a WAV cut later), null."""
    from omnistage.actors.media import encode_png, encode_wav

    other = encode_wav(np.zeros(800, np.float32), 8000) if kind != "audio" else encode_png(np.zeros((8, 8, 3), np.uint8))
    return [b"\x00not media at all\xff" * 3, b"", other, good[:20], None][index % 5]


def make_sample_dataset(
    output: str | Path,
    rows: int = 200,
    kind: SampleKind = "image",
    *,
    corrupt: int = 0,
    paths: bool = False,
    seed: int = 0,
    file_format: Literal["parquet", "arrow"] = "parquet",
) -> tuple[Path, list[str]]:
    """Write a seeded sample dataset to the folder ``output``; returns the file and the corrupt ids.

    ``kind`` image, video or audio gives columns ``id`` and ``<kind>`` (encoded bytes, or with
    ``paths=True`` paths relative to ``output`` of files under ``output/media/``): input for
    ``batch caption``. ``text`` gives ``id`` and ``prompt``: input for ``batch generate``.
    ``corrupt`` rows, spread evenly, hold bad media (garbage, empty, another modality, truncated,
    null; with ``paths`` a null is a path to a missing file) or, for ``text``, a null prompt.
    """
    if not 0 <= corrupt <= rows:
        raise ValueError(f"expected corrupt between 0 and rows ({rows}), got {corrupt}")
    rng = np.random.default_rng(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    bad = {round(i * rows / corrupt) for i in range(corrupt)} if corrupt else set()
    ids = [f"{kind}-{i:06d}" for i in range(rows)]
    if kind == "text":
        prompts = [None if i in bad else _sample_prompt(rng) for i in range(rows)]
        table = pa.table({"id": ids, "prompt": pa.array(prompts, pa.string())})
    else:
        cells: list[Any] = []
        for i in range(rows):
            data = _sample_media(kind, rng)
            if i in bad:
                data = _corrupt(len([b for b in bad if b < i]), data, kind)
            if paths:
                name = f"media/{ids[i]}.{ {'image': 'png', 'video': 'mp4', 'audio': 'wav'}[kind] }"
                if data is not None:
                    (out / "media").mkdir(exist_ok=True)
                    (out / name).write_bytes(data)
                data = name  # a corrupt row with no data is a path to a file that does not exist
            cells.append(data)
        table = pa.table({"id": ids, kind: pa.array(cells, pa.string() if paths else pa.binary())})
    if file_format == "parquet":
        file = out / "sample.parquet"
        # Small row groups so that readers can split the file.
        pq.write_table(table, file, row_group_size=64)
    else:
        file = out / "sample.arrow"
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=64)
    return file, sorted(ids[i] for i in bad)


def read_output(output: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A job's output folder as one table (files under ``_partial/`` excluded)."""
    fs, path = resolve(str(output))
    return pq.read_table(path, filesystem=fs, columns=columns)

