"""Generated damage: truncated, bit-flipped and mislabelled files must end in exit 0 or one clear line.

Variants come from a seeded generator (the same every run) over the files a user hands nexttools:
an adapter's safetensors file and config, the base's safetensors header, and the trajectory store.
Every variant runs through the real entry point; a traceback, any exit code but 0 and 2, or a
second line of error fails the test. Bounded to well under 30 s on a 2-core machine.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.demo_run import DemoRun, build_demo_run
from tests.cli_helpers import invoke

SEED = 20261201
Damage = Callable[[Path], None]


def _truncate(at: int) -> Damage:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: min(at, len(data))])

    return damage


def _flip(offset: int, bit: int) -> Damage:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset % len(data)] ^= 1 << bit
        path.write_bytes(bytes(data))

    return damage


def _header_length(value: int) -> Damage:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + data[8:])

    return damage


def _safetensors_variants(rng: random.Random, size: int, header: int) -> list[tuple[str, Damage]]:
    variants: list[tuple[str, Damage]] = []
    for at in [*sorted(rng.sample(range(size), 8)), 0, 7, 8, 8 + header - 1]:
        variants.append((f"truncated-{at}", _truncate(at)))
    for _ in range(14):
        offset, bit = rng.randrange(8 + header), rng.randrange(8)
        variants.append((f"header-flip-{offset}-{bit}", _flip(offset, bit)))
    for _ in range(3):
        offset, bit = rng.randrange(8 + header, size), rng.randrange(8)
        variants.append((f"data-flip-{offset}-{bit}", _flip(offset, bit)))
    for value in (0, header - 1, header + 8, size, 2**63):
        variants.append((f"header-length-{value}", _header_length(value)))
    return variants


def _config_variants(rng: random.Random, text: str) -> list[tuple[str, Damage]]:
    def write(content: str) -> Damage:
        return lambda path: path.write_text(content)

    config = json.loads(text)
    variants = [
        (f"config-truncated-{at}", write(text[:at])) for at in sorted(rng.sample(range(len(text)), 4))
    ]
    variants += [
        (f"config-{kind}", write(content))
        for kind, content in (("list", "[]"), ("number", "3"), ("null", "null"), ("empty", ""))
    ]
    replacements: dict[str, list[object]] = {
        "r": ["eight", -1, 0, None, 1e30],
        "lora_alpha": ["x", [], None, float("nan")],
        "target_modules": [5, None, {"a": 1}],
        "peft_type": ["PREFIX_TUNING", 3],
        "use_rslora": ["yes"],
        "fan_in_fan_out": [[1]],
        "rank_pattern": [{"(": 1}, {"q_proj": "x"}, "q"],
        "alpha_pattern": [{"v_proj": None}],
    }
    for key, values in replacements.items():
        for value in values:
            changed = {**config, key: value}
            variants.append((f"config-{key}={value!r}", write(json.dumps(changed))))
    variants.append(
        ("config-no-peft-type", write(json.dumps({k: v for k, v in config.items() if k != "peft_type"})))
    )
    return variants


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    return build_demo_run(tmp_path_factory.mktemp("pristine"), steps=(10, 20, 30, 40))


def _check(code: int, err: str, label: str) -> None:
    assert "Traceback" not in err, f"{label}: {err}"
    assert code in (0, 2), f"{label}: exit {code}: {err}"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), f"{label}: {err}"


def _header_size(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_damaged_inputs_end_in_one_line(pristine: DemoRun, tmp_path: Path, capsys, monkeypatch) -> None:
    rng = random.Random(SEED)
    adapter = pristine.run / "checkpoint-40" / "adapter_model.safetensors"
    config = pristine.run / "checkpoint-40" / "adapter_config.json"
    base = pristine.base / "model.safetensors"
    targets: list[tuple[Path, str, Damage]] = []
    targets += [
        (adapter, n, d) for n, d in _safetensors_variants(rng, adapter.stat().st_size, _header_size(adapter))
    ]
    targets += [(config, n, d) for n, d in _config_variants(rng, config.read_text())]
    targets += [
        (base, n, d) for n, d in _safetensors_variants(rng, base.stat().st_size, _header_size(base))[::3]
    ]
    root = pristine.base.parent
    seen = {0: 0, 2: 0}
    for index, (original, label, damage) in enumerate(targets):
        copy = tmp_path / f"v{index}"
        shutil.copytree(root, copy)
        damage(copy / original.relative_to(root))
        args = ["extract", str(copy / "run"), "--base", str(copy / "base"), "--workdir", str(copy / "w")]
        code, _, err = invoke([*args, "--k", "2", "--device", "cpu"], capsys, monkeypatch)
        _check(code, err, f"{original.name} {label}")
        seen[code] += 1
        shutil.rmtree(copy)
    assert seen[2] > len(targets) // 2  # most damage is caught, and said so
    print(f"\ncorruption: {len(targets)} damaged inputs, {seen[2]} refused in one line, {seen[0]} harmless")


def test_damaged_stores_end_in_one_line(pristine: DemoRun, tmp_path: Path, capsys, monkeypatch) -> None:
    workdir = tmp_path / "work"
    args = ["extract", str(pristine.run), "--base", str(pristine.base), "--workdir", str(workdir), "--k", "2"]
    assert invoke([*args, "--device", "cpu"], capsys, monkeypatch)[0] == 0
    store = workdir / "trajectory.h5"
    data = store.read_bytes()
    rng = random.Random(SEED + 1)
    variants: list[tuple[str, bytes]] = [
        (f"truncated-{at}", data[:at]) for at in sorted(rng.sample(range(len(data)), 6))
    ]
    for _ in range(16):
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        variants.append((f"flip-{offset}-{bit}", bytes(flipped)))
    outcomes: dict[int, int] = {}
    for label, content in variants:
        store.write_bytes(content)
        code, _, err = invoke(
            ["fit", "--workdir", str(workdir), "--epochs", "1", "--device", "cpu"], capsys, monkeypatch
        )
        _check(code, err, f"store {label}")
        outcomes[code] = outcomes.get(code, 0) + 1
    print(f"\ncorruption: {len(variants)} damaged stores, outcomes by exit code {outcomes}")
