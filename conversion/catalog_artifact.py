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
from conversion.compress_encoder import CompressSettings, build_compressed_encoder
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON, EncoderExportSettings, export_encoder
from conversion.prune_encoder import PruneSettings
from model_repository import spec
from model_repository.runtime import BucketTokenizer, CatalogTables, encode_texts, ort_session, user_bucket

log = logging.getLogger(__name__)

STAGE = "05-catalog-artifact"


@dataclass(frozen=True)
class CatalogArtifactSettings:
    encoder: EncoderExportSettings = field(default_factory=EncoderExportSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    # The served encoder: pruned + INT8 by default; None serves (and encodes with) the FP32 export.
    compression: CompressSettings | None = field(default_factory=CompressSettings)
    batch_size: int = 64
    # Bumped when the artifact's contents change for the same inputs (v2: user bucket hash,
    # v3: item-id hash column, v4: item id hash index).
    format_version: int = 4
    # float16 halves the largest table (10M x 384 items: 7.7 GB instead of 15); docs/catalog.md
    # has its measured effect on ranking.
    embedding_dtype: str = "float32"

    def __post_init__(self):
        # The teacher and the distillation text must be the ones this artifact names, or the hash
        # would describe one model while the folder holds another.
        if self.compression is not None and (self.compression.prune.teacher != self.encoder
                                             or self.compression.prune.catalog != self.catalog):
            raise ValueError("compression settings must use the same encoder and catalog as the artifact")

    @classmethod
    def compose(cls, encoder: EncoderExportSettings = EncoderExportSettings(),
                catalog: CatalogSettings = CatalogSettings(), prune: PruneSettings | None = PruneSettings(),
                **compress) -> "CatalogArtifactSettings":
        """Settings whose nested copies of encoder and catalog agree; prune=None serves FP32."""
        compression = None if prune is None else CompressSettings(
            prune=dataclasses.replace(prune, teacher=encoder, catalog=catalog), **compress)
        return cls(encoder=encoder, catalog=catalog, compression=compression)


def served_encoder(settings: CatalogArtifactSettings) -> Path:
    """The encoder folder this artifact is encoded with and served beside (built if needed)."""
    if settings.compression is None:
        return export_encoder(settings.encoder)
    return build_compressed_encoder(settings.compression)


def build_tables(catalog: Catalog, encoder_dir: Path, batch_size: int = 64, threads: int = 2,
                 progress: bool = True, embedding_dtype: str = "float32") -> tuple[CatalogTables, list[str]]:
    tokenizer = BucketTokenizer(encoder_dir / TOKENIZER_JSON)
    session = ort_session(encoder_dir / ENCODER_ONNX, threads=threads)
    item_order = np.argsort(catalog.item_ids, kind="stable")
    titles = [catalog.titles[i] for i in item_order]
    emb = encode_texts(tokenizer, session, titles, batch_size=batch_size, progress=progress, desc="item titles")
    d = emb.shape[1]
    item_embeddings = np.zeros((len(titles) + 1, d), dtype=embedding_dtype)
    item_embeddings[1:] = emb
    item_features = np.zeros((len(titles) + 1, len(spec.ITEM_FEATURE_COLUMNS)), dtype=np.int64)
    # Column order is spec.ITEM_FEATURE_COLUMNS; the item-id hash is computed here once, so training
    # (which reads these tables) and serving (which looks rows up in them) cannot hash differently.
    from conversion.ranker_model import item_bucket

    item_features[1:] = np.stack([catalog.category, catalog.brand, catalog.price_bucket,
                                  item_bucket(catalog.item_ids)], axis=1)[item_order]

    user_order = np.argsort(catalog.user_ids, kind="stable")
    user_ids = catalog.user_ids[user_order]
    user_features = np.zeros((len(user_ids) + 1, len(spec.USER_FEATURE_COLUMNS)), dtype=np.int64)
    user_features[1:] = np.stack([user_bucket(user_ids), catalog.segment[user_order]], axis=1)
    tables = CatalogTables(item_ids=catalog.item_ids[item_order], item_embeddings=item_embeddings,
                           item_features=item_features, user_ids=user_ids, user_features=user_features)
    return tables, titles


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_catalog_artifact(CatalogArtifactSettings(), force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
