"""Minimal safetensors reader/writer (F32 only) for casdm's tools.

The format (https://github.com/huggingface/safetensors): u64 little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw
little-endian data. Written here so the tools need only python3-torch and
python3-numpy from Debian (no PyPI).
"""
import json
import os
import struct

import numpy as np


def save(path, tensors, metadata=None):
    """tensors: dict name -> array-like (torch tensor or numpy), stored as F32."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if hasattr(t, "detach"):
            t = t.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(t, dtype="<f4"))
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (len(h) + 8) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load(path):
    """Returns (dict name -> numpy float32 array, metadata dict)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", f"{name}: dtype {e['dtype']}"
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(e["shape"]).astype(np.float32)
    return out, meta


def atomic(path, write):
    """write(tmp_path) into a temporary file, fsync it, then rename it over path:
    a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
