"""Stage 03: the catalog artifact that the feature-lookup model serves from.

Item titles are encoded with exactly the served tokenizer and ONNX encoder
(`model_repository.runtime`; the compressed encoder unless `compression` is None), so an item's
stored embedding equals what `text_embed` returns for its title. Tables are written in sorted-id order with a cold-start row 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conversion import stages
from conversion.catalog_generator import Catalog, CatalogSettings, build_catalog
from conversion.compress_encoder import CompressSettings
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON, EncoderExportSettings, export_encoder
from conversion.prune_encoder import PruneSettings
from conversion.served_encoder import EncoderGate, UnprunedInt8Settings, choose_served_encoder
from model_repository import spec
from model_repository.runtime import (BucketTokenizer, CatalogTables, encode_texts, ort_session, stored_embeddings,
                                      user_bucket)

log = logging.getLogger(__name__)

STAGE = "05-catalog-artifact"


@dataclass(frozen=True)
class CatalogArtifactSettings:
    encoder: EncoderExportSettings = field(default_factory=EncoderExportSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    # The served encoder's candidates: pruned + INT8 first, then the unpruned SmoothQuant INT8; the
    # first that passes `gate` is served (conversion.served_encoder). compression=None serves (and
    # encodes with) the FP32 export, and then unpruned and gate are None too.
    compression: CompressSettings | None = field(default_factory=CompressSettings)
    unpruned: UnprunedInt8Settings | None = field(default_factory=UnprunedInt8Settings)
    gate: EncoderGate | None = field(default_factory=EncoderGate)
    batch_size: int = 64
    # Bumped when the artifact's contents change for the same inputs (v2: user bucket hash,
    # v3: item-id hash column, v4: item id hash index).
    format_version: int = 4
    # float16 halves the largest table (10M x 384 items: 7.7 GB instead of 15), int8 (per-row scale)
    # quarters it; docs/catalog.md has their measured effect on ranking.
    embedding_dtype: str = "float32"

    def __post_init__(self):
        # The teacher and the distillation text must be the ones this artifact names, or the hash
        # would describe one model while the folder holds another.
        if self.compression is not None and (self.compression.prune.teacher != self.encoder
                                             or self.compression.prune.catalog != self.catalog):
            raise ValueError("compression settings must use the same encoder and catalog as the artifact")
        if self.unpruned is not None and (self.unpruned.teacher != self.encoder or self.unpruned.catalog != self.catalog):
            raise ValueError("unpruned INT8 settings must use the same encoder and catalog as the artifact")
        if self.compression is not None and self.gate is None:
            raise ValueError("a compressed encoder needs a gate (EncoderGate)")

    @classmethod
    def compose(cls, encoder: EncoderExportSettings = EncoderExportSettings(),
                catalog: CatalogSettings = CatalogSettings(), prune: PruneSettings | None = PruneSettings(),
                gate: EncoderGate | None = None, unpruned: UnprunedInt8Settings | None = UnprunedInt8Settings(),
                **compress) -> "CatalogArtifactSettings":
        """Settings whose nested copies of encoder and catalog agree; prune=None serves FP32.

        gate: None = the default gate on the bundled broad set; unpruned=None: no fallback candidate."""
        if prune is None:
            return cls(encoder=encoder, catalog=catalog, compression=None, unpruned=None, gate=None)
        compression = CompressSettings(prune=dataclasses.replace(prune, teacher=encoder, catalog=catalog), **compress)
        gate = gate if gate is not None else EncoderGate.for_texts(None)
        if unpruned is None:
            gate = dataclasses.replace(gate, candidates=tuple(c for c in gate.candidates if c != "unpruned int8"))
        else:
            unpruned = dataclasses.replace(unpruned, teacher=encoder, catalog=catalog)
        return cls(encoder=encoder, catalog=catalog, compression=compression, unpruned=unpruned, gate=gate)


def served_encoder(settings: CatalogArtifactSettings) -> Path:
    """The encoder folder this artifact is encoded with and served beside (built if needed)."""
    if settings.compression is None:
        return export_encoder(settings.encoder)
    return choose_served_encoder(settings.encoder, settings.compression, settings.unpruned, settings.gate)


def feature_tables(catalog: Catalog, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item features for `item_ids` (sorted; ids the catalog lacks get the cold-start codes but
    their own id hash), and the sorted user ids with their features. Column order is
    spec.ITEM_FEATURE_COLUMNS; the item-id hash is computed here once, so training (which reads
    these tables) and serving (which looks rows up in them) cannot hash differently."""
    from conversion.ranker_model import item_bucket

    order = np.argsort(catalog.item_ids, kind="stable")
    known_ids = catalog.item_ids[order]
    pos = np.minimum(np.searchsorted(known_ids, item_ids), max(len(known_ids) - 1, 0))
    known = known_ids[pos] == item_ids
    item_features = np.zeros((len(item_ids) + 1, len(spec.ITEM_FEATURE_COLUMNS)), dtype=np.int64)
    codes = np.stack([catalog.category, catalog.brand, catalog.price_bucket], axis=1)[order][pos]
    item_features[1:, :3] = np.where(known[:, None], codes, 0)
    item_features[1:, 3] = item_bucket(item_ids)

    user_order = np.argsort(catalog.user_ids, kind="stable")
    user_ids = catalog.user_ids[user_order]
    user_features = np.zeros((len(user_ids) + 1, len(spec.USER_FEATURE_COLUMNS)), dtype=np.int64)
    user_features[1:] = np.stack([user_bucket(user_ids), catalog.segment[user_order]], axis=1)
    return item_features, user_ids, user_features


def build_tables(catalog: Catalog, encoder_dir: Path, batch_size: int = 64, threads: int = 2,
                 progress: bool = True, embedding_dtype: str = "float32") -> tuple[CatalogTables, list[str]]:
    tokenizer = BucketTokenizer(encoder_dir / TOKENIZER_JSON)
    session = ort_session(encoder_dir / ENCODER_ONNX, threads=threads)
    item_order = np.argsort(catalog.item_ids, kind="stable")
    titles = [catalog.titles[i] for i in item_order]
    emb = encode_texts(tokenizer, session, titles, batch_size=batch_size, progress=progress, desc="item titles")
    item_embeddings, scales = stored_embeddings(np.concatenate([np.zeros((1, emb.shape[1]), emb.dtype), emb]),
                                                embedding_dtype)
    item_ids = catalog.item_ids[item_order]
    item_features, user_ids, user_features = feature_tables(catalog, item_ids)
    tables = CatalogTables(item_ids=item_ids, item_embeddings=item_embeddings, item_features=item_features,
                           user_ids=user_ids, user_features=user_features, item_embedding_scales=scales)
    return tables, titles


def artifact_from_embedding_shards(shards: Path, catalog: Catalog, out: Path, embedding_dtype: str = "float32",
                                   progress: bool = True) -> Path:
    """A catalog artifact whose item embeddings come from `make catalog`'s Parquet shards
    (conversion.encode_items: `item_id`, `embedding`) and whose features come from `catalog`.

    Streaming: ids are read first (8 bytes an item), then embeddings are scattered shard by shard
    into the memory-mapped table, so a 10M-item catalog never sits in memory. The folder appears
    only once complete; serve it with `make swap-catalog CATALOG=<out>`."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from conversion.encode_items import EMBEDDING, ID

    files = sorted(Path(shards).glob("*.parquet"))
    if not files:
        raise ValueError(f"no .parquet embedding shards in {shards} (run `make catalog`)")
    ids = np.concatenate([pq.read_table(f, columns=[ID]).column(ID).to_numpy() for f in files]).astype(np.int64)
    item_ids = np.sort(ids, kind="stable")
    if len(item_ids) > 1 and (np.diff(item_ids) == 0).any():
        raise ValueError(f"{shards}: item ids repeat across shards ({len(item_ids) - len(np.unique(item_ids))} duplicates)")
    dim = pq.read_schema(files[0]).field(EMBEDDING).type.list_size
    out = Path(out)
    with stages.atomic_folder(out) as tmp:
        emb = np.lib.format.open_memmap(tmp / "item_embeddings.npy", mode="w+", dtype=embedding_dtype,
                                        shape=(len(item_ids) + 1, dim))
        emb[0] = 0
        scales = np.zeros(len(item_ids) + 1, np.float32) if embedding_dtype == "int8" else None
        for f in tqdm(files, desc="embedding shards", disable=not progress):
            for batch in pq.ParquetFile(f).iter_batches(columns=[ID, EMBEDDING], batch_size=65_536):
                rows = np.searchsorted(item_ids, batch.column(0).to_numpy()) + 1
                stored, block_scales = stored_embeddings(batch.column(1).flatten().to_numpy().reshape(-1, dim),
                                                         embedding_dtype)
                emb[rows] = stored
                if scales is not None:
                    scales[rows] = block_scales
        item_features, user_ids, user_features = feature_tables(catalog, item_ids)
        CatalogTables(item_ids=item_ids, item_embeddings=emb, item_features=item_features, user_ids=user_ids,
                      user_features=user_features, item_embedding_scales=scales,
                      ).save(tmp, meta={"embeddings": str(Path(shards).resolve())})
        del emb
    return out


def build_catalog_artifact(settings: CatalogArtifactSettings, force: bool = False) -> Path:
    folder = stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("catalog artifact up to date: %s", folder)
        return folder
    encoder_dir = served_encoder(settings)
    catalog = Catalog.load(build_catalog(settings.catalog))
    tables, titles = build_tables(catalog, encoder_dir, settings.batch_size,
                                  embedding_dtype=settings.embedding_dtype)
    with stages.atomic_stage(folder, settings) as tmp:
        tables.save(tmp, titles=titles, meta={"encoder": encoder_dir.name})
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.catalog_artifact", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact for these settings exists")
    p.add_argument("--embeddings", type=Path,
                   help="instead: assemble an artifact from `make catalog`'s embedding shards (features from --profile's catalog)")
    p.add_argument("--profile", default="default", help="with --embeddings: whose catalog supplies the item and user features")
    p.add_argument("--out", type=Path, help="with --embeddings: the artifact folder to write")
    p.add_argument("--dtype", choices=CatalogTables.EMBEDDING_DTYPES, default="float32",
                   help="with --embeddings: stored embedding precision")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.embeddings is None:
        print(build_catalog_artifact(CatalogArtifactSettings(), force=args.force))
        return 0
    from conversion.build_models import PROFILES, profile_settings

    try:
        if args.out is None:
            raise ValueError("--out is required with --embeddings")
        if args.profile not in PROFILES:
            raise ValueError(f"--profile must be one of {sorted(PROFILES)}, got {args.profile!r}")
        if not args.embeddings.is_dir():
            raise ValueError(f"--embeddings {args.embeddings} is not a folder")
        catalog = Catalog.load(build_catalog(profile_settings(args.profile).artifact.catalog))
        print(artifact_from_embedding_shards(args.embeddings, catalog, args.out, args.dtype))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
