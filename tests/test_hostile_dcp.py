"""Hostile DCP ``.metadata`` files and chunk records: each is one ``UserError`` line, in bounded memory,
with no process-wide state changed and nothing executed (nexttools.checkpoints.pickle_data)."""

from __future__ import annotations

import io
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nexttools.checkpoints.dcp import METADATA_FILE, DcpAdapter, read_metadata
from nexttools.checkpoints.pickle_data import MAX_DEPTH, PickleRefused, read_pickle
from nexttools.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
KEY = "model.base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
P4 = b"\x80\x04"


def _u8(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return _u8(module) + _u8(name) + b"\x93"


# Each: (file bytes, what the one line says). Generated, never hand-copied from a real attack.
HOSTILE: dict[str, tuple[bytes, str]] = {
    # BUILD on a class or a function would set attributes process-wide
    "build-on-a-class": (
        P4 + _global("pathlib", "PurePosixPath") + b"}" + _u8("x") + b"K\x01s" + b"b.",
        "not a",
    ),
    "build-on-a-function": (
        P4 + _global("torch.serialization", "_get_layout") + b"}" + _u8("cache") + b"Ns" + b"b.",
        "not a",
    ),
    # names are never resolved: a lazily imported module stays unimported
    "lazy-import": (P4 + _global("torch._dynamo", "config") + b".", "expected a Metadata"),
    "reduce-os-system": (
        P4 + _global("os", "system") + _u8("touch PWNED") + b"\x85R.",
        "expected a Metadata",
    ),
    # memory bombs in a dozen bytes
    "str-2**50": (P4 + b"\x8d" + struct.pack("<Q", 2**50) + b"ab", "runs past the end"),
    "bytes-2**50": (P4 + b"\x8e" + struct.pack("<Q", 2**50) + b"ab", "runs past the end"),
    "str-2**32-1": (P4 + b"X" + struct.pack("<I", 2**32 - 1) + b"ab", "runs past the end"),
    "memo-2**32": (P4 + b"j" + struct.pack("<I", 2**32 - 1) + b".", "memo entry"),
    "long-int": (P4 + b"\x8b" + struct.pack("<I", 2**31) + b"\x01.", "an integer of"),
    # nesting that would overflow a recursive walk (or the C stack)
    "deep-tuples": (P4 + b"K\x01" + b"\x85" * 200_000 + b".", f"deeper than {MAX_DEPTH}"),
    "deep-lists": (P4 + b"]" * 200_000 + b"a" * 199_999 + b".", f"deeper than {MAX_DEPTH}"),
    "self-holding-list": (P4 + b"]\x94h\x00a.", "holds itself"),
    # opcodes outside plain data
    "persistent-id": (P4 + _u8("x") + b"Q.", "is not part of plain metadata"),
    "inst": (P4 + b"(ios\nsystem\n.", "is not part of plain metadata"),
    "empty": (b"", "runs past the end"),
    "stack-underflow": (P4 + b"a.", "needs a value"),
}


def _snapshot() -> tuple[object, ...]:
    """Process-wide state a hostile pickle could change: modules, and the attributes of the classes
    and functions a DCP metadata file names."""
    return (
        frozenset(sys.modules),
        dict(vars(pathlib.PurePosixPath)),
        dict(vars(pathlib.PurePath)),
        dict(getattr(torch.serialization._get_layout, "__dict__", {})),
        dict(vars(torch.Size)),
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_metadata_file_is_one_line_and_changes_nothing(tmp_path: Path, name: str) -> None:
    data, message = HOSTILE[name]
    (tmp_path / METADATA_FILE).write_bytes(data)
    before = _snapshot()
    with pytest.raises(UserError, match=r"\.metadata: ") as caught:
        read_metadata(tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert _snapshot() == before
    assert not list(tmp_path.glob("PWNED")) and not Path("PWNED").exists()


def test_memory_is_bounded_by_the_file(tmp_path: Path) -> None:
    """Every hostile file again, in a process whose address space may grow by 256 MiB only."""
    for name, (data, _) in HOSTILE.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / METADATA_FILE).write_bytes(data)
    script = textwrap.dedent(
        f"""
        import resource, sys
        from pathlib import Path
        from nexttools.checkpoints.dcp import read_metadata
        from nexttools.errors import UserError
        size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))
        for folder in sorted(Path({str(tmp_path)!r}).iterdir()):
            try:
                read_metadata(folder)
            except UserError:
                continue
            sys.exit(f"{{folder.name}} was accepted")
        print("all refused")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "all refused" in done.stdout, done.stderr[-2000:]


def test_plain_values_read_as_pickle_writes_them() -> None:
    values = [0, -5, 2**70, 3.5, "é", b"\x00", (1, 2), [1, [2]], {"a": (1,)}, None, True, [[1] * 3] * 3]
    for value in values:
        for protocol in (3, 4, 5):
            assert read_pickle(pickle.dumps(value, protocol=protocol)) == value
    with pytest.raises(PickleRefused):
        read_pickle(pickle.dumps({1, 2}))  # sets are not part of the grammar


# ---------------------------------------------------------------------------------------------
# A real DCP folder (written by torch's own dcp.save) with its metadata or records made hostile,
# through the real metadata classes (trusted here: the test writes them).


def _dcp_folder(tmp_path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    checkpoint = tmp_path / "run" / "checkpoint-10"
    folder = checkpoint / "pytorch_model_fsdp_0"
    state = {
        KEY: torch.randn(4, 8),
        KEY.replace("lora_A", "lora_B"): torch.randn(8, 4),
    }
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    (checkpoint / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "peft_type": "LORA"}')
    return folder


def _rewrite(folder: Path, change) -> None:
    metadata = pickle.loads((folder / METADATA_FILE).read_bytes())  # the test's own file
    change(metadata)
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))


def _entry(metadata):
    return metadata.state_dict_metadata[KEY]


def _storage(metadata):
    return next(info for index, info in metadata.storage_data.items() if index.fqn == KEY)


def test_the_real_folder_reads(tmp_path: Path) -> None:
    adapter = DcpAdapter(_dcp_folder(tmp_path))
    assert adapter.shapes[KEY.removeprefix("model.")] == (4, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(_entry(m), "size", torch.Size([10**6, 8])), "do not cover its shape"),
        (
            lambda m: (
                setattr(_entry(m), "size", torch.Size([10**6, 8])),
                setattr(_entry(m).chunks[0], "sizes", torch.Size([10**6, 8])),
            ),
            "claims",
        ),
        (lambda m: setattr(_storage(m), "offset", 2**70), "is not a size, offset or length"),
        (lambda m: setattr(_storage(m), "length", 2**50), "truncated"),
        (lambda m: setattr(_storage(m), "relative_path", "../../etc/passwd"), "outside its folder"),
        (lambda m: setattr(_entry(m).properties, "layout", torch.sparse_coo), "not a dense strided"),
        (lambda m: setattr(_entry(m).chunks[0], "offsets", torch.Size([3, 0])), "lies outside its tensor"),
    ],
)
def test_hostile_fields_of_a_real_metadata_file(tmp_path: Path, change, message: str) -> None:
    folder = _dcp_folder(tmp_path)
    _rewrite(folder, change)
    with pytest.raises(UserError, match=message):
        DcpAdapter(folder)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(lambda: torch.randn(4, 8).to_sparse(), id="sparse"),
        pytest.param(lambda: torch.empty(4, 8, device="meta"), id="meta"),
        pytest.param(
            lambda: torch.quantize_per_tensor(torch.randn(4, 8), 0.1, 0, torch.qint8), id="quantized"
        ),
        pytest.param(lambda: torch.randn(4, 8, dtype=torch.float64), id="other-dtype"),
        pytest.param(lambda: {"not": "a tensor"}, id="dict"),
    ],
)
def test_a_chunk_record_that_is_not_a_dense_tensor_is_one_line(tmp_path: Path, record) -> None:
    folder = _dcp_folder(tmp_path)
    buffer = io.BytesIO()
    torch.save(record(), buffer)
    data = buffer.getvalue()
    name = _storage(pickle.loads((folder / METADATA_FILE).read_bytes())).relative_path
    (folder / name).write_bytes(data + b"\0" * 4096)

    def point_at_it(metadata) -> None:
        info = _storage(metadata)
        info.offset, info.length = 0, len(data)

    _rewrite(folder, point_at_it)
    adapter = DcpAdapter(folder)
    with pytest.raises(UserError) as caught:
        adapter.get(KEY.removeprefix("model."))
    assert "\n" not in str(caught.value)
