"""ShardedWriter and staged_folder against the real safetensors and transformers readers."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nexttools import writer as writer_module
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.manifest import MANIFEST_NAME
from nexttools.outputs.model_folder import ModuleUpdate
from nexttools.ranks import Ranks
from nexttools.writer import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardedWriter,
    TensorSpec,
    check_destination,
    plan_shards,
    staged_folder,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),  # 512 B
        "b.norm": torch.randn(16, generator=g).to(torch.bfloat16),  # 32 B
        "c.weight": torch.randn(4, 4, generator=g).to(torch.float16),  # 32 B
        "d.big": torch.randn(40, 10, generator=g),  # 1600 B: over the 1000 B limit below
        "e.ids": torch.arange(6, dtype=torch.int64),  # 48 B
        "f.mask": torch.tensor([True, False, True]),  # 3 B
        "g.scalar": torch.tensor(3.5),  # 4 B, 0-d
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], limit: int) -> ShardedWriter:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedWriter(out, limit, specs) as writer:
        for name in writer.names:
            writer.add(name, tensors[name])
        writer.finish()
        writer.write_index()
    return writer


def test_plan_is_greedy_and_gives_oversized_tensors_their_own_shard() -> None:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in _tensors().items()]
    shards = plan_shards(specs, 540)
    groups = [sorted(spec.name for spec in shard.tensors) for shard in shards]
    # huggingface_hub's rule (transformers' save_pretrained): a shard closes when the next tensor
    # would overflow it (a: 512 B, then b); an oversized tensor gets its own shard when it is met,
    # and the open shard goes on filling after it.
    assert groups == [["a.weight"], ["d.big"], ["b.norm", "c.weight", "e.ids", "f.mask", "g.scalar"]]
    assert [shard.file for shard in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # Larger element sizes first within a shard, so that every tensor is aligned.
    assert [spec.name for spec in shards[2].tensors] == ["e.ids", "g.scalar", "b.norm", "c.weight", "f.mask"]
    assert [shard.file for shard in plan_shards(specs, 10**6)] == [SINGLE_FILE]
    with pytest.raises(UserError):
        plan_shards(specs, 0)


def test_sharded_output_round_trips_bit_for_bit(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = _write(tmp_path, tensors, 1000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(writer.files) and len(writer.files) == 3 and INDEX_FILE in files
    assert writer.file_sizes() == {name: (tmp_path / name).stat().st_size for name in files}
    index_text = (tmp_path / INDEX_FILE).read_text()
    index = json.loads(index_text)
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {name for name, file in index["weight_map"].items() if file == shard} == set(f.keys())
        loaded.update(load_file(tmp_path / shard))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name


def test_single_shard_matches_the_safetensors_library_byte_layout(tmp_path: Path) -> None:
    tensors = _tensors()  # in name order, so both order rules (element size, then as given / by name) agree
    (tmp_path / "ours").mkdir()
    _write(tmp_path / "ours", tensors, 10**6)
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = (tmp_path / "ours" / SINGLE_FILE).read_bytes()
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    assert sorted((tmp_path / "ours").iterdir()) == [tmp_path / "ours" / SINGLE_FILE]  # no index

    def split(blob: bytes) -> tuple[dict, bytes]:
        (n,) = struct.unpack("<Q", blob[:8])
        assert n % 8 == 0
        return json.loads(blob[8 : 8 + n]), blob[8 + n :]

    (our_header, our_data), (their_header, their_data) = split(ours), split(theirs)
    assert our_header == their_header  # same offsets: same order rule (alignment, then as given)
    assert our_data == their_data


def test_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("x", (2, 2), torch.float32), TensorSpec("y", (3,), torch.float32)]
    writer = ShardedWriter(tmp_path, 100, specs)
    with pytest.raises(ValueError, match="expected tensor 'x'"):
        writer.add("y", torch.zeros(3))
    with pytest.raises(ValueError, match="planned"):
        writer.add("x", torch.zeros(2, 2, dtype=torch.float16))
    writer.add("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not written"):
        writer.finish()
    writer.close()


def test_transformers_loads_a_many_shard_model(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    out = tmp_path / "model"
    out.mkdir()
    writer = _write(out, state, 8 * 1024)
    assert len(writer.shards) > 3
    config.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, config=AutoConfig.from_pretrained(out))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_staged_folder_commits_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError), staged_folder(out, overwrite=False, needed_bytes=10) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not out.exists() and list(out.parent.iterdir()) == []
    with staged_folder(out, overwrite=False, needed_bytes=10) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".out.partial-")
        (staging / MANIFEST_NAME).write_text("{}")
    assert (out / MANIFEST_NAME).read_text() == "{}" and list(out.parent.iterdir()) == [out]


def test_existing_output_needs_overwrite_and_must_be_ours(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_destination(out, overwrite=False)  # empty folder: fine
    (out / MANIFEST_NAME).write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        check_destination(out, overwrite=False)
    with staged_folder(out, overwrite=True, needed_bytes=0) as staging:
        (staging / MANIFEST_NAME).write_text("new")
    assert (out / MANIFEST_NAME).read_text() == "new" and sorted(tmp_path.iterdir()) == [out]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a nexttools output"):
        check_destination(foreign, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_destination(tmp_path / "file", overwrite=True)


def test_disk_full_removes_the_partial_output_and_says_how_much(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    tensors = _tensors()
    calls = {"n": 0}
    real_header = writer_module._header

    def header_then_enospc(shard):  # the second shard finds the disk full
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_header(shard)

    monkeypatch.setattr(writer_module, "_header", header_then_enospc)
    with (
        pytest.raises(UserError, match=r"disk full .*needs 2\.\d\d MB.*free") as raised,
        staged_folder(out, overwrite=False, needed_bytes=2_220_000) as staging,
    ):
        _write(staging, tensors, 1000)
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_space_is_refused_before_writing(tmp_path: Path) -> None:
    with (
        pytest.raises(UserError, match="not enough disk space"),
        staged_folder(tmp_path / "out", overwrite=False, needed_bytes=1 << 60),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_dead_processes_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".out.partial-999999999"  # no such pid
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    with staged_folder(tmp_path / "out", overwrite=False, needed_bytes=0) as staging:
        (staging / MANIFEST_NAME).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plan_groups_tensors_as_transformers_save_pretrained_does(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    state = model.state_dict()
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    planned = {spec.name: shard.file for shard in plan_shards(specs, 60_000) for spec in shard.tensors}
    assert len(set(weight_map.values())) > 2 and planned == weight_map


def test_a_tensor_written_in_pieces_is_the_same_file(tmp_path: Path) -> None:
    """add_pieces (a copy in blocks) writes the very bytes add writes; a short stream is refused."""
    tensors = _tensors()
    for folder in ("whole", "pieces", "short"):
        (tmp_path / folder).mkdir()
    whole = _write(tmp_path / "whole", tensors, 1000)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedWriter(tmp_path / "pieces", 1000, specs) as writer:
        for name in writer.names:
            flat = tensors[name].reshape(-1)
            writer.add_pieces(name, [flat[i : i + 7] for i in range(0, max(flat.numel(), 1), 7)])
        writer.finish()
        writer.write_index()
    for file in whole.files:
        assert (tmp_path / "pieces" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes(), file
    with (
        ShardedWriter(tmp_path / "short", 1000, specs) as writer,
        pytest.raises(ValueError, match="elements"),
    ):
        name = writer.names[0]
        writer.add_pieces(name, [tensors[name].reshape(-1)[:3]])


def test_a_module_update_in_row_blocks_equals_the_whole_sum_and_leaves_the_weight_alone() -> None:
    """Extrapolated modules are computed a row block at a time (bounded memory); the blocks must
    concatenate to W + Σ changes, for factor and dense changes alike, and W must not change."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 48, generator=gen).to(torch.bfloat16)
    kept = weight.clone()
    factors = LowRankFactors(torch.randn(1000, 4, generator=gen), torch.randn(48, 4, generator=gen))
    dense = torch.randn(1000, 48, generator=gen)
    update = ModuleUpdate(weight, (factors, dense), torch.device("cpu"))
    blocks = list(update.blocks(block_bytes=48 * 4 * 64))  # 64 rows a block
    assert len(blocks) == 16 and all(b.dtype == torch.float32 for b in blocks)
    whole = weight.float() + factors.left @ factors.right.T + dense
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(weight, kept)
    same_dtype = torch.randn(10, 3, generator=gen)  # a float32 W: the block must still be a copy
    before = same_dtype.clone()
    list(ModuleUpdate(same_dtype, (torch.ones(10, 3),), torch.device("cpu")).blocks(12))
    assert torch.equal(same_dtype, before)


def test_ranks_write_their_own_shards_and_together_the_single_writer_folder(tmp_path: Path) -> None:
    """Shard s is rank s mod N's: two writers of one plan, one per rank, fill the folder one writes."""
    tensors = _tensors()
    (tmp_path / "whole").mkdir()
    whole = _write(tmp_path / "whole", tensors, 100)
    assert len(whole.shards) > 2
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    (tmp_path / "split").mkdir()
    names = []
    for rank in (1, 0):
        with ShardedWriter(tmp_path / "split", 100, specs, Ranks(rank, 2, torch.device("cpu"))) as writer:
            names.append(writer.names)
            for name in writer.names:
                writer.add(name, tensors[name])
            writer.finish()
    writer.write_index()
    assert names[0] and names[1] and not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(whole.names)
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert files == sorted(whole.files)
    for file in files:
        assert (tmp_path / "split" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes(), file
