"""ModelWeights over single-file and sharded HF folders, corrupt files, and checkpoint fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from examples.demo_run import save_tiny_llama
from nexttools.checkpoints import ModelWeights, fingerprint
from nexttools.errors import UserError


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("single") / "model", hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="module")
def sharded(single: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="20KB")
    return out


def reference_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors as safetensors itself reads them, file by file."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            state.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return state


def test_single_file(single: Path) -> None:
    weights = ModelWeights(single)
    state = reference_state(single)
    assert weights.files == [single / "model.safetensors"]
    assert sorted(weights.names) == sorted(state)
    blob = (single / "model.safetensors").read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    header.pop("__metadata__", None)
    assert weights.names == sorted(header, key=lambda name: header[name]["data_offsets"][0])  # file order
    for name, tensor in state.items():
        assert weights.shape(name) == tuple(tensor.shape)
        assert weights.dtype(name) == tensor.dtype == torch.float32
        assert torch.equal(weights.get(name), tensor)
        blocks = list(weights.blocks(name, 100))  # 25 float32 per block: rarely a row boundary
        assert all(block.numel() <= 25 for block in blocks)
        assert torch.equal(torch.cat(blocks), tensor.reshape(-1))
    assert weights.config["model_type"] == "llama"
    assert "lm_head.weight" in weights and "nope" not in weights
    with pytest.raises(KeyError, match="nope"):
        weights.shape("nope")


def test_sharded_folder(sharded: Path, single: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1
    weights = ModelWeights(sharded)
    assert sorted(file.name for file in weights.files) == shard_names
    assert sorted(weights.names) == sorted(index["weight_map"])
    expected = reference_state(single)
    for name in weights.names:
        assert weights.dtype(name) == torch.bfloat16
        assert weights.file_of(name).name == index["weight_map"][name]
        assert torch.equal(weights.get(name), expected[name].to(torch.bfloat16))


def corrupt_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def test_truncated_file(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    file = folder / "model.safetensors"
    with file.open("r+b") as handle:
        handle.truncate(file.stat().st_size - 100)
    with pytest.raises(UserError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        ModelWeights(folder)


def test_bytes_appended(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    with (folder / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 16)
    with pytest.raises(UserError, match=r"model\.safetensors: corrupt or truncated"):
        ModelWeights(folder)


def test_bad_header_length(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.write(struct.pack("<Q", 2**40))
    with pytest.raises(UserError, match=r"model\.safetensors: corrupt safetensors file \(header length"):
        ModelWeights(folder)


def test_header_not_json(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.seek(8)
        handle.write(b"\xff{{{")
    with pytest.raises(
        UserError, match=r"model\.safetensors: corrupt safetensors file \(header is not valid JSON"
    ):
        ModelWeights(folder)


def test_offsets_not_matching_shape(single: Path, tmp_path: Path) -> None:
    """Same-size header whose first entry claims one element too many: the sizes no longer add up."""
    folder = corrupt_copy(single, tmp_path)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"][0] += 1
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(UserError, match=rf"model\.safetensors: corrupt safetensors file \('{name}'"):
        ModelWeights(folder)


def test_tiny_file_and_missing_weights(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    (folder / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(UserError, match=r"not a safetensors file"):
        ModelWeights(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        ModelWeights(folder)


def test_broken_index(sharded: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(sharded, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # A tensor listed in the wrong shard: a stale or hand-edited index.
    name = next(key for key, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"index\.json: '{name}' is not in {shards[1]}"):
        ModelWeights(folder)
    index["weight_map"][name] = shards[0]
    index_path.write_text(json.dumps(index))
    (folder / shards[-1]).unlink()
    with pytest.raises(UserError, match=rf"shard {shards[-1]} is missing"):
        ModelWeights(folder)
    index_path.write_text("{not json")
    with pytest.raises(UserError, match=r"corrupt index"):
        ModelWeights(folder)


def test_fingerprint_tracks_rewrites(sharded: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(sharded, tmp_path)  # copytree keeps mtimes
    files = ModelWeights(folder).files
    original = fingerprint(ModelWeights(sharded).files)
    assert fingerprint(files) == original  # a moved copy with the same files and mtimes
    assert len(original) == 32
    assert fingerprint(list(reversed(files))) != original

    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = fingerprint(files)
    assert touched != original

    # Same size and same mtime, but a different header (a tensor renamed to a same-length name).
    raw = files[0].read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + length].decode()
    name = next(key for key in json.loads(header) if key != "__metadata__")
    renamed = header.replace(f'"{name}"', '"' + "x" * len(name) + '"', 1).encode()
    stat = files[0].stat()
    files[0].write_bytes(raw[:8] + renamed + raw[8 + length :])
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files[0].stat().st_size == stat.st_size
    assert fingerprint(files) not in (original, touched)


def test_fingerprint_errors(single: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(single, tmp_path)
    with pytest.raises(UserError, match=r"missing\.safetensors: cannot read"):
        fingerprint([folder / "missing.safetensors"])
    (folder / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"garbage!")
    with pytest.raises(UserError, match=r"model\.safetensors: corrupt"):
        fingerprint([folder / "model.safetensors"])
    config = folder / "config.json"
    assert fingerprint([config]) == fingerprint([config])  # non-safetensors files: name, size, mtime


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident set from /proc")
def test_reading_does_not_keep_tensors_resident(tmp_path: Path) -> None:
    """Memory stays bounded by the tensors the caller holds, not by what was read (no open maps)."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({f"t{i}": torch.ones(1024, 1024 * 2) for i in range(12)}, folder / "model.safetensors")  # 96 MB
    weights = ModelWeights(folder)

    def resident_mb() -> float:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024

    before = resident_mb()
    for name in weights.names:
        assert weights.get(name).sum().item() == 1024 * 1024 * 2
    assert resident_mb() - before < 40  # a couple of 8 MB tensors at most, never the 96 MB read
