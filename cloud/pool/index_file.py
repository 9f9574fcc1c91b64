"""Reading a pool index file (``.npz``) so that any bytes give arrays that fit together or a typed error.

A missing file is an ``InputError``; anything else wrong (not a zip, a damaged member, a header
claiming more data than the member holds, arrays of the wrong kind, shape or range, metadata
that is not the expected JSON) is a ``MessageError`` naming the file. Nothing is unpickled, and
no array is allocated larger than the bytes that back it.
"""

from __future__ import annotations

import zipfile
from typing import Any, Dict, Tuple

import numpy as np

from device_sdk.errors import InputError, MessageError
from device_sdk.protocol.envelope import parse_json

ARRAYS = ("paths", "labels", "domains", "features", "assign", "centroids", "meta")
MAX_TEXT = 128


def read_index_file(path: str, index_format: int) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(arrays, meta)`` of a pool index: arrays as ``PoolIndex`` takes them, meta its three strings."""
    try:
        _check_member_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAYS}
    except FileNotFoundError:
        raise InputError(f"index not found: {path}") from None
    except MessageError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy and zipfile raise a dozen types for damaged files
        raise MessageError(f"{path}: not a readable pool index ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    meta = _meta(arrays.pop("meta"), path, index_format)
    problem = _arrays_problem(arrays)
    if problem is not None:
        raise MessageError(f"{path}: not a usable pool index ({problem})")
    return arrays, meta


def _check_member_sizes(path: str) -> None:
    """Each ``.npy`` member's header must not claim more elements than the member's bytes hold."""
    with zipfile.ZipFile(path) as zf:
        for name in ARRAYS:
            info = zf.getinfo(f"{name}.npy")
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            count = 1
            for s in shape:
                count *= int(s)
            if count * max(dtype.itemsize, 1) > info.file_size:
                raise MessageError(f"{path}: member {name}.npy claims {shape} of {dtype} in {info.file_size} bytes")


def _meta(raw: np.ndarray, path: str, index_format: int) -> Dict[str, str]:
    if raw.shape != () or raw.dtype.kind != "U":
        raise MessageError(f"{path}: index metadata is not one string")
    meta = parse_json(str(raw), f"{path}: index metadata")
    if not isinstance(meta, dict):
        raise MessageError(f"{path}: index metadata is not a JSON object")
    if meta.get("format") != index_format:
        raise MessageError(f"{path}: index format {str(meta.get('format'))[:40]} is not supported")
    out = {}
    for key in ("encoder_sha256", "probe_id", "created"):
        value = meta.get(key)
        if not isinstance(value, str) or len(value) > MAX_TEXT or (key != "created" and not value):
            raise MessageError(f"{path}: index metadata {key} is not a string of at most {MAX_TEXT} characters")
        out[key] = value
    variants = meta.get("encoder_variants", [])  # other artifacts of the same encoder (cloud.export.parity)
    if (
        not isinstance(variants, list)
        or len(variants) > 8
        or not all(isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in variants)
    ):
        raise MessageError(f"{path}: index metadata encoder_variants is not a list of at most 8 sha256 digests")
    if variants:
        out["encoder_variants"] = tuple(variants)
    return out


def _arrays_problem(a: Dict[str, Any]) -> Any:
    """What makes the arrays unusable together, or None."""
    for name in ("paths", "labels", "domains"):
        if a[name].ndim != 1 or a[name].dtype.kind != "U":
            return f"{name} is not a 1-D array of strings"
    n = len(a["paths"])
    if len(a["labels"]) != n or len(a["domains"]) != n:
        return "paths, labels and domains differ in length"
    features, centroids, assign = a["features"], a["centroids"], a["assign"]
    if features.ndim != 2 or centroids.ndim != 2 or features.dtype.kind != "f" or centroids.dtype.kind != "f":
        return "features and centroids must be 2-D float arrays"
    if features.shape[0] != n or features.shape[1] != centroids.shape[1] or centroids.shape[0] < 1 or n < 1:
        return f"features {features.shape} and centroids {centroids.shape} do not fit {n} images"
    if not (np.all(np.isfinite(features)) and np.all(np.isfinite(centroids))):
        return "features or centroids hold NaN or infinity"
    if (
        assign.shape != (n,)
        or assign.dtype.kind not in "iu"
        or not (0 <= assign.min() and assign.max() < len(centroids))
    ):
        return f"assign must hold one cluster number in [0, {len(centroids)}) per image"
    return None
