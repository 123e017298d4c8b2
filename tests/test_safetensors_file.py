"""The same tensors and metadata give the same bytes: safetensors orders metadata keys by a Rust
HashMap, which differs from one write to the next."""
import hashlib

import torch
from safetensors import safe_open

from kubelora_trainer import safetensors_file


META = {f"kubelora.key{i}": f"value {i} é/ü" for i in range(12)} | {"format": "pt"}


def _write(path, meta):
    safetensors_file.save({"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}, path, meta)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_content_same_bytes_and_file_still_loads(tmp_path):
    orders = [META, dict(reversed(list(META.items())))] * 4
    hashes = {_write(tmp_path / f"{i}.safetensors", m) for i, m in enumerate(orders)}
    assert len(hashes) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == META
        assert torch.equal(f.get_tensor("b.weight"), torch.arange(6.0).reshape(2, 3))


def test_sorted_header_keeps_length_and_leaves_a_header_without_metadata():
    raw = b'{"__metadata__":{"z":"1","a":"2"},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   '
    out = safetensors_file.sorted_header(raw)
    assert len(out) == len(raw) and out.index(b'"a"') < out.index(b'"z"')
    bare = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert safetensors_file.sorted_header(bare) == bare


def test_tensors_sharing_storage_are_saved_each_whole(tmp_path):
    """safetensors refuses keys that share memory; save copies every tensor whose storage an earlier
    key holds (one A under q, k and v; a transposed view of another key), contiguous, and keeps
    zero-size tensors and the first holder as they are."""
    import torch
    from safetensors.torch import load_file
    from kubelora_trainer import safetensors_file
    a = torch.randn(4, 6)
    tensors = {"q": a, "k": a, "t": a.t(), "rows": a[1:3], "empty": torch.zeros(0), "empty2": torch.zeros(0, 3)}
    safetensors_file.save(tensors, tmp_path / "x.safetensors", metadata={"b": "2", "a": "1"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert safetensors_file.unshared(tensors)["q"] is a   # the first holder is not copied
