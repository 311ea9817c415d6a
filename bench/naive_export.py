"""Baseline (b) for bench_export.py: the obvious exporter, written plainly.

Framing, `Record.FromString` for every payload, `json.loads` of every history
value into one dict per row, then pandas `to_csv`. It shares no code with
twdiag on purpose: it is the yardstick.
"""
import json
import struct
import sys
import zlib

import pandas as pd


def naive_rows(path):
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as fh:
        data = fh.read()
    pos, parts, rows = 7, None, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, length, ctype = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if zlib.crc32(payload, zlib.crc32(bytes([ctype]))) != crc:
            break
        if ctype == 1:
            record = payload
        elif ctype == 2:
            parts = [payload]
            continue
        elif ctype == 3:
            parts.append(payload)
            continue
        else:
            record = b"".join(parts + [payload])
        rec = pb.Record.FromString(record)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def main(path, out_csv):
    pd.DataFrame(naive_rows(path)).to_csv(out_csv, index=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
