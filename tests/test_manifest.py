"""write_manifest / verify_output: what makes a folder a complete nexttools output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nexttools.errors import UserError
from nexttools.manifest import MANIFEST_NAME, Manifest, file_fingerprint, verify_output, write_manifest
from nexttools.writer import ShardedWriter, TensorSpec


def _document(output_format: str, **fields: object) -> dict[str, object]:
    """The keys every manifest reader relies on (``extrapolate`` writes many more)."""
    return {
        "format": output_format,
        "method": "next",
        "alpha": 1.5,
        "k": 5,
        "dtype": "float32",
        "library_name": "peft" if output_format == "adapter" else "transformers",
        "base": {"path": "/models/base", "id": None},
        "checkpoints": [{"step": 10, "path": "/runs/checkpoint-10"}],
        **fields,
    }


def _manifest(output_format: str, **fields: object) -> Manifest:
    return Manifest.from_json(_document(output_format, **fields), Path("nexttools.json"))


def _merged_output(folder: Path, limit: int) -> dict[str, torch.Tensor]:
    folder.mkdir()
    tensors = {f"layer{i}.weight": torch.full((16, 16), float(i)) for i in range(4)}
    with ShardedWriter(folder, limit, [TensorSpec(n, (16, 16), torch.float32) for n in tensors]) as writer:
        for name in writer.names:
            writer.add(name, tensors[name])
        writer.finish()
        writer.write_index()
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "README.md").write_text("# card\n")
    return tensors


def test_manifest_lists_every_file_but_itself_and_the_card(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _merged_output(out, 2048)
    path = write_manifest(out, _manifest("merged"))
    manifest = json.loads(path.read_text())
    assert path.name == MANIFEST_NAME and manifest["alpha"] == 1.5
    expected = {
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        *(f"model-0000{i}-of-00002.safetensors" for i in (1, 2)),
    }
    assert set(manifest["files"]) == expected
    tokenizer = out / "tokenizer.json"
    assert manifest["files"]["tokenizer.json"] == {
        "size": tokenizer.stat().st_size,
        "sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
    }
    assert verify_output(out) == Manifest.from_json(manifest, path)
    assert Manifest.from_json(manifest, path).to_json() == manifest  # one reader, one writer
    (out / "README.md").write_text("# re-rendered card with a repo id\n")
    verify_output(out)  # the card is free to change


def test_safetensors_fingerprint_is_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4, 4)}, path, metadata={"format": "pt"})
    blob = path.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    assert file_fingerprint(path)["sha256"] == hashlib.sha256(blob[:header_end]).hexdigest()
    before = file_fingerprint(path)
    save_file({"w": torch.zeros(4, 4, dtype=torch.float16)}, path, metadata={"format": "pt"})
    assert file_fingerprint(path) != before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: (out / MANIFEST_NAME).unlink(), "no nexttools.json"),
        (lambda out: (out / MANIFEST_NAME).write_text("{not json"), "unreadable"),
        (lambda out: (out / "model-00002-of-00002.safetensors").unlink(), "missing"),
        (lambda out: (out / "config.json").write_text('{"model_type": "gpt2"}\n'), "changed"),
        (lambda out: _truncate(out / "model-00001-of-00002.safetensors"), "changed"),
        (lambda out: _unlist(out, "model.safetensors.index.json"), "no model.safetensors"),
        (lambda out: _unlist(out, "model-00001-of-00002.safetensors"), "not listed"),
        (lambda out: _unlist(out, "config.json"), r"config\.json is not listed"),
    ],
)
def test_verify_output_refuses_damaged_outputs(tmp_path: Path, damage, message: str) -> None:
    out = tmp_path / "out"
    _merged_output(out, 2048)
    write_manifest(out, _manifest("merged"))
    damage(out)
    with pytest.raises(UserError, match=message) as raised:
        verify_output(out)
    assert "\n" not in str(raised.value)


def test_single_file_and_adapter_outputs(tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    _merged_output(merged, 10**6)
    write_manifest(merged, _manifest("merged"))
    assert "model.safetensors" in verify_output(merged).files

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"a": torch.ones(2)}, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    write_manifest(adapter, _manifest("adapter"))
    with pytest.raises(UserError, match=r"adapter_config\.json is not listed"):
        verify_output(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    write_manifest(adapter, _manifest("adapter"))
    assert verify_output(adapter).weights == "adapter"
    with pytest.raises(UserError, match="not a complete nexttools output"):
        verify_output(tmp_path / "nowhere")


def _truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 4])


def _unlist(out: Path, name: str) -> None:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["files"][name]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda m: m.pop("method"), id="no-method"),
        pytest.param(lambda m: m.update(k="5"), id="k-not-int"),
        pytest.param(lambda m: m.update(checkpoints=[]), id="no-checkpoint"),
        pytest.param(lambda m: m["base"].pop("path"), id="no-base-path"),
        pytest.param(lambda m: m.update(checkpoints=[{"path": "x"}]), id="checkpoint-without-step"),
        pytest.param(lambda m: m.update(alpha=True), id="alpha-a-bool"),
        pytest.param(lambda m: m.update(lora="r=8"), id="lora-not-an-object"),
        pytest.param(lambda m: m.update(untied_embeddings=1), id="untied-not-a-bool"),
    ],
)
def test_a_manifest_missing_what_readers_need_is_one_clear_error(tmp_path: Path, damage) -> None:
    out = tmp_path / "out"
    _merged_output(out, 2048)
    write_manifest(out, _manifest("merged"))
    document = json.loads((out / MANIFEST_NAME).read_text())
    damage(document)
    (out / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(UserError, match="the output is damaged"):
        verify_output(out)
    (out / MANIFEST_NAME).write_text("")
    with pytest.raises(UserError, match="is unreadable"):
        verify_output(out)
