"""Writing .safetensors files whose bytes depend only on their content.

safetensors keeps a file's metadata in a Rust HashMap, so the order of its keys in the header, and
with it the file's sha256, changed from one write to the next: the same LoRA trained twice from
the same seed gave two hashes in manifest.json. `save` writes the file, then rewrites the header
in place with the metadata keys sorted (same length; the tensors do not move)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def save(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(unshared(tensors), str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_metadata(Path(path))


def unshared(tensors: dict) -> dict:
    """tensors with every one that shares its storage with an earlier one copied: save_file refuses
    shared memory, and one tensor under several keys is what splitting a fused LoRA with a shared A
    (sd-scripts' Flux qkv, ComfyUI's HunyuanVideo files) into q, k and v gives."""
    import torch

    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[k] = t.clone(memory_format=torch.contiguous_format) if ptr is not None and ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def sorted_header(raw: bytes) -> bytes:
    """The header bytes with __metadata__'s keys sorted, padded with spaces to the same length
    (safetensors pads headers with spaces). Everything else keeps its order."""
    header = json.loads(raw)
    meta = header.get("__metadata__")
    if not meta:
        return raw
    header["__metadata__"] = dict(sorted(meta.items()))
    out = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(out) > len(raw):  # not for a reordering of what safetensors wrote; keep the file as written
        return raw
    return out.ljust(len(raw), b" ")


def sort_metadata(path: Path) -> None:
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        out = sorted_header(raw)
        if out != raw:
            f.seek(8)
            f.write(out)
