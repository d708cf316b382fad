"""The in-place protocol of one seed: does a jump, resumed in the run's own checkpoint, save RL steps?

For a budget S (a multiple of 40) with a checkpoint every S/40 steps (the paper's 10 of 400):

- **vanilla**: LoRA GRPO for S steps from the regime's start model, every checkpoint scored;
- **advisor** (before any arm): ``nexttools extract --steps :P`` (P = 15·S/40, the paper's 150),
  ``fit`` and ``backtest --eval-cmd "python -m examples.trl_grpo.eval_cmd {model}"``: its verdict
  and worth figures are recorded before the arms they predict are run;
- **in place** (the main protocol): every arm resumes the vanilla ``checkpoint-P`` with
  ``resume_from_checkpoint`` (its adapter, optimizer, scheduler, RNG, data position) for 10·S/40 more
  steps, on a new base: ``nexttools extrapolate --format base`` (W₀ + α·T̂), the run's own base for
  *no jump* (the noise band), the base plus the true change to the target step for the *oracle*
  (the ceiling: it shows the protocol can register a saving), and for ``factor-linear`` the
  run's own base with ``--format checkpoint``, a copy of ``checkpoint-P`` whose LoRA factors jumped;
- **restart** (secondary, the paper's protocol): the merged model and a fresh LoRA, no jump and
  ``next`` at α = 1.5.

Each arm is scored every S/40 steps with avg@8 (T = 1) and greedy accuracy on the 500 held-out
prompts. Results go to ``<seed dir>/results.json`` as each arm finishes; a re-run skips finished arms.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.trl_grpo import pipeline
from examples.trl_grpo.evaluate import accuracy, load_policy, sampled_accuracy
from examples.trl_grpo.grpo import train_grpo
from examples.trl_grpo.regime import Regime
from examples.trl_grpo.task import Split

K = 5
ORACLE_ALPHA = 1.0  # the oracle's target step is a vanilla checkpoint: P + 1·k·Δ


@dataclass(frozen=True)
class Arm:
    """One resumed run: ``protocol`` "in-place" or "restart"; ``method`` None for no jump, "oracle" for
    the true future weights; ``output`` the nexttools ``--format`` it resumes from."""

    protocol: str
    method: str | None
    alpha: float = 0.0
    output: str = "base"

    @property
    def name(self) -> str:
        what = "no-jump" if self.method is None else f"{self.method}-a{self.alpha:g}"
        return f"{self.protocol}/{what}"


def full_arms() -> list[Arm]:
    """Every arm of issue 13: no jump, oracle, next at three α, the four other methods at two."""
    arms = [Arm("in-place", None), Arm("in-place", "oracle", ORACLE_ALPHA)]
    arms += [Arm("in-place", "next", a) for a in (0.5, 1.0, 1.5)]
    for method in ("last-interval", "rl-extra", "linear-rank1", "factor-linear", "relex"):
        output = "checkpoint" if method == "factor-linear" else "base"
        arms += [Arm("in-place", method, a, output) for a in (1.0, 1.5)]
    return [*arms, Arm("restart", None, output="merged"), Arm("restart", "next", 1.5, output="merged")]


@dataclass(frozen=True)
class Advisor:
    """What ``nexttools backtest`` tries: α values and methods (empty: every registered one)."""

    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    methods: tuple[str, ...] = ()


REDUCED_ADVISOR = Advisor(alphas=(1.0, 1.5), methods=("next", "last-interval", "factor-linear"))
"""`make example`'s advisor: 6 jumps instead of 25 (each evaluation is a subprocess, ≈ 8 s here)."""


def relex_arms() -> list[Arm]:
    """RELEX beside the arms it is compared with: no jump, oracle, next and factor-linear at α = 1.5,
    relex at α = 1 and 1.5 (in place)."""
    return [
        Arm("in-place", None),
        Arm("in-place", "oracle", ORACLE_ALPHA),
        Arm("in-place", "next", 1.5),
        Arm("in-place", "factor-linear", 1.5, "checkpoint"),
        Arm("in-place", "relex", 1.0),
        Arm("in-place", "relex", 1.5),
    ]


def reduced_arms() -> list[Arm]:
    """`make example`: no jump, oracle, next and factor-linear at α = 1.5 (in place)."""
    return [
        Arm("in-place", None),
        Arm("in-place", "oracle", ORACLE_ALPHA),
        Arm("in-place", "next", 1.5),
        Arm("in-place", "factor-linear", 1.5, "checkpoint"),
    ]


def eval_command() -> str:
    """The advisor's eval command: this interpreter running :mod:`examples.trl_grpo.eval_cmd`."""
    return f"{sys.executable} -m examples.trl_grpo.eval_cmd {{model}}"


def run_seed(
    seed_dir: Path,
    start_dir: Path,
    split: Split,
    regime: Regime,
    budget: int,
    arms: list[Arm],
    seed: int,
    log: Callable[[str], None],
    advisor: Advisor = Advisor(),
) -> dict:
    """Run (or finish) vanilla, the advisor and every arm of one seed; return the results document.

    Document: ``{"seed", "regime", "budget", "extract", "fit", "backtest", "curves": {arm: [[step,
    avg@8, greedy], ...]}, "seconds": {arm: s}}`` (also ``seed_dir/results.json``).
    """
    every = budget // 40
    prefix, resume = 15 * every, 10 * every
    path = seed_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(seed=seed, regime=regime.name, budget=budget, k=K)
    results.setdefault("curves", {})
    results.setdefault("seconds", {})
    seed_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(start_dir)

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def score(model_dir: Path, adapter: Path | None = None) -> list[float]:
        policy = load_policy(model_dir, adapter)
        return [
            sampled_accuracy(policy, tokenizer, split.heldout),
            accuracy(policy, tokenizer, split.heldout),
        ]

    vanilla = seed_dir / "vanilla"
    if "vanilla" not in results["curves"]:
        log(f"seed {seed}: vanilla LoRA GRPO ({regime.name}), {budget} steps")
        started = time.monotonic()
        train_grpo(
            start_dir,
            vanilla,
            split.train,
            steps=budget,
            save_every=every,
            seed=seed,
            settings=regime.settings,
        )
        results["seconds"]["vanilla"] = time.monotonic() - started
        curve = [[0, *score(start_dir)]]
        curve += [
            [s, *score(start_dir, vanilla / f"checkpoint-{s}")] for s in range(every, budget + 1, every)
        ]
        results["curves"]["vanilla"] = curve
        save()

    workdir = seed_dir / "nexttools-run"
    if "backtest" not in results:
        log(
            f"seed {seed}: nexttools extract (steps <= {prefix}), fit, "
            "backtest (the advisor, before the arms)"
        )
        results["extract"] = pipeline.extract(vanilla, start_dir, workdir, prefix)
        results["fit"] = pipeline.fit(workdir)
        results["backtest"] = pipeline.backtest(
            workdir, eval_command(), alphas=list(advisor.alphas), methods=list(advisor.methods)
        )
        save()

    for arm in arms:
        if arm.name in results["curves"]:
            continue
        log(f"seed {seed}: {arm.name}: {resume} GRPO steps from step {prefix}")
        started = time.monotonic()
        out = seed_dir / "arms" / arm.name.replace("/", "-")
        shutil.rmtree(out, ignore_errors=True)  # an arm cut short restarts from scratch
        model_dir, resume_from = _start_of(arm, seed_dir, start_dir, vanilla, workdir, prefix, every)
        if arm.protocol == "in-place":
            curve = [[prefix, *score(model_dir, resume_from)]]
            train_grpo(
                model_dir, out / "run", split.train, steps=prefix + resume, save_every=every, seed=seed,
                settings=regime.settings, resume_from=resume_from,
            )  # fmt: skip
            steps = range(prefix + every, prefix + resume + 1, every)
            curve += [[s, *score(model_dir, out / "run" / f"checkpoint-{s}")] for s in steps]
        else:
            curve = [[prefix, *score(model_dir)]]
            train_grpo(
                model_dir,
                out / "run",
                split.train,
                steps=resume,
                save_every=every,
                seed=seed,
                settings=regime.settings,
            )
            steps = range(every, resume + 1, every)
            curve += [[prefix + s, *score(model_dir, out / "run" / f"checkpoint-{s}")] for s in steps]
        results["curves"][arm.name] = curve
        results["seconds"][arm.name] = time.monotonic() - started
        save()
    return results


def _start_of(
    arm: Arm, seed_dir: Path, start_dir: Path, vanilla: Path, workdir: Path, prefix: int, every: int
) -> tuple[Path, Path | None]:
    """(model folder the arm trains on, checkpoint it resumes in place, None for a restart)."""
    folder = seed_dir / "jumps" / arm.name.replace("/", "-")
    checkpoint = vanilla / f"checkpoint-{prefix}"
    if arm.protocol == "restart":
        if not folder.exists():
            if arm.method is None:
                _merge(start_dir, checkpoint, folder)
            else:
                pipeline.extrapolate(
                    workdir, alpha=arm.alpha, method=arm.method, output_format="merged", out=folder
                )
        return folder, None
    if arm.method is None:
        return start_dir, checkpoint
    if arm.method == "oracle":
        if not folder.exists():
            target = vanilla / f"checkpoint-{prefix + round(arm.alpha * K) * every}"
            _oracle_base(start_dir, checkpoint, target, folder)
        return folder, checkpoint
    if not folder.exists():
        pipeline.extrapolate(
            workdir, alpha=arm.alpha, method=arm.method, output_format=arm.output, out=folder
        )
    return (start_dir, folder) if arm.output == "checkpoint" else (folder, checkpoint)


def _merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def _merge(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """PEFT's ``merge_and_unload`` of one checkpoint with the base's tokenizer: the restart start."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(out)
    _tokenizer(base_dir).save_pretrained(out)  # type: ignore[attr-defined]


def _oracle_base(base_dir: Path, checkpoint: Path, target: Path, out: Path) -> None:
    """W₀' = W₀ + (W_target − W_P): the run's own checkpoint-P adapter on it gives the true W_target."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    now, future = _merged_state(base_dir, checkpoint), _merged_state(base_dir, target)
    state = {name: tensor + (future[name] - now[name]) for name, tensor in model.state_dict().items()}
    model.load_state_dict(state)
    model.save_pretrained(out)
    _tokenizer(base_dir).save_pretrained(out)  # type: ignore[attr-defined]


def _tokenizer(model_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
