"""Read an offline wandb run back: its config, summary, tags and group, from ``run-<id>.wandb``.

wandb 0.31 writes an offline run's config and summary only into ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``
(no ``files/config.yaml`` or ``wandb-summary.json`` until it is synced). That file is wandb's transaction log:
a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of LevelDB-log chunks (7-byte chunk header:
crc32, length, type FULL/FIRST/MIDDLE/LAST), each record a ``wandb_internal_pb2.Record`` protobuf. wandb ships no
Python reader for it any more, so this module decodes it with wandb's own protobuf classes.

    python -m kvcompress.experiment.wandb_offline multirun/<sweep>/0_*/wandb/offline-run-*   # JSON per run
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32768
IDENT, MAGIC = b":W&B", 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """A path that holds no readable offline wandb run."""


def record_file(path: Path) -> Path:
    """The ``run-*.wandb`` file of an offline run directory (or ``path`` itself when it is that file)."""
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise OfflineRunError(f"{path}: expected one run-*.wandb file, found {len(files)}")
    return files[0]


def iter_chunks(data: bytes) -> Iterator[bytes]:
    """The record payloads of a ``.wandb`` file's bytes (chunks of one record joined)."""
    if len(data) < HEADER.size or HEADER.unpack_from(data)[:2] != (IDENT, MAGIC):
        raise OfflineRunError("not a wandb record file (bad header)")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(path: Path) -> dict[str, Any]:
    """``{"id", "name", "group", "project", "job_type", "tags", "config", "summary"}`` of an offline run.

    ``path`` is the ``offline-run-*`` directory or its ``run-*.wandb`` file. Config values are as logged
    (``{"budget.ratio": 2, ...}``; wandb's ``{"value": ...}`` wrapper removed); the summary is the final one
    (later summary updates win; ``_wandb``/``_runtime`` bookkeeping keys kept out).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"config": {}, "summary": {}}
    for payload in iter_chunks(record_file(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                id=run.run_id,
                name=run.display_name,
                group=run.run_group,
                project=run.project,
                job_type=run.job_type,
                tags=list(run.tags),
            )
            _apply(out, "config", run.config.update)
            _apply(out, "summary", run.summary.update)
        elif kind == "config":
            _apply(out, "config", record.config.update)
        elif kind == "summary":
            _apply(out, "summary", record.summary.update)
            for item in record.summary.remove:
                out["summary"].pop(_key(item), None)
    out["config"] = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in out["config"].items()}
    out["config"].pop("_wandb", None)
    out["summary"] = {k: v for k, v in out["summary"].items() if not k.startswith("_")}
    return out


def _apply(out: dict[str, Any], target: str, items: Any) -> None:
    for item in items:
        out[target][_key(item)] = json.loads(item.value_json)


def main(argv: list[str] | None = None) -> int:
    """Print each offline run given on the command line as one JSON object."""
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m kvcompress.experiment.wandb_offline OFFLINE_RUN_DIR...", file=sys.stderr)
        return 2
    for path in paths:
        try:
            print(json.dumps({"path": str(path), **read_offline_run(path)}, sort_keys=True, default=str))
        except (OSError, OfflineRunError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
