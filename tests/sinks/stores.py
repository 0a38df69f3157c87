"""Read the trackers' own local stores back (for the tests): W&B's offline ``.wandb`` file.

wandb 0.31 has no Python reader of its run file any more (it moved into ``wandb-core``); the file is
a LevelDB-style log (a 7-byte header ``:W&B`` + magic 0xBEE1 + version, then 32 KiB blocks of
chunks, each with a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of W&B's own protobuf
``Record`` messages, which are parsed with ``wandb.proto.wandb_internal_pb2``.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: str) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file, in order (a bad checksum fails the test)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        data = fh.read()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    pos, out, parts = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too small for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        pos += HEADER + length
        if kind == FULL:
            parts = chunk
        elif kind == FIRST:
            parts = chunk
            continue
        elif kind == MIDDLE:
            parts += chunk
            continue
        else:
            parts += chunk
        rec = pb.Record()
        rec.ParseFromString(parts)
        out.append(rec)
        parts = b""
    return out


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    """The history rows (``key -> value`` decoded from JSON; a nested key's leaves in a dict)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in r.history.item:
            value = json.loads(item.value_json)
            if len(item.nested_key) > 1:  # e.g. an image: ("topomon_figures/eigenspectra", "path")
                node = row
                for k in item.nested_key[:-1]:
                    node = node.setdefault(k, {})
                node[item.nested_key[-1]] = value
            else:
                row[item.nested_key[0] if item.nested_key else item.key] = value
        rows.append(row)
    return rows
