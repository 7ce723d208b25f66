"""Readers for the files TensorBoard and Weights & Biases writers leave, written from the formats'
specifications (not with the writers' own code), so the tests compare what was written with what a
reader sees.

TensorBoard: an event file is a TFRecord stream of `Event` protobufs; each record is (uint64 length,
uint32 masked CRC-32C of the length bytes, data, uint32 masked CRC-32C of the data), little-endian.
A directory's files are read in name order, and a `SessionLog.START` event at step s discards the
points with step >= s read before it (TensorBoard's restart handling, `purge_orphaned_data`).

W&B: a `.wandb` file is a 7-byte header (":W&B", 0xBEE1, version 0) and a LevelDB-style log of
`Record` protobufs in 32 KiB blocks: each chunk is (uint32 CRC-32 of the type byte and the data,
uint16 length, uint8 type: 1 full, 2 first, 3 middle, 4 last), a block's tail shorter than a chunk
header is zero padding.
"""
import math
import os
import struct
import zlib


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path):
    """The records of one TFRecord file; AssertionError on a bad CRC or a cut record."""
    data = open(path, "rb").read()
    pos, out = 0, []
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path}: record header cut at byte {pos}"
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc_len,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert crc_len == masked_crc32c(header), f"{path}: bad length CRC at byte {pos}"
        body = data[pos + 12:pos + 12 + length]
        assert len(body) == length and pos + 16 + length <= len(data), f"{path}: record cut at byte {pos}"
        (crc_data,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert crc_data == masked_crc32c(body), f"{path}: bad data CRC at byte {pos}"
        out.append(body)
        pos += 16 + length
    return out


def event_files(logdir):
    return sorted(os.path.join(logdir, f) for f in os.listdir(logdir) if ".tfevents." in f)


def tb_events(logdir):
    """Every Event of the directory's event files, files in name order (as TensorBoard reads them)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in event_files(logdir):
        for body in tfrecords(path):
            e = event_pb2.Event()
            e.ParseFromString(body)
            events.append(e)
    return events


def _value_of(v) -> float:
    if v.HasField("simple_value"):
        return float(v.simple_value)
    return float(v.tensor.float_val[0]) if v.tensor.float_val else float(v.tensor.double_val[0])


def tb_scalars(logdir, *, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them: with `purge`, a SessionLog.START at step
    s first drops every point with step >= s (all tags)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for e in tb_events(logdir):
        if purge and e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            scalars = {tag: [(s, v) for s, v in pts if s < e.step] for tag, pts in scalars.items()}
        if e.HasField("summary"):
            for v in e.summary.value:
                scalars.setdefault(v.tag, []).append((int(e.step), _value_of(v)))
    return scalars


def same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def wandb_records(path):
    """The `Record` protobufs of one .wandb file (up to a chunk still being written); AssertionError on a bad
    header or CRC."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    if len(data) < 7:
        return []  # the header is still being written
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"{path}: not a W&B log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # zero padding at a block's end
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos = pos + left  # a zeroed tail
            continue
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"{path}: bad CRC at byte {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out
