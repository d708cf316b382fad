"""PEFT adapter reading: factors against PEFT's own merge, scaling, orientation, carried tensors, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from examples.demo_run import save_tiny_llama
from nexttools.checkpoints import (
    CheckpointRef,
    ModelWeights,
    check_same_targets,
    open_adapter,
)
from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.errors import UserError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "base", hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    out = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def make_adapter(
    base: Path, out: Path, config: LoraConfig, *, dtype: torch.dtype = torch.float32, safe: bool = True
) -> CheckpointRef:
    """Save a real PEFT adapter whose LoRA (and modules_to_save) weights are random, so that ΔW ≠ 0."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out, safe_serialization=safe)
    return CheckpointRef(step=1, path=out, kind="lora", layout="adapter")


def peft_merged(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, LoraLayer]]:
    """PEFT's own view: the merged state dict of base + adapter (float32), and each LoRA layer by its
    weight's name, read before the merge (its ``r``, ``lora_alpha`` and ``scaling`` are what PEFT applied)."""
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    layers = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    merged = peft_model.merge_and_unload().state_dict()
    return merged, layers


def assert_matches_peft(base: Path, adapter: AdapterCheckpoint) -> dict[str, torch.Tensor]:
    """Every module's factors reproduce PEFT's merged − base to ~1e-6, its rank, alpha and scaling are
    the ones PEFT applied (whatever order this PEFT release saved the patterns in), and nothing else
    moved."""
    weights = ModelWeights(base)
    adapter.check_base(weights)
    merged, layers = peft_merged(base, adapter.ref.path)
    for name, module in adapter.modules.items():
        factors = adapter.factors(name)
        assert factors.left.dtype == factors.right.dtype == torch.float32
        assert factors.shape == weights.shape(name) == module.shape
        ours = factors.left.double() @ factors.right.double().T
        peft_delta = merged[name].double() - weights.get(name).double()
        assert ((ours - peft_delta).norm() / peft_delta.norm()).item() < 1e-6, name
        layer = layers[name]
        assert module.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert module.rank == layer.r["default"]
        assert module.alpha == pytest.approx(float(layer.lora_alpha["default"]), rel=1e-12)
    moved = {
        name
        for name in weights.names
        if name in merged and not torch.equal(merged[name].to(weights.dtype(name)), weights.get(name))
    }
    assert moved == set(adapter.modules) | (set(adapter.carried) & set(weights.names))
    return merged


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"r": 8, "lora_alpha": 24}, id="plain-alpha-ne-r"),
        pytest.param({"r": 8, "lora_alpha": 16, "use_rslora": True}, id="rslora"),
        pytest.param(
            {
                "r": 8,
                "lora_alpha": 16,
                "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},
                # two entries match layer 0's k_proj: which one wins depends on the order this PEFT
                # release saves them in (sorted before 0.22, not since), so PEFT's choice is the truth
                "alpha_pattern": {"model.layers.0.self_attn.k_proj": 7, "k_proj": 3, "v_proj": 5},
            },
            id="rank-alpha-patterns",
        ),
    ],
)
def test_factors_match_peft_merge(llama: Path, tmp_path: Path, kwargs: dict[str, Any]) -> None:
    ref = make_adapter(llama, tmp_path / "a", LoraConfig(target_modules=LLAMA_TARGETS, **kwargs))
    adapter = open_adapter(ref)
    assert len(adapter.modules) == 2 * len(LLAMA_TARGETS)
    assert adapter.scaling_rule == ("alpha/sqrt(r)" if kwargs.get("use_rslora") else "alpha/r")
    assert_matches_peft(llama, adapter)
    if "rank_pattern" in kwargs:
        modules = adapter.modules
        assert modules["model.layers.0.self_attn.q_proj.weight"].rank == 4
        assert modules["model.layers.1.mlp.down_proj.weight"].rank == 2
        assert modules["model.layers.0.mlp.down_proj.weight"].rank == 8
        assert modules["model.layers.0.self_attn.k_proj.weight"].alpha in {3.0, 7.0}  # a pattern, not 16
        assert modules["model.layers.0.self_attn.v_proj.weight"].alpha == 5.0


def test_bf16_adapter_is_upcast(llama: Path, tmp_path: Path) -> None:
    ref = make_adapter(
        llama,
        tmp_path / "a",
        LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
        dtype=torch.bfloat16,
    )
    stored = load_file(ref.path / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    adapter = open_adapter(ref)
    assert_matches_peft(llama, adapter)
    name = "model.layers.0.self_attn.v_proj.weight"
    module = adapter.modules[name]
    assert torch.equal(adapter.factors(name).right, stored[module.key_a].float().T)  # upcast is exact


def test_bin_adapter(llama: Path, tmp_path: Path) -> None:
    ref = make_adapter(
        llama, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), safe=False
    )
    assert (ref.path / "adapter_model.bin").is_file() and not (
        ref.path / "adapter_model.safetensors"
    ).exists()
    adapter = open_adapter(ref)
    assert adapter.files[0].name == "adapter_model.bin"
    assert_matches_peft(llama, adapter)


def test_corrupt_bin_adapter_is_refused(llama: Path, tmp_path: Path) -> None:
    ref = make_adapter(llama, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]), safe=False)
    (ref.path / "adapter_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"adapter_model\.bin: not a readable"):
        open_adapter(ref)


def test_embedding_lora_is_transposed_and_embedding_carried(llama: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"])
    adapter = open_adapter(make_adapter(llama, tmp_path / "a", config))
    module = adapter.modules["model.embed_tokens.weight"]
    assert module.transposed and module.is_embedding
    weights = ModelWeights(llama)
    assert module.shape == weights.shape("model.embed_tokens.weight")  # (vocab, hidden)
    # PEFT saves the (frozen) embedding layer beside its LoRA: carried, bit-identical to the base here.
    assert torch.equal(
        adapter.carried_tensor("model.embed_tokens.weight"), weights.get("model.embed_tokens.weight")
    )
    assert_matches_peft(llama, adapter)


def test_modules_to_save_are_carried(llama: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    adapter = open_adapter(make_adapter(llama, tmp_path / "a", config))
    assert list(adapter.carried) == ["lm_head.weight"]
    merged = assert_matches_peft(llama, adapter)
    assert torch.equal(adapter.carried_tensor("lm_head.weight"), merged["lm_head.weight"])
    assert not torch.equal(merged["lm_head.weight"], ModelWeights(llama).get("lm_head.weight"))


def test_gpt2_conv1d_fan_in_fan_out(gpt2: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = open_adapter(make_adapter(gpt2, tmp_path / "a", config))
    assert len(adapter.modules) == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer
    assert all(module.transposed for module in adapter.modules.values())
    assert adapter.modules["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D stores (in, out)
    assert_matches_peft(gpt2, adapter)


def test_orientation_is_settled_by_the_base_shape(gpt2: Path, tmp_path: Path) -> None:
    """A config whose fan_in_fan_out is wrong (PEFT forces it per layer type) is corrected by the shapes."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ref = make_adapter(gpt2, tmp_path / "a", config)
    edit_config(ref.path, fan_in_fan_out=False)
    adapter = open_adapter(ref)
    name = "transformer.h.0.attn.c_attn.weight"
    assert not adapter.modules[name].transposed and adapter.modules[name].shape == (96, 32)
    adapter.check_base(ModelWeights(gpt2))
    assert adapter.modules[name].transposed and adapter.modules[name].shape == (32, 96)
    merged, _ = peft_merged(gpt2, ref.path)
    base = ModelWeights(gpt2).get(name).double()
    factors = adapter.factors(name)
    ours = factors.left.double() @ factors.right.double().T
    assert ((ours - (merged[name].double() - base)).norm() / ours.norm()).item() < 1e-6


def test_wrong_base_is_refused_before_any_work(llama: Path, tmp_path: Path) -> None:
    ref = make_adapter(llama, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj", "gate_proj"]))
    other = save_tiny_llama(tmp_path / "other", hidden_size=48, intermediate_size=40)
    with pytest.raises(UserError, match=r"wrong --base"):
        open_adapter(ref).check_base(ModelWeights(other))
    gpt2_like = tmp_path / "gpt2like"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2_like)
    with pytest.raises(
        UserError, match=r"LoRA module model\.layers\.0\.mlp\.gate_proj has no weight .* in the base"
    ):
        open_adapter(ref).check_base(ModelWeights(gpt2_like))


def test_adapter_name_segments_are_stripped(llama: Path, tmp_path: Path) -> None:
    """Raw keys that still carry the adapter name (verl shards: ``lora_A.default.weight``) map the same."""
    ref = make_adapter(
        llama, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    raw = tmp_path / "raw"
    shutil.copytree(ref.path, raw)
    tensors = load_file(raw / "adapter_model.safetensors")
    renamed = {key.replace(".weight", ".default.weight"): value for key, value in tensors.items()}
    save_file(renamed, raw / "adapter_model.safetensors")
    plain, named = open_adapter(ref), open_adapter(CheckpointRef(1, raw, "lora", "adapter"))
    assert list(named.modules) == list(plain.modules)
    for name in plain.modules:
        assert torch.equal(named.factors(name).left, plain.factors(name).left)
        assert torch.equal(named.factors(name).right, plain.factors(name).right)


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def plain_adapter(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "checkpoint-10"
    make_adapter(llama, out, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return out


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"velora_config": {"x": 1}}, "velora_config"),
        ({"kasa_config": {"x": 1}}, "kasa_config"),
        ({"monteclora_config": {"x": 1}}, "monteclora_config"),
        ({"arrow_config": {"top_k": 3}}, "arrow_config"),
        ({"megatron_config": {"tp": 2}}, "megatron_config"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*initial adapter"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights.*initial adapter"),
        ({"init_lora_weights": "olora"}, "init_lora_weights.*initial adapter"),
        ({"init_lora_weights": "corda"}, "init_lora_weights.*initial adapter"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights.*initial adapter"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights.*initial adapter"),
        ({"lora_alpha": 0}, "lora_alpha=0.*lora_train_meta.json"),
    ],
)
def test_unsupported_features_are_refused(
    plain_adapter: Path, tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    folder = shutil.copytree(plain_adapter, tmp_path / "checkpoint-10")
    edit_config(folder, **changes)
    with pytest.raises(UserError, match=field) as error:
        open_adapter(CheckpointRef(10, folder, "lora", "trl"))
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva", "mica"])
def test_base_preserving_inits_are_accepted(plain_adapter: Path, tmp_path: Path, init: object) -> None:
    """These inits start from B·A = 0 (or a random ΔW) on the untouched base: ΔW = s·B·A stays exact."""
    folder = shutil.copytree(plain_adapter, tmp_path / "checkpoint-10")
    edit_config(folder, init_lora_weights=init)
    assert len(open_adapter(CheckpointRef(10, folder, "lora", "trl")).modules) == 4


def test_real_dora_adapter_is_refused(llama: Path, tmp_path: Path) -> None:
    ref = make_adapter(
        llama, tmp_path / "checkpoint-3", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(UserError, match=r"checkpoint-3.*use_dora"):
        open_adapter(ref)


def test_deepspeed_placeholder_adapter_is_refused(plain_adapter: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(plain_adapter, tmp_path / "checkpoint-20")
    save_file({}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"checkpoint-20.*no LoRA tensors"):
        open_adapter(CheckpointRef(20, folder, "lora", "trl"))


def test_missing_config_and_lone_factor_are_refused(plain_adapter: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(plain_adapter, tmp_path / "checkpoint-30")
    tensors = load_file(folder / "adapter_model.safetensors")
    lone = {key: value for key, value in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in key}
    save_file(lone, folder / "adapter_model.safetensors")
    with pytest.raises(
        UserError, match=r"layers\.0\.self_attn\.q_proj does not have exactly one LoRA A and one"
    ):
        open_adapter(CheckpointRef(30, folder, "lora", "trl"))
    (folder / "adapter_config.json").unlink()
    with pytest.raises(UserError, match=r"checkpoint-30: no adapter_config\.json"):
        open_adapter(CheckpointRef(30, folder, "lora", "trl"))


def test_check_same_targets(llama: Path, tmp_path: Path) -> None:
    first = open_adapter(
        make_adapter(llama, tmp_path / "checkpoint-1", LoraConfig(r=4, target_modules=["q_proj"]))
    )
    same = open_adapter(
        make_adapter(llama, tmp_path / "checkpoint-2", LoraConfig(r=2, target_modules=["q_proj"]))
    )
    check_same_targets([first, same])  # a different rank is fine: each checkpoint carries its own factors
    wider = open_adapter(
        make_adapter(llama, tmp_path / "checkpoint-3", LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    )
    with pytest.raises(
        UserError, match=r"checkpoint-3: target_modules differ from .*checkpoint-1 \(adds model\.layers"
    ):
        check_same_targets([first, same, wider])
    saving = open_adapter(
        make_adapter(
            llama,
            tmp_path / "checkpoint-4",
            LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
    )
    with pytest.raises(UserError, match=r"checkpoint-4: modules_to_save differ"):
        check_same_targets([first, saving])
