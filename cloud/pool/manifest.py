"""A pool is a folder of images, or a manifest: a CSV (or Parquet) table of image paths.

Scraped pools usually come as a table: one row per file, a ``path`` column (absolute, or relative
to the manifest's folder), and optionally ``label`` and ``domain`` columns (any other column is
metadata and ignored here). Parquet needs ``pyarrow`` (the ``parquet`` extra; not a dependency of
the device or of the cloud's base install). Rows with an empty path are counted and skipped; a
path that does not exist or does not decode is found when the pool is indexed (counted, listed,
skipped there: see ``cloud/pool/features.py``).
"""

from __future__ import annotations

import csv
import os
from typing import Dict, Iterable, Optional, Sequence

from cloud.log import LOG
from cloud.pool.items import ItemListBuilder
from device_sdk.errors import InputError
from device_sdk.imagefolder import ImageItem, iter_image_folder, no_images_error

MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")


def is_manifest(source: str) -> bool:
    return os.path.splitext(source)[1].lower() in MANIFEST_EXTENSIONS and not os.path.isdir(source)


def scan_pool(source: str, compact: bool = False, folder: Optional[str] = None) -> Sequence[ImageItem]:
    """The images of ``source``: a folder (labels from folder names) or a CSV/Parquet manifest.

    They are gathered straight into an :class:`~cloud.pool.items.ItemList` (a few numpy arrays; no
    Python object per file is kept), returned as it with ``compact``, else as a list. With
    ``folder`` the list's arrays are written to files under it as the scan goes and mapped from
    them (page cache, not the process's memory; nothing is left there: cloud/pool/items.py)."""
    builder = ItemListBuilder(folder if compact else None)
    try:
        _scan_folder(source, builder) if not is_manifest(source) else _scan_manifest(source, builder)
        items = builder.build()
    except BaseException:
        builder.discard()
        raise
    return items if compact else list(items)


def _scan_folder(source: str, builder: ItemListBuilder) -> None:
    if os.path.isfile(source):
        raise InputError(
            f"{source} is a file: a pool is an image folder or a manifest ({', '.join(MANIFEST_EXTENSIONS)})"
        )
    for it in iter_image_folder(source):
        builder.add(it.path, it.label, it.domain)
    if not len(builder):
        raise no_images_error(source)


def _scan_manifest(source: str, builder: ItemListBuilder) -> None:
    if not os.path.isfile(source):
        raise InputError(f"manifest not found: {source}")
    rows = _parquet_rows(source) if source.lower().endswith((".parquet", ".pq")) else _csv_rows(source)
    base = os.path.dirname(os.path.abspath(source))
    empty = 0
    for row in rows:
        path = (row.get("path") or "").strip()
        if not path:
            empty += 1
            continue
        builder.add(
            path if os.path.isabs(path) else os.path.join(base, path),
            (row.get("label") or "").strip(),
            (row.get("domain") or "").strip(),
        )
    if empty:
        LOG.warning("%s: %d row(s) without a path skipped", source, empty)
    if not len(builder):
        raise InputError(f"{source}: no row has a path ({empty} row(s) without one)")
    LOG.info("manifest %s: %d images", source, len(builder))


def _csv_rows(path: str) -> Iterable[Dict[str, str]]:
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read manifest {path}: {exc.strerror}") from None
    with fh:
        reader = csv.DictReader(fh)
        try:
            fields = reader.fieldnames
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        if not fields or "path" not in [f.strip().lower() for f in fields]:
            raise InputError(
                f"{path}: not a pool manifest (needs a header row with a 'path' column; optional 'label' and 'domain')"
            )
        try:
            for row in reader:  # column names in any case: Path, LABEL, ...
                yield {(k or "").strip().lower(): v for k, v in row.items() if isinstance(v, str)}
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except csv.Error as exc:
            raise InputError(f"{path}: unreadable CSV near line {reader.line_num} ({exc})") from None


def _not_utf8(path: str) -> InputError:
    """The error for a CSV in another encoding (Excel's 'CSV' is often cp1252), naming the first bad line."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = f"byte 0x{line[exc.start]:02x} on line {number}"
                break
        else:
            bad = "an incomplete character at the end"
    return InputError(f"{path}: not UTF-8 ({bad}); save it as UTF-8 (CSV UTF-8 in Excel)")


def _parquet_rows(path: str) -> Iterable[Dict[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give a CSV") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for damaged files
        raise InputError(f"{path}: not a readable Parquet file ({exc.__class__.__name__}: {exc})") from None
    named = {}  # column names in any case (Path, LABEL, ...): the first of each
    for name in parquet.schema_arrow.names:
        named.setdefault(name.strip().lower(), name)
    if "path" not in named:
        raise InputError(f"{path}: not a pool manifest (needs a 'path' column; optional 'label' and 'domain')")
    columns = {c: named[c] for c in ("path", "label", "domain") if c in named}
    for batch in parquet.iter_batches(columns=list(columns.values()), batch_size=65536):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield {c: "" if data[n][i] is None else str(data[n][i]) for c, n in columns.items()}
