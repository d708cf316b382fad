"""Every command on a real pretrained LLM: SmolLM2-135M-Instruct (tied embeddings, a chat template)
trained with TRL's own GRPOTrainer, LoRA r = 16 on every linear layer.

Slow (about 15 minutes on 2 cores) and needs the model (`make real-llm`) and the ``examples`` extra:
``.venv-examples/bin/python -m pytest -m slow tests/test_real_llm.py``. The order is the user's: a
real run, ``extract`` (σ against a dense SVD), ``fit``, ``backtest`` with a real eval, ``inspect
--plot``, ``extrapolate`` in every format (each loads with transformers and generates), a TRL
in-place resume from ``--format base``, and a jump schedule inside a TRL run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

import torch  # noqa: E402

from examples.real_llm.prepare import FOLDER, default_cache  # noqa: E402

MODEL = default_cache() / FOLDER
STEPS, EVERY = 6, 2
ALPHA = 1.0


def nexttools(*args: str) -> dict[str, Any]:
    """Run the real CLI with ``--json``; its JSON document."""
    done = subprocess.run(
        [sys.executable, "-m", "nexttools", *args, "--json"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (MODEL / "model.safetensors").is_file():
        pytest.skip(f"no prepared model at {MODEL}: run `make real-llm`")
    from examples.real_llm.grpo import train

    root = tmp_path_factory.mktemp("real-llm")
    train(MODEL, root / "run", steps=STEPS, save_every=EVERY)
    nexttools("extract", str(root / "run"), "--base", str(MODEL), "--workdir", str(root / "work"), "--k", "1")
    return root


def _prompt() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from examples.real_llm.grpo import heldout

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = tokenizer.apply_chat_template(heldout()[0].messages, tokenize=False, add_generation_prompt=True)
    return dict(tokenizer(text, return_tensors="pt"))


def test_extract_matches_a_dense_svd(root: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nexttools.store import open_store

    with open_store(root / "work" / "trajectory.h5") as store:
        assert [int(s) for s in store.steps] == [2, 4, 6]
        assert len(store.modules) == 30 * 7  # q, k, v, o, gate, up, down in 30 layers
        sigma = store.read("global").sigma[-1]
        modules = list(store.modules)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), root / "run" / f"checkpoint-{STEPS}"
    )
    layers = dict(model.named_modules())
    for name in (modules[0], modules[len(modules) // 2], modules[-1]):
        layer = layers["base_model.model." + name.removesuffix(".weight")]
        dense = layer.get_delta_weight("default").double()
        expected = float(torch.linalg.svdvals(dense)[0])
        assert float(sigma[modules.index(name)]) == pytest.approx(expected, rel=1e-5), name


def test_fit_backtest_with_a_real_eval_and_inspect(root: Path) -> None:
    work = str(root / "work")
    fitted = nexttools("fit", "--workdir", work)
    assert fitted["backtest"]["holdout_rows"] >= 1
    eval_cmd = f"{sys.executable} -m examples.real_llm.grpo --eval {{model}}"
    verdict = nexttools(
        "backtest", "--workdir", work, "--eval-cmd", eval_cmd, "--method", "factor-linear",
        "--alpha", str(ALPHA), "--origins", "1",
    )  # fmt: skip
    (result,) = verdict["results"]
    assert result["method"] == "factor-linear" and 0.0 <= result["score"] <= 1.0
    real = verdict["real"]
    assert all(0.0 <= point["score"] <= 1.0 for point in real)
    plot = root / "inspect.png"
    inspected = nexttools("inspect", "--workdir", work, "--plot", str(plot))
    assert plot.stat().st_size > 10_000 and len(inspected["energy_ratio"]) == 3


@pytest.fixture(scope="module")
def outputs(root: Path) -> dict[str, Path]:
    found = {}
    for form in ("merged", "adapter", "base", "checkpoint"):
        found[form] = root / f"out-{form}"
        nexttools(
            "extrapolate", "--workdir", str(root / "work"), "--method", "factor-linear", "--alpha",
            str(ALPHA), "--format", form, "--out", str(found[form]), "--force",
        )  # fmt: skip
    return found


def _load(form: str, outputs: dict[str, Path], root: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if form == "merged":
        return AutoModelForCausalLM.from_pretrained(outputs["merged"], dtype=torch.float32)
    if form == "base":  # the run's own last checkpoint on the new base
        base = AutoModelForCausalLM.from_pretrained(outputs["base"], dtype=torch.float32)
        return PeftModel.from_pretrained(base, root / "run" / f"checkpoint-{STEPS}")
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    return PeftModel.from_pretrained(base, outputs[form])  # adapter, or the jumped checkpoint's adapter


@pytest.mark.parametrize("form", ["merged", "adapter", "base", "checkpoint"])
def test_every_output_loads_generates_and_is_the_same_model(
    root: Path, outputs: dict[str, Path], form: str
) -> None:
    batch = _prompt()
    model = _load(form, outputs, root).eval()
    reference = _load("merged", outputs, root).eval()
    with torch.no_grad():
        logits, expected = model(**batch).logits, reference(**batch).logits
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-3)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 8 or generated[0, -1].item() in (0, 1, 2)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert inner.config.tie_word_embeddings
    assert inner.lm_head.weight.data_ptr() == inner.model.embed_tokens.weight.data_ptr()


def test_a_trl_in_place_resume_from_the_base_output_starts_at_the_merged_model(
    root: Path, outputs: dict[str, Path]
) -> None:
    from transformers import TrainerCallback

    from examples.real_llm.grpo import train

    batch, first = _prompt(), {}

    class FirstForward(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
            if not first:
                with torch.no_grad():
                    first["logits"] = model(**batch).logits.detach().clone()

    train(
        outputs["base"], root / "resumed", steps=STEPS + EVERY, save_every=EVERY,
        resume_from=root / "run" / f"checkpoint-{STEPS}",
        attach=[lambda trainer: trainer.add_callback(FirstForward())],
    )  # fmt: skip
    merged = _load("merged", outputs, root).eval()
    with torch.no_grad():
        expected = merged(**batch).logits
    torch.testing.assert_close(first["logits"], expected, rtol=0, atol=2e-3)
    assert (root / "resumed" / f"checkpoint-{STEPS + EVERY}").is_dir()


def test_a_jump_schedule_inside_a_trl_run(root: Path) -> None:
    from examples.real_llm.grpo import train
    from nexttools.jump_record import read_jumps
    from nexttools.schedule.callback import JumpCallback
    from nexttools.store import open_store

    run, work = root / "scheduled", root / "scheduled-work"
    for step in (2, 4):
        shutil.copytree(root / "run" / f"checkpoint-{step}", run / f"checkpoint-{step}")
    callback = JumpCallback(work, every=EVERY, start=6, method="next", alpha=ALPHA, k=1, base=str(MODEL))
    train(MODEL, run, steps=8, save_every=EVERY, resume_from=run / "checkpoint-4", attach=[callback.attach])
    entries = read_jumps(work)
    assert [(e.step, e.method, e.kept, e.base_shift) for e in entries] == [
        (6, "next", True, True),
        (8, "next", True, True),
    ]
    with open_store(work / "trajectory.h5") as store:
        assert [int(s) for s in store.steps] == [2, 4, 6, 8] and store.shift_steps == (6,)
