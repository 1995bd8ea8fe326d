"""Reading tensorboard event files back in tests, without tensorboard itself."""
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_events(path: Path) -> list:
    """The records of a tensorboard event file (length, crc, payload, crc)."""
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events
