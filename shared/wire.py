"""Our wire format for weights: all arrays of an ArrayRecord packed into one buffer.

Both sides use it: the server's ``PollingGrid`` packs what it sends, the ClientApp's
``packed_arrays_mod`` unpacks it and packs the reply the same way.
"""

from __future__ import annotations

import json
from typing import Any


PACKED_LAYOUT = "packed-arrays"  # ConfigRecord naming the arrays packed into one buffer
_PACKED_KEY = "packed"
_PACKED_STYPE = "fedrndpo.packed"


def pack_arrays(content: Any) -> Any:
    """A RecordDict in which each ArrayRecord is one Array holding the bytes of all its
    arrays back to back, plus a ConfigRecord ``packed-arrays`` with each array's name,
    dtype, shape, serialisation and size: the same weights, in a few objects.

    Flower 1.42 moves a message as separate objects (each Array, each 5 MB chunk of it,
    each record), one HTTP(S) request per object per hop, three hops each way (ServerApp,
    SuperLink, SuperNode, ClientApp); a UNet's ``state_dict`` of 15-50 tensors is 30-80
    objects, packed about 6."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    if not content.array_records:
        return content
    packed, layout = RecordDict(), {}
    for name, record in content.items():
        if name in content.array_records:
            entries = [[key, arr.dtype, list(arr.shape), arr.stype, len(arr.data)]
                       for key, arr in record.items()]
            data = b"".join(arr.data for arr in record.values())
            packed[name] = ArrayRecord({_PACKED_KEY: Array(dtype="uint8", shape=(len(data),),
                                                           stype=_PACKED_STYPE, data=data)})
            layout[name] = entries
        else:
            packed[name] = record
    packed[PACKED_LAYOUT] = ConfigRecord({"layout": json.dumps(layout)})
    return packed


def packed_layout(content: Any) -> dict[str, list] | None:
    """The layout ``pack_arrays`` recorded, or None for an unpacked RecordDict."""
    if PACKED_LAYOUT not in content.config_records:
        return None
    return json.loads(str(content[PACKED_LAYOUT]["layout"]))


def unpack_arrays(content: Any) -> Any:
    """Undo ``pack_arrays`` (an unpacked RecordDict is returned as it is). Raises
    ValueError when the buffer does not match its layout."""
    from flwr.app import Array, ArrayRecord, RecordDict

    layout = packed_layout(content)
    if layout is None:
        return content
    unpacked = RecordDict()
    for name, record in content.items():
        if name == PACKED_LAYOUT:
            continue
        if name not in layout:
            unpacked[name] = record
            continue
        data = record[_PACKED_KEY].data
        if len(data) != sum(entry[4] for entry in layout[name]):
            raise ValueError(f"packed record {name!r}: {len(data)} bytes, layout says "
                             f"{sum(entry[4] for entry in layout[name])}")
        arrays, offset = {}, 0
        for key, dtype, shape, stype, size in layout[name]:
            arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                data=data[offset:offset + size])
            offset += size
        unpacked[name] = ArrayRecord(arrays)
    return unpacked
