"""``extrapolate`` end to end on real PEFT runs, against PEFT's merge, transformers and dense maths."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from examples.demo_run import DemoRun, build_demo_run
from nexttools.checkpoints.weights import ModelWeights
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.fit import FitOptions, fit
from nexttools.manifest import MANIFEST_NAME, verify_output
from nexttools.options import parse_size
from nexttools.outputs import get_output
from nexttools.predictor.saved import load_predictor
from nexttools.store import open_store
from nexttools.workdir import Workdir
from tests.cli_helpers import invoke
from tests.conftest import copy_tree

ROOT = Path(__file__).resolve().parents[1]


def _workdir(run: DemoRun, workdir: Path, *, k: int = 5, with_predictor: bool = True) -> Path:
    extract(ExtractOptions(run=run.run, workdir=workdir, k=k, device="cpu"))
    if with_predictor:  # a few epochs: these tests check the writer's exactness, not the predictor's skill
        fit(FitOptions(workdir=workdir, epochs=10, refit=False, device="cpu"))
    return workdir


@pytest.fixture(scope="module")
def lora_workdir(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Store + predictor of the 8-checkpoint demo run (fp32 Llama, untied)."""
    return _workdir(short_run, tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def last_merged(short_run: DemoRun) -> dict[str, torch.Tensor]:
    """W_c: PEFT's ``merge_and_unload`` of the short run's last checkpoint, float32."""
    return _peft_merged(short_run.base, _last_checkpoint(short_run))


def _small_run(folder: Path, **kwargs: object) -> DemoRun:
    """A 3-checkpoint demo run (used with k=2): enough for the linear baselines, cheap to extract."""
    return build_demo_run(folder, steps=(10, 20, 30), **kwargs)  # type: ignore[arg-type]


def _options(workdir: Path, out: Path, **changes: object) -> ExtrapolateOptions:
    return replace(
        ExtrapolateOptions(
            workdir=workdir,
            out=out,
            device="cpu",
            base_model_id="org/tiny",
            method="next",
            alpha=1.5,
            format="merged",  # what these tests check; the in-place default has its own tests
        ),
        **changes,
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = ModelWeights(folder)
    return {name: weights.get(name) for name in weights.names}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of ``adapter`` into ``base``, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: t.detach().clone() for name, t in merged.state_dict().items()}


def _peft_deltas(base: Path, adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    """ΔW of every LoRA module of each adapter, by PEFT's ``get_delta_weight`` (one model, all adapters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters[0], adapter_name="a0"
    )
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in adapters]
    with torch.no_grad():
        for path, module in model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "a0" in getattr(module, "lora_A", {}):
                for i, delta in enumerate(deltas):
                    delta[f"{path}.weight"] = module.get_delta_weight(f"a{i}").double()
    return deltas


def _last_checkpoint(run: DemoRun, back: int = 0) -> Path:
    return run.run / f"checkpoint-{run.steps[-1 - back]}"


def test_alpha_zero_reproduces_peft_merge_of_the_last_checkpoint(
    lora_workdir: Path, last_merged: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "a0"
    summary = extrapolate(_options(lora_workdir, out, alpha=0.0))
    merged = last_merged
    written = _tensors(out)
    assert set(written) == set(merged)
    for name, tensor in merged.items():
        assert written[name].dtype == torch.float32
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert summary.dtype == "float32" and not summary.dry_run
    assert verify_output(out).alpha == 0.0


def test_next_moves_every_module_by_a_rank1_step_of_norm_alpha_sigma(
    short_run: DemoRun, lora_workdir: Path, last_merged: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    alpha, out = 1.5, tmp_path / "next"
    extrapolate(_options(lora_workdir, out, alpha=alpha))
    merged = last_merged
    base = _tensors(short_run.base)
    written = _tensors(out)
    with open_store(lora_workdir / "trajectory.h5") as store:
        predicted = load_predictor(lora_workdir, store).predict(store)
        modules = list(store.modules)
        u_offset = store.u_offset
    assert len(modules) == 14
    for j, name in enumerate(modules):
        change = (written[name] - merged[name]).double()
        s = torch.linalg.svdvals(change)
        assert s[1] / s[0] < 1e-4, name
        assert s[0].item() == pytest.approx(alpha * float(predicted.sigma[j]), rel=1e-4), name
        u_hat = torch.from_numpy(predicted.u[u_offset[j] : u_offset[j + 1]]).double()
        left = torch.linalg.svd(change)[0][:, 0]
        assert abs(float(left @ u_hat / u_hat.norm())) == pytest.approx(1.0, abs=1e-5), name
    for name in set(base) - set(modules):  # norms, embeddings, lm_head: the base's bytes
        assert torch.equal(written[name], base[name]), name


def test_output_is_a_complete_drop_in_model_that_generates(
    short_run: DemoRun, lora_workdir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    extrapolate(_options(lora_workdir, out))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == (short_run.base / "chat_template.jinja").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    manifest = verify_output(out)
    assert manifest.nexttools_version and manifest.created_utc and manifest.predictor is not None
    assert (manifest.method, manifest.alpha, manifest.k, manifest.format) == ("next", 1.5, 5, "merged")
    assert manifest.library_name == "transformers" and manifest.base.id == "org/tiny"
    assert manifest.steps == list(short_run.steps)
    assert manifest.backtest is not None and manifest.backtest["winner"] in manifest.backtest["methods"]
    assert "base_model: org/tiny" in (out / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert torch.isfinite(model(ids).logits).all()


def test_small_shards_round_trip(lora_workdir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    extrapolate(_options(lora_workdir, single))
    summary = extrapolate(_options(lora_workdir, sharded, max_shard_size=100_000))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert summary.shards == len(shards) > 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert (
        not (sharded / "model.safetensors").exists()
        and not (single / "model.safetensors.index.json").exists()
    )
    ours, reference = _tensors(sharded), _tensors(single)
    assert all(torch.equal(ours[name], reference[name]) for name in reference) and set(ours) == set(reference)
    loaded = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert all(torch.equal(loaded[name], ours[name]) for name in ours)


def test_adapter_output_merges_to_the_merged_output(
    short_run: DemoRun, lora_workdir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_out, adapter_out = tmp_path / "merged", tmp_path / "adapter"
    extrapolate(_options(lora_workdir, merged_out, alpha=2.0))
    summary = extrapolate(_options(lora_workdir, adapter_out, alpha=2.0, format="adapter"))
    assert summary.format == "adapter" and verify_output(adapter_out).library_name == "peft"
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {9}  # r = 8, plus the rank-1 step
    base = AutoModelForCausalLM.from_pretrained(short_run.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_out, is_trainable=True)
    assert any(p.requires_grad for p in model.parameters())
    via_peft = {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}
    written = _tensors(merged_out)
    for name, tensor in written.items():
        torch.testing.assert_close(via_peft[name], tensor, rtol=0, atol=2e-6, msg=name)


def test_baselines_match_dense_computations(short_run: DemoRun, lora_workdir: Path, tmp_path: Path) -> None:
    """On PEFT's own dense ΔW_i of the last k+1 checkpoints:

    - last-interval: T̂ = ΔW_c − ΔW_{c−k}, exactly (and as an adapter of rank r + 2r);
    - linear-rank1 (AlphaRL): top triples by dense SVD, sign-aligned, a_i = σ_i u_i fitted by least
      squares against the step and evaluated k spacings ahead: T̂ = (â − a_c) v_cᵀ.
    """
    k = 5
    steps = list(short_run.steps[-(k + 1) :])
    deltas = _peft_deltas(short_run.base, [short_run.run / f"checkpoint-{s}" for s in steps])
    base = _tensors(short_run.base)
    with open_store(lora_workdir / "trajectory.h5") as store:
        modules = list(store.modules)
    assert set(deltas[-1]) == set(modules)

    alpha = 0.7
    for output_format in ("merged", "adapter"):
        out = tmp_path / f"full-{output_format}"
        extrapolate(_options(lora_workdir, out, alpha=alpha, method="last-interval", format=output_format))
    written = _tensors(tmp_path / "full-merged")
    for name in modules:
        expected = base[name].double() + deltas[-1][name] + alpha * (deltas[-1][name] - deltas[0][name])
        torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "full-adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {24}  # r + 2r: ΔW_c − ΔW_{c−k} has rank ≤ 2r

    alpha = 1.0
    extrapolate(_options(lora_workdir, tmp_path / "rank1", alpha=alpha, method="linear-rank1"))
    written = _tensors(tmp_path / "rank1")
    x = torch.tensor(steps, dtype=torch.float64)
    ahead = x[-1] + k * (x[-1] - x[0]) / k
    for name in modules:
        a, previous, v_last = [], None, None
        for delta in deltas:
            u_all, s_all, vh = torch.linalg.svd(delta[name])
            u, v = u_all[:, 0], vh[0]
            if previous is not None and float(u @ previous) < 0:
                u, v = -u, -v
            previous, v_last = u, v
            a.append(s_all[0] * u)
        a_matrix = torch.stack(a)
        centred = x - x.mean()
        slope = (centred[:, None] * (a_matrix - a_matrix.mean(0))).sum(0) / (centred**2).sum()
        a_hat = a_matrix.mean(0) + slope * (ahead - x.mean())
        expected_change = alpha * torch.outer(a_hat - a_matrix[-1], v_last)
        change = written[name].double() - (base[name].double() + deltas[-1][name])
        torch.testing.assert_close(change, expected_change, rtol=0, atol=2e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Dtypes and tied embeddings


def test_bf16_base_keeps_bf16_and_rounds_once(tmp_path: Path) -> None:
    run = _small_run(tmp_path / "bf16", base_dtype=torch.bfloat16)
    workdir = _workdir(run, tmp_path / "work", k=2, with_predictor=False)
    out = tmp_path / "out"
    extrapolate(_options(workdir, out, method="last-interval", alpha=1.0))
    written, base = _tensors(out), _tensors(run.base)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    last = _peft_merged(run.base, _last_checkpoint(run))  # fp32 W_c on the (exactly upcast) bf16 base
    first = _peft_merged(run.base, _last_checkpoint(run, back=2))  # c − k = checkpoint 1
    with open_store(workdir / "trajectory.h5") as store:
        modules = set(store.modules)
    for name, tensor in written.items():
        if name in modules:  # fp32 W_c + (ΔW_c − ΔW_{c−k}), rounded once: within half a bf16 ulp
            exact = last[name] + (last[name] - first[name])
            error = (tensor.float() - exact).abs()
            assert bool((error <= 2.0**-8 * exact.abs() + 1e-7).all()), name  # bf16 unit roundoff
            assert (tensor == exact.to(torch.bfloat16)).float().mean() > 0.99, name
        else:
            assert torch.equal(tensor, base[name]), name
    as_fp32 = tmp_path / "fp32"
    extrapolate(_options(workdir, as_fp32, method="last-interval", alpha=1.0, dtype="float32"))
    assert {t.dtype for t in _tensors(as_fp32).values()} == {torch.float32}
    assert json.loads((as_fp32 / "config.json").read_text())["dtype"] == "float32"


def test_tied_base_stays_tied(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = _small_run(tmp_path / "tied", tie_word_embeddings=True)
    workdir = _workdir(run, tmp_path / "work", k=2, with_predictor=False)
    out = tmp_path / "out"
    summary = extrapolate(_options(workdir, out, method="linear-rank1"))
    assert not summary.untied_embeddings
    assert "lm_head.weight" not in ModelWeights(out).names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_training_one_side_of_tied_embeddings_unties_them(tmp_path: Path) -> None:
    """``modules_to_save=["embed_tokens"]`` on a tied base trains the input side only (PEFT keeps the
    original weight in lm_head): both tensors are written and the tie is dropped."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from examples.demo_run import save_lora_checkpoint, save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
        base_model_name_or_path=str(base),
    )
    for step in (10, 20, 30):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        save_lora_checkpoint(model, config, step, folder, seed=1)
        tensors = load_file(folder / "adapter_model.safetensors")  # the trained embedding moves with the step
        (key,) = [key for key in tensors if "embed_tokens" in key]
        tensors[key] = tensors[key] + 1e-3 * step
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    workdir = _workdir(DemoRun(base, tmp_path / "run", ()), tmp_path / "work", k=2, with_predictor=False)
    out = tmp_path / "out"
    summary = extrapolate(_options(workdir, out, method="last-interval", alpha=1.0))
    assert summary.untied_embeddings and summary.warnings
    written = _tensors(out)
    base_embed = _tensors(base)["model.embed_tokens.weight"]
    trained_embed = load_file(tmp_path / "run" / "checkpoint-30" / "adapter_model.safetensors")[key]
    assert torch.equal(written["model.embed_tokens.weight"], trained_embed)  # carried: the last checkpoint's
    assert torch.equal(written["lm_head.weight"], base_embed)  # the untrained side: the base's
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, base_embed)
    assert torch.equal(loaded.model.embed_tokens.weight, trained_embed)


def _full_run(short_run: DemoRun, tmp_path: Path) -> tuple[Path, Path]:
    """A full-weight run (HF Trainer folders of whole models, steps 60, 70, 80) made from the LoRA
    demo run: W_0 + ΔW, and a trained norm. Returns (run folder, base folder)."""
    from safetensors.torch import save_file

    lora = DemoRun(short_run.base, short_run.run, short_run.steps[-3:])
    base = _tensors(lora.base)
    deltas = _peft_deltas(lora.base, [lora.run / f"checkpoint-{step}" for step in lora.steps])
    for step, delta in zip(lora.steps, deltas, strict=True):
        weights = {
            name: (t.double() + delta[name]).float() if name in delta else t for name, t in base.items()
        }
        weights["model.norm.weight"] = base["model.norm.weight"] + 1e-3 * step
        folder = tmp_path / "full" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(lora.base / "config.json", folder / "config.json")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return tmp_path / "full", lora.base


def test_full_weight_run_extrapolates_from_the_last_checkpoint(
    short_run: DemoRun, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A full-weight run (HF model folders): W_c is read, not merged; everything else is the last
    checkpoint's bytes (including a norm the run changed but that is not a 2-D module)."""
    run, base_folder = _full_run(short_run, tmp_path)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=run, base=str(base_folder), workdir=workdir, k=2, device="cpu"))
    out = tmp_path / "out"
    reads: list[tuple[str, str]] = []
    real_get = ModelWeights.get

    def counted_get(self: ModelWeights, name: str) -> torch.Tensor:
        reads.append((self.folder.name, name))
        return real_get(self, name)

    monkeypatch.setattr(ModelWeights, "get", counted_get)
    extrapolate(_options(workdir, out, method="last-interval", alpha=0.5))
    monkeypatch.undo()
    assert len(reads) == len(set(reads))  # every tensor of every checkpoint is read once, not twice
    last, first = _tensors(tmp_path / "full" / "checkpoint-80"), _tensors(tmp_path / "full" / "checkpoint-60")
    written = _tensors(out)
    with open_store(workdir / "trajectory.h5") as store:
        modules = set(store.modules)
    assert len(modules) == 14 and set(written) == set(last)
    for name, tensor in written.items():
        if name in modules:
            expected = last[name].double() + 0.5 * (last[name].double() - first[name].double())
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, last[name]), name
    assert verify_output(out).run_kind == "full"
    args = ["--workdir", str(workdir), "--out", str(tmp_path / "adapter"), "--format", "adapter"]
    _expect_error([*args, "--method", "last-interval"], "needs a LoRA run", monkeypatch, capsys)


# ---------------------------------------------------------------------------------------------
# CLI, dry run and errors


def test_dry_run_writes_nothing(lora_workdir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "dry"
    args = ["extrapolate", "--workdir", str(lora_workdir), "--out", str(out), "--dry-run", "--json"]
    args += ["--method", "next", "--alpha", "1.5", "--format", "merged", "--force"]
    code, stdout, stderr = invoke(
        [*args, "--max-shard-size", "100KB", "--device", "cpu"], capsys, monkeypatch
    )
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["dry_run"] and document["shards"] > 1 and document["dtype"] == "float32"
    assert "model.safetensors.index.json" in document["files"] and "config.json" in document["files"]
    assert document["total_bytes"] > 0 and "dry run" in stderr
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


def test_cli_writes_the_default_output_folder(
    lora_workdir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    workdir = copy_tree(lora_workdir, tmp_path / "work")
    args = [
        "extrapolate",
        "--workdir",
        str(workdir),
        "--alpha",
        "1.5",
        "--json",
        "--device",
        "cpu",
        "--force",
        "--method",
        "next",
    ]
    code, stdout, stderr = invoke(args, capsys, monkeypatch)
    assert code == 0, stderr
    assert "base_model" in stderr  # only a local path is known: the card will lack base_model
    document = json.loads(stdout)  # a LoRA run is written to resume in place
    assert document["format"] == "base" and "--format base" in stderr
    out = workdir / "extrapolated-alpha1.5-base"
    manifest = verify_output(out)
    assert json.loads(stdout)["out"] == str(out) and manifest.base.id is None
    assert manifest.command == shlex.join(["nexttools", *args])  # the real command line, as typed
    assert shlex.join(["nexttools", *args]) in (out / "README.md").read_text()
    assert (
        Workdir(workdir).output(2.0, "last-interval", get_output("adapter").suffix).name
        == "extrapolated-alpha2-last-interval-adapter"
    )


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
    assert parse_size("1.5MB") == 1_500_000
    for bad in ("5 parsecs", "-1GB", "0", ""):
        with pytest.raises(UserError):
            parse_size(bad)


def _expect_error(args: list[str], match: str, monkeypatch, capsys) -> str:
    code, _, stderr = invoke(["extrapolate", "--device", "cpu", *args], capsys, monkeypatch)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert match in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--alpha", "-0.5"], "'--alpha'"),
        (["--alpha", "nan"], "--alpha must be"),
        (["--max-shard-size", "big"], "cannot read the size"),
        (["--alpha", "1e30", "--dtype", "float16", "--force", "--method", "next"], "non-finite values"),
    ],
)
def test_bad_options_exit_2_and_leave_nothing(
    lora_workdir: Path, tmp_path: Path, monkeypatch, capsys, args: list[str], match: str
) -> None:
    out = tmp_path / "out"
    _expect_error(["--workdir", str(lora_workdir), "--out", str(out), *args], match, monkeypatch, capsys)
    assert sorted(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(
    lora_workdir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    extrapolate(_options(lora_workdir, out, alpha=0.5))
    before = verify_output(out)
    common = ["--workdir", str(lora_workdir), "--out", str(out), "--method", "next"]
    _expect_error([*common, "--format", "merged", "--force"], "--overwrite", monkeypatch, capsys)
    assert verify_output(out) == before
    extrapolate(_options(lora_workdir, out, alpha=1.0, overwrite=True))
    assert verify_output(out).alpha == 1.0 and sorted(tmp_path.iterdir()) == [out]


def test_input_errors_exit_2_and_leave_nothing(
    lora_workdir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = _small_run(tmp_path / "demo")
    workdir = _workdir(run, tmp_path / "work", k=2, with_predictor=False)
    out = tmp_path / "out"
    common = ["--workdir", str(workdir), "--out", str(out)]

    _expect_error(common, "no method given and no back-test to choose one", monkeypatch, capsys)
    _expect_error([*common, "--method", "next"], "run `nexttools fit`", monkeypatch, capsys)
    _expect_error(
        ["--workdir", str(tmp_path / "nowhere"), "--out", str(out)], "nexttools extract", monkeypatch, capsys
    )
    for name in ("predictor.safetensors", "predictor.json"):  # a predictor trained on another store
        shutil.copy(lora_workdir / name, workdir / name)
    _expect_error(common, "no method given and no back-test", monkeypatch, capsys)  # not this store's
    _expect_error([*common, "--method", "next"], "another store", monkeypatch, capsys)
    _expect_error(
        [
            *common,
            "--method",
            "last-interval",
            "--format",
            "adapter",
            "--dtype",
            "float16",
            "--alpha",
            "1e30",
        ],
        "non-finite",
        monkeypatch,
        capsys,
    )

    last = _last_checkpoint(run) / "adapter_model.safetensors"
    os.utime(last, ns=(time.time_ns(), time.time_ns() + 10**9))
    _expect_error([*common, "--method", "linear-rank1"], "changed since extraction", monkeypatch, capsys)
    shutil.move(_last_checkpoint(run), tmp_path / "moved")
    _expect_error([*common, "--method", "linear-rank1"], "is missing", monkeypatch, capsys)
    shutil.move(tmp_path / "moved", _last_checkpoint(run))
    extract(
        ExtractOptions(run=run.run, workdir=workdir, k=2, device="cpu")
    )  # re-extract: the store is current
    model_file = run.base / "model.safetensors"
    os.utime(model_file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    _expect_error([*common, "--method", "linear-rank1"], "base model", monkeypatch, capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_kill_mid_write_leaves_nothing_that_looks_complete(lora_workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f"""
import time
from pathlib import Path
from nexttools import writer
from nexttools.extrapolate import ExtrapolateOptions, extrapolate

real_submit = writer.ShardedWriter._submit  # every write, whole tensors and pieces alike
def slow_submit(self, *args, **kwargs):
    real_submit(self, *args, **kwargs)
    time.sleep(0.2)
writer.ShardedWriter._submit = slow_submit
extrapolate(ExtrapolateOptions(workdir=Path({str(lora_workdir)!r}), out=Path({str(out)!r}),
                               max_shard_size=50_000, device="cpu", base_model_id="org/tiny",
                               method="next", alpha=1.5, format="merged", force=True))
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(tmp_path.glob(".out.partial-*/model-00002-*")):
            assert process.poll() is None, "the writer finished or failed before it could be killed"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    (partial,) = tmp_path.glob(".out.partial-*")
    assert not out.exists()
    for folder in (out, partial):
        with pytest.raises(UserError):
            verify_output(folder)
    assert not (partial / MANIFEST_NAME).exists()
    extrapolate(_options(lora_workdir, out, max_shard_size=50_000))  # the next run cleans up and succeeds
    verify_output(out)
    assert sorted(tmp_path.iterdir()) == [out]
