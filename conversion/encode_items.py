"""Offline item encoding on Ray Data: title shards in, embedding shards out (`make catalog`).

Input: a folder (or glob) of Parquet or CSV shards with columns `item_id` (int64) and `title`
(string); by default the profile's generated catalog, exported once to Parquet shards. Output: one
Parquet shard per input shard, same file stem, with `item_id` and `embedding` (fixed-size list of
float32, L2-normalised), encoded by exactly the served encoder and tokenizer
(`model_repository.runtime`: `BucketTokenizer`, `ort_session`, `encode_texts`), so a stored
embedding equals what `text_embed` returns for the title.

Ray Data reads only the pending shards (with their source path as a column) and runs
`map_batches` over an actor pool, one ONNX Runtime session per actor. Locally Ray starts in this
process with a small object store; `--address` or RAY_ADDRESS sends the same job to a cluster.

Why the driver writes the shards. Resuming needs per-shard atomic commits: a shard counts only
when its output has every row of its input. Ray's `write_parquet` names its own files, may split
or merge blocks across input files, and gives no per-file commit point, so a killed job leaves
files that cannot be told apart from finished ones. Instead the driver streams the encoded batches
(`iter_batches`: bounded by Ray Data's backpressure, the dataset is never collected) and appends
them to one pyarrow ParquetWriter per shard in flight, writing to a temporary name; when a shard
has received as many rows as its input holds, the file is closed, its row count read back and
compared, and only then renamed into place (rename is atomic on one filesystem). The cost is that
all output bytes pass through the driver: 1.5 KB per item at d=384, far below what the actors
produce per second of CPU, and the driver needs the output filesystem mounted (a shared volume in
the RayJob, deploy/k8s/rayjob). Rows inside an output shard are in arrival order, not input order.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from conversion import stages
from model_repository.runtime import ENCODER_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)

ID, TITLE, EMBEDDING = "item_id", "title", "embedding"
PATH = "path"  # the column read_parquet/read_csv add with include_paths=True
SUFFIXES = (".parquet", ".csv")
TMP_MARK = ".tmp-"
CATALOG_SHARDS_STAGE = "07-catalog-shards"
EMBEDDINGS_STAGE = "08-item-embeddings"
# Providers tried in this order on each actor's node; ONNX Runtime falls back to CPU for what a
# GPU provider cannot run.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class EncodeInputError(ValueError):
    """The input cannot be encoded: missing folder, no shards, a missing column."""


class EncodeVerificationError(RuntimeError):
    """An output shard is missing or does not hold exactly its input shard's item ids."""


@dataclass(frozen=True)
class EncodeSettings:
    input: str  # folder or glob of .parquet / .csv shards
    output: Path
    encoder_dir: Path  # the served encoder folder (encoder.onnx + tokenizer.json)
    actors: int = 2
    threads_per_actor: int = 1
    gpus_per_actor: float = 0.0
    # Rows per ONNX Runtime run (encode_texts).
    batch_size: int = 64
    # Rows per Ray block and per batch handed to an actor: a block is the unit an actor takes, so
    # blocks much smaller than a shard let every actor work on a catalog of few shards.
    rows_per_block: int = 1024
    # Rows buffered per output shard before a row group is written.
    row_group_rows: int = 8192
    # None: RAY_ADDRESS if set, else a local Ray started here.
    address: str | None = None
    # Local Ray only: the object store holds blocks in flight, not the dataset (streaming).
    object_store_mb: int = 512
    progress: bool = True

    def __post_init__(self):
        if min(self.actors, self.threads_per_actor, self.batch_size, self.rows_per_block) < 1:
            raise ValueError("actors, threads_per_actor, batch_size and rows_per_block must be >= 1")


@dataclass
class EncodeResult:
    output: Path
    rows: dict[str, int]  # output shard name -> rows, every shard
    encoded: list[str] = field(default_factory=list)  # shards this run wrote
    skipped: list[str] = field(default_factory=list)  # shards already committed before this run
    wall_s: float = 0.0  # whole call, Ray start-up included
    ray_start_s: float = 0.0  # ray.init (0 when reused or not needed)
    first_batch_s: float = 0.0  # from starting the dataset to the first encoded batch (actor start-up)
    steady_rows: int = 0  # rows that arrived after the first batch ...
    steady_s: float = 0.0  # ... and the time they took

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


# ---- shards -------------------------------------------------------------------------------------

def list_shards(input: str | Path) -> list[Path]:
    """The input shards, sorted; a folder means every .parquet/.csv file directly inside it."""
    text = str(input)
    if any(c in text for c in "*?["):
        paths = [Path(p) for p in glob.glob(text)]
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise EncodeInputError(f"input folder {folder} does not exist")
        paths = list(folder.iterdir())
    shards = sorted(p.resolve() for p in paths if p.is_file() and p.suffix in SUFFIXES and TMP_MARK not in p.name)
    if not shards:
        raise EncodeInputError(f"no .parquet or .csv shards in {text}")
    stems = [p.stem for p in shards]
    if len(set(stems)) != len(stems):
        raise EncodeInputError(f"two input shards share a name stem in {text}; output shards are named by stem")
    return shards


def output_shard(output: Path, shard: Path) -> Path:
    return Path(output) / f"{shard.stem}.parquet"


def _csv_convert():
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # Titles such as "1984" must stay strings; ids must be int64 whatever the file's first rows look like.
    return pacsv.ConvertOptions(column_types={ID: pa.int64(), TITLE: pa.string()})


def _columns(shard: Path) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if shard.suffix == ".parquet":
        return pq.read_schema(shard).names
    with pacsv.open_csv(shard, convert_options=_csv_convert()) as reader:
        return reader.schema.names


def read_ids(shard: Path) -> np.ndarray:
    """The item ids of an input or output shard (one column read, not the titles)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if shard.suffix == ".parquet":
        table = pq.read_table(shard, columns=[ID])
    else:
        options = _csv_convert()
        options.include_columns = [ID]
        table = pacsv.read_csv(shard, convert_options=options)
    return table.column(ID).to_numpy()


def shard_rows(shard: Path) -> int:
    import pyarrow.parquet as pq

    if shard.suffix == ".parquet":
        return pq.ParquetFile(shard).metadata.num_rows
    return len(read_ids(shard))


def check_input(shards: list[Path]) -> dict[Path, int]:
    """Row count of every shard, after checking that each has the required columns."""
    rows = {}
    for shard in shards:
        try:
            missing = {ID, TITLE} - set(_columns(shard))
        except Exception as e:  # pyarrow raises several types for an unreadable file
            raise EncodeInputError(f"cannot read {shard}: {e}") from None
        if missing:
            raise EncodeInputError(f"{shard} lacks column(s) {', '.join(sorted(missing))}")
        rows[shard] = shard_rows(shard)
    return rows


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Half-written shards of an interrupted run: they never count, so they go."""
    stale = [p for p in Path(output).glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d unfinished temporary shard(s) in %s", len(stale), output)
    return stale


# ---- encoding -----------------------------------------------------------------------------------

def execution_providers() -> list[str]:
    """GPU providers that this node's onnxruntime reports, then CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def encoder_dim(encoder_dir: Path) -> int:
    """Embedding width from the ONNX graph itself: the image's bundle has no export report."""
    from model_repository import spec
    from model_repository.runtime import ort_session

    (out,) = [o for o in ort_session(Path(encoder_dir) / ENCODER_FILE).get_outputs()
              if o.name == spec.text_embedding(0).name]
    return int(out.shape[-1])


class TitleEncoder:
    """One Ray actor: one ONNX Runtime session with the served encoder and tokenizer."""

    def __init__(self, encoder_dir: str, threads: int, batch_size: int):
        from model_repository.runtime import BucketTokenizer, ort_session

        self.tokenizer = BucketTokenizer(Path(encoder_dir) / TOKENIZER_FILE)
        self.session = ort_session(Path(encoder_dir) / ENCODER_FILE, threads=threads, providers=execution_providers())
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model_repository.runtime import encode_texts

        emb = encode_texts(self.tokenizer, self.session, [str(t) for t in batch[TITLE]], batch_size=self.batch_size)
        return {ID: batch[ID], PATH: batch[PATH], EMBEDDING: emb}


def _in_ray_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


@contextmanager
def ray_runtime(settings: EncodeSettings) -> Iterator[float]:
    """Connect to Ray (reusing a running one); yields the seconds ray.init took."""
    import ray

    if ray.is_initialized():
        yield 0.0
        return
    t0 = time.perf_counter()
    if _in_ray_cluster(settings.address):
        # The same job, unchanged, on an existing cluster: its resources are the cluster's.
        ray.init(address=settings.address or os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        # Actors take actors x threads CPUs; one more logical CPU lets the (I/O-bound) read tasks
        # schedule beside a pool that fills the machine. A small object store: blocks stream through it.
        # worker_niceness 0: Ray nices its workers (15) to keep its own daemons responsive, but here the
        # actors are the job; niced, they lost the CPU to any other process on a shared 2-core box
        # (1 actor: 460 items/s beside another test run, against 1300/s for the same loop un-niced).
        # Ray waits 30 s for its GCS server to bind; on a loaded 2-core machine it once had not even
        # started logging by then (fresh-clone CI, 2026-12-07; the rerun passed in 43 s). Ray's own
        # knob, unless the caller set it.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        ray.init(num_cpus=max(os.cpu_count() or 1, settings.actors * settings.threads_per_actor + 1),
                 object_store_memory=settings.object_store_mb * 2**20, include_dashboard=False,
                 logging_level=logging.WARNING, _system_config={"worker_niceness": 0})
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()


def _dataset(shards: list[Path], settings: EncodeSettings, dim: int):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # tqdm below counts encoded rows across shards
    # Ray sizes blocks in bytes. Sized for about rows_per_block titles (~150 KB), the embeddings came
    # back in ~100-row blocks whose per-block overhead left the actor idle 60% of the time (measured,
    # 20k titles); sized for rows_per_block embeddings, each actor call returns one block.
    ctx.target_max_block_size = settings.rows_per_block * (4 * dim + 64)
    parts = []
    # Reads are I/O: a fraction of a CPU each, so they never wait behind the actor pool's CPUs.
    parquet = [str(s) for s in shards if s.suffix == ".parquet"]
    csv = [str(s) for s in shards if s.suffix == ".csv"]
    if parquet:
        parts.append(ray.data.read_parquet(parquet, include_paths=True, num_cpus=0.25))
    if csv:
        parts.append(ray.data.read_csv(csv, include_paths=True, num_cpus=0.25, convert_options=_csv_convert()))
    parts = [p.select_columns([ID, TITLE, PATH]) for p in parts]
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    # Streaming (no shuffle) split into rows_per_block-row blocks: a read block holds a whole small
    # shard, or several, and the first actor up took them all while the second sat idle (measured).
    ds = ds.repartition(target_num_rows_per_block=settings.rows_per_block)
    return ds.map_batches(
        TitleEncoder,
        fn_constructor_kwargs={"encoder_dir": str(settings.encoder_dir), "threads": settings.threads_per_actor,
                               "batch_size": settings.batch_size},
        batch_size=settings.rows_per_block,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.threads_per_actor,
        num_gpus=settings.gpus_per_actor or None,
    )


class _ShardWriter:
    """One output shard being written to a temporary name; committed when it has all its rows."""

    def __init__(self, final: Path, expected: int, dim: int, row_group_rows: int):
        import pyarrow as pa

        self.final, self.expected, self.row_group_rows = final, expected, row_group_rows
        self.tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
        self.schema = pa.schema([(ID, pa.int64()), (EMBEDDING, pa.list_(pa.float32(), dim))])
        self.rows = 0
        self._ids: list[np.ndarray] = []
        self._emb: list[np.ndarray] = []
        self._buffered = 0
        self._writer = None

    def add(self, ids: np.ndarray, emb: np.ndarray) -> None:
        self._ids.append(ids)
        self._emb.append(emb)
        self._buffered += len(ids)
        self.rows += len(ids)
        if self._buffered >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        if self._buffered:
            emb = np.ascontiguousarray(np.concatenate(self._emb), dtype=np.float32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
            self._writer.write_table(pa.table([pa.array(np.concatenate(self._ids), pa.int64()), column],
                                              schema=self.schema))
        self._ids, self._emb, self._buffered = [], [], 0

    def commit(self) -> None:
        import pyarrow.parquet as pq

        self._flush()
        self._writer.close()
        written = pq.ParquetFile(self.tmp).metadata.num_rows
        if written != self.expected:
            self.tmp.unlink()
            raise EncodeVerificationError(f"{self.final.name}: wrote {written} rows, input has {self.expected}")
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def _write_empty(final: Path, dim: int) -> None:
    w = _ShardWriter(final, 0, dim, 1)
    w.commit()


def _encode_pending(pending: dict[Path, int], settings: EncodeSettings, result: EncodeResult) -> None:
    from tqdm import tqdm

    dim = encoder_dim(settings.encoder_dir)
    for shard in [s for s, n in pending.items() if n == 0]:
        _write_empty(output_shard(settings.output, shard), dim)
        result.encoded.append(output_shard(settings.output, shard).name)
    todo = {s: n for s, n in pending.items() if n > 0}
    if not todo:
        return
    by_path = {str(s): s for s in todo}
    writers: dict[Path, _ShardWriter] = {}
    with ray_runtime(settings) as start_s, \
            tqdm(total=sum(todo.values()), desc="item titles", unit="item", disable=not settings.progress,
                 mininterval=1.0) as bar:
        result.ray_start_s = start_s
        t0 = time.perf_counter()
        first = None
        try:
            # batch_size=None: each actor call's output block as it is (no re-batching copies).
            for batch in _dataset(list(todo), settings, dim).iter_batches(batch_size=None, batch_format="numpy"):
                now = time.perf_counter()
                if first is None:
                    first = now
                    result.first_batch_s = now - t0
                else:
                    result.steady_rows += len(batch[ID])
                # Batches may mix shards (Ray can coalesce blocks): split by source path.
                paths = batch[PATH]
                for path in np.unique(paths):
                    shard = by_path[str(path)]
                    rows = paths == path
                    w = writers.get(shard)
                    if w is None:
                        w = writers[shard] = _ShardWriter(output_shard(settings.output, shard), todo[shard], dim,
                                                          settings.row_group_rows)
                    w.add(np.asarray(batch[ID][rows], dtype=np.int64), np.asarray(batch[EMBEDDING][rows]))
                    if w.rows >= w.expected:
                        w.commit()
                        del writers[shard]
                        result.encoded.append(w.final.name)
                        log.debug("committed %s (%d rows)", w.final.name, w.rows)
                bar.update(len(paths))
            if first is not None:
                result.steady_s = time.perf_counter() - first
        finally:
            for w in writers.values():  # a shard that never got all its rows stays uncommitted
                w.abort()
    if writers:
        raise EncodeVerificationError(f"{len(writers)} shard(s) got fewer rows than their input: "
                                      f"{', '.join(sorted(w.final.name for w in writers.values()))}")


def verify_output(shards: list[Path], output: Path) -> dict[str, int]:
    """Every input shard has its output shard holding exactly its item ids; rows per output shard."""
    problems, rows = [], {}
    for shard in shards:
        out = output_shard(output, shard)
        if not out.is_file():
            problems.append(f"{out.name}: missing")
            continue
        got, want = read_ids(out), read_ids(shard)
        rows[out.name] = len(got)
        if len(got) != len(want):
            problems.append(f"{out.name}: {len(got)} rows, input {shard.name} has {len(want)}")
        elif not np.array_equal(np.sort(got), np.sort(want)):
            problems.append(f"{out.name}: item ids differ from {shard.name}'s")
    if problems:
        raise EncodeVerificationError("output does not match input (delete the named shards and rerun): "
                                      + "; ".join(problems))
    return rows


def encode_items(settings: EncodeSettings) -> EncodeResult:
    """Encode every input shard that has no committed output shard yet, then verify all of them."""
    t0 = time.perf_counter()
    for name in (ENCODER_FILE, TOKENIZER_FILE):
        if not (Path(settings.encoder_dir) / name).is_file():
            raise EncodeInputError(f"encoder folder {settings.encoder_dir} lacks {name}")
    shards = list_shards(settings.input)
    expected = check_input(shards)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    pending = {s: n for s, n in expected.items() if not output_shard(output, s).is_file()}
    result = EncodeResult(output=output, rows={},
                          skipped=[output_shard(output, s).name for s in shards if s not in pending])
    log.info("%d shard(s), %d rows; %d already encoded, %d to encode with %d actor(s) x %d thread(s)",
             len(shards), sum(expected.values()), len(result.skipped), len(pending), settings.actors,
             settings.threads_per_actor)
    if pending:
        _encode_pending(pending, settings, result)
    result.rows = verify_output(shards, output)
    result.wall_s = time.perf_counter() - t0
    return result


# ---- the profile's defaults ---------------------------------------------------------------------

def profile_encoder(profile: str, encoder: str = "int8") -> Path:
    """The served encoder folder of a profile (built if needed: the same stage `make models` runs)."""
    from conversion.build_models import profile_settings
    from conversion.catalog_artifact import served_encoder

    return served_encoder(profile_settings(profile, encoder=encoder).artifact)


def export_catalog_shards(profile: str, n_shards: int = 4) -> Path:
    """The profile's generated catalog as `n_shards` Parquet shards (an atomic, cached stage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conversion.build_models import profile_settings
    from conversion.catalog_generator import Catalog, build_catalog

    catalog_settings = profile_settings(profile).artifact.catalog
    folder = stages.stage_dir(CATALOG_SHARDS_STAGE, {"catalog": catalog_settings, "shards": n_shards})
    if stages.is_complete(folder):
        return folder
    catalog = Catalog.load(build_catalog(catalog_settings))
    with stages.atomic_stage(folder, {"catalog": catalog_settings, "shards": n_shards}) as tmp:
        for i, rows in enumerate(np.array_split(np.arange(len(catalog.item_ids)), n_shards)):
            table = pa.table({ID: pa.array(catalog.item_ids[rows], pa.int64()),
                              TITLE: pa.array([catalog.titles[r] for r in rows], pa.string())})
            pq.write_table(table, tmp / f"items-{i:05d}.parquet")
    return folder


def default_output(input: str, encoder_dir: Path) -> Path:
    """Named after the encoder and the input, so a rerun resumes and a new encoder starts afresh."""
    return stages.stage_dir(EMBEDDINGS_STAGE, {"encoder": Path(encoder_dir).resolve().name,
                                                "input": str(Path(input).resolve()) if "*" not in input else input})


# ---- CLI ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conversion.encode_items", description=__doc__.splitlines()[0])
    p.add_argument("--input", help="folder or glob of .parquet/.csv shards with item_id and title "
                                   "(default: the profile's generated catalog, exported to Parquet shards)")
    p.add_argument("--output", type=Path, help="folder for the embedding shards (default: under the build folder)")
    p.add_argument("--profile", choices=("default", "ci"), default="default",
                   help="whose served encoder and catalog to use (default: %(default)s)")
    p.add_argument("--encoder", choices=("int8", "fp32"), default="int8", help="the profile's served encoder kind")
    p.add_argument("--encoder-dir", type=Path,
                   help="a served encoder folder (encoder.onnx + tokenizer.json), e.g. the image's bundle; "
                        "overrides --profile/--encoder")
    p.add_argument("--shards", type=int, default=4, help="shards when exporting the profile's catalog")
    p.add_argument("--actors", type=int, default=2, help="encoder actors (one ONNX Runtime session each)")
    p.add_argument("--threads-per-actor", type=int, default=1, help="ORT intra-op threads = CPUs per actor")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor on a GPU cluster")
    p.add_argument("--batch-size", type=int, default=64, help="titles per ONNX Runtime run")
    p.add_argument("--rows-per-block", type=int, default=1024, help="rows per Ray block / actor batch")
    p.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--object-store-mb", type=int, default=512, help="local Ray's object store")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> EncodeSettings:
    encoder_dir = args.encoder_dir or profile_encoder(args.profile, args.encoder)
    input = args.input or str(export_catalog_shards(args.profile, args.shards))
    return EncodeSettings(input=input, output=args.output or default_output(input, encoder_dir),
                          encoder_dir=encoder_dir, actors=args.actors, threads_per_actor=args.threads_per_actor,
                          gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                          rows_per_block=args.rows_per_block, address=args.address,
                          object_store_mb=args.object_store_mb, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        result = encode_items(settings)
    except (EncodeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EncodeVerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"embedding shards: {result.output}")
    for name, n in sorted(result.rows.items()):
        print(f"  {name}: {n} rows")
    print(f"total: {result.total_rows} rows in {len(result.rows)} shard(s); encoded {len(result.encoded)}, "
          f"skipped {len(result.skipped)} already finished; {result.wall_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
