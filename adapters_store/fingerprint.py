"""A short, stable digest of a base model, so the store can refuse adapters trained on another.

An adapter is only meaningful on the exact weights it was trained against: the same
architecture with different weights (another fine-tune, another revision) loads without
error and silently gives wrong outputs. The fingerprint covers:

- ``config.json``, parsed and re-serialized with sorted keys (formatting does not count);
- every ``*.safetensors`` header's tensor names, dtypes and shapes (cheap, read from the
  first bytes of each file);
- the weight files' bytes, streamed through SHA-256.

Trade-off for big models: hashing every byte of a 15 GB checkpoint costs tens of seconds of
disk and CPU at each start. Above ``full_hash_limit`` total bytes only the first and last MiB
of each file are hashed (plus its size). That still catches a different architecture, dtype,
shard layout or file, and almost any re-export, but not an edit confined to the middle of a
shard. The mode is part of the digest, so a model never matches itself hashed the other way.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

FULL_HASH_LIMIT = 1 << 30  # bytes; a 20 MB test model is hashed in full in well under a second
SAMPLE_BYTES = 1 << 20
_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def fingerprint_model(model_dir: str | Path, *, full_hash_limit: int = FULL_HASH_LIMIT) -> str:
    """Return a 16-hex-digit fingerprint of the model in ``model_dir`` (a local directory)."""
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {root}")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")

    digest = hashlib.sha256()
    config = json.loads(config_path.read_text())
    _add(digest, "config", json.dumps(config, sort_keys=True, separators=(",", ":")))
    full = sum(f.stat().st_size for f in files) <= full_hash_limit
    _add(digest, "mode", "full" if full else f"head-tail-{SAMPLE_BYTES}")
    for path in files:
        _add(digest, "file", path.name, str(path.stat().st_size))
        for name, (dtype, shape) in sorted(_tensor_specs(path).items()):
            _add(digest, "tensor", name, dtype, ",".join(map(str, shape)))
        _add_bytes(digest, path, full)
    return digest.hexdigest()[:16]


def _add(digest: hashlib._Hash, *parts: str) -> None:
    """Length-prefix each part so that ("ab", "c") and ("a", "bc") hash differently."""
    for part in parts:
        data = part.encode()
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)


def _tensor_specs(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from a safetensors header: 8-byte length, then JSON."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: safetensors header of {size} bytes is not plausible")
        header = json.loads(f.read(size))
    return {name: (spec["dtype"], spec["shape"]) for name, spec in header.items() if name != "__metadata__"}


def _add_bytes(digest: hashlib._Hash, path: Path, full: bool) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        if full or size <= 2 * SAMPLE_BYTES:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            return
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(size - SAMPLE_BYTES)
        digest.update(f.read(SAMPLE_BYTES))
