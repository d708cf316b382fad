"""The measurement protocol of one seed (the paper's 150 + 100 against 400, scaled to a budget of S steps).

For a budget ``S`` (a multiple of 40), with ``every = S/40``:

- **vanilla**: LoRA-GRPO for S steps from the SFT model, a checkpoint every ``every`` steps;
- the first ``15·every`` steps (150/400·S) of that run are what NExt sees: ``nexttools extract
  --steps :15·every``, ``fit``, ``extrapolate --alpha A --method M``;
- each extrapolated model is trained on for ``10·every`` steps (100/400·S), 250/400·S in all:
  a fresh LoRA on the merged output, and (NExt, one α) the adapter output trained on directly;
- **restart** control: the same restart (merge the step-150/400·S checkpoint, fresh LoRA) with no
  extrapolation, which separates the effect of the jump from that of restarting the adapter.

Every model is scored with :func:`examples.trl_grpo.evaluate.accuracy` at every checkpoint. Each
arm is written to ``<seed dir>/results.json`` as soon as it is done, and a re-run skips the arms
already there, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from examples.trl_grpo import pipeline
from examples.trl_grpo.evaluate import accuracy, load_policy
from examples.trl_grpo.grpo import GrpoSettings, train_grpo
from examples.trl_grpo.task import Split

METHODS = ("next", "last-interval", "linear-rank1")


@dataclass(frozen=True)
class Protocol:
    """What to run for every seed. ``budget`` is S; ``adapter_alpha`` is the α of the adapter-output arm."""

    budget: int
    alphas: tuple[float, ...]
    methods: tuple[str, ...] = METHODS
    adapter_alpha: float = 1.5
    settings: GrpoSettings = field(default_factory=GrpoSettings)

    def __post_init__(self) -> None:
        if self.budget % 40 != 0 or self.budget <= 0:
            raise ValueError(f"budget must be a positive multiple of 40, got {self.budget}")

    @property
    def every(self) -> int:
        """Checkpoint interval, 1/40 of the budget (the paper's 10 of 400)."""
        return self.budget // 40

    @property
    def prefix(self) -> int:
        """Steps NExt trains before extrapolating, 150/400 of the budget."""
        return 15 * self.every

    @property
    def resume(self) -> int:
        """Steps trained after extrapolation, 100/400 of the budget."""
        return 10 * self.every


def arm_name(method: str, alpha: float, output_format: str = "merged") -> str:
    """Key of one extrapolated arm in the results, e.g. ``next-a1.5`` or ``next-a1.5-adapter``."""
    suffix = "" if output_format == "merged" else f"-{output_format}"
    return f"{method}-a{alpha:g}{suffix}"


def run_seed(
    seed_dir: Path, sft_dir: Path, split: Split, protocol: Protocol, seed: int, log: Callable[[str], None]
) -> dict:
    """Run (or finish) every arm of one seed and return its results document (also saved as JSON).

    Document: ``{"seed", "budget", "sft_accuracy", "fit": <fit --json>, "extract": <extract --json>,
    "curves": {arm: [[global_step, accuracy], ...]}, "seconds": {arm: wall seconds}}``.
    """
    results_path = seed_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(seed=seed, budget=protocol.budget)
    results.setdefault("curves", {})
    results.setdefault("seconds", {})
    tokenizer = _tokenizer(sft_dir)

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    def score(model_dir: Path, adapter_dir: Path | None = None) -> float:
        return accuracy(load_policy(model_dir, adapter_dir), tokenizer, split.heldout)

    seed_dir.mkdir(parents=True, exist_ok=True)
    if "sft_accuracy" not in results:
        results["sft_accuracy"] = score(sft_dir)
        save()

    vanilla = seed_dir / "vanilla"
    if "vanilla" not in results["curves"]:
        log(f"seed {seed}: vanilla LoRA-GRPO, {protocol.budget} steps")
        started = time.monotonic()
        train_grpo(
            sft_dir,
            vanilla,
            split.train,
            steps=protocol.budget,
            save_every=protocol.every,
            seed=seed,
            settings=protocol.settings,
        )
        results["seconds"]["vanilla"] = time.monotonic() - started
        curve = [[0, results["sft_accuracy"]]]
        for step in range(protocol.every, protocol.budget + 1, protocol.every):
            curve.append([step, score(sft_dir, vanilla / f"checkpoint-{step}")])
        results["curves"]["vanilla"] = curve
        save()

    workdir = seed_dir / "nexttools-run"
    if "fit" not in results:
        log(f"seed {seed}: nexttools extract (steps <= {protocol.prefix}) and fit")
        results["extract"] = pipeline.extract(vanilla, sft_dir, workdir, protocol.prefix)
        results["fit"] = pipeline.fit(workdir)
        save()

    def resume_arm(name: str, start: Path, adapter: Path | None) -> None:
        """Score ``start`` (+ ``adapter``) at the prefix step, train ``protocol.resume`` steps, score each."""
        started = time.monotonic()
        curve = [[protocol.prefix, score(start, adapter)]]
        out = seed_dir / "resume" / name
        train_grpo(
            start,
            out,
            split.train,
            steps=protocol.resume,
            save_every=protocol.every,
            seed=seed,
            settings=protocol.settings,
            adapter_dir=adapter,
        )
        for step in range(protocol.every, protocol.resume + 1, protocol.every):
            curve.append([protocol.prefix + step, score(start, out / f"checkpoint-{step}")])
        results["curves"][name] = curve
        results["seconds"][name] = time.monotonic() - started
        save()

    if "restart" not in results["curves"]:
        log(f"seed {seed}: restart control (merge step {protocol.prefix}, fresh LoRA, no extrapolation)")
        merged = seed_dir / "extrapolated" / "restart"
        _merge_checkpoint(sft_dir, vanilla / f"checkpoint-{protocol.prefix}", merged)
        resume_arm("restart", merged, None)

    # The paper's α first (all methods, then the adapter output), then the other α: a sweep cut
    # short still has the headline comparison.
    alphas = sorted(protocol.alphas, key=lambda a: (a != protocol.adapter_alpha, a))
    arms = [(method, alpha, "merged") for alpha in alphas for method in protocol.methods]
    if "next" in protocol.methods:
        arms.insert(len(protocol.methods), ("next", protocol.adapter_alpha, "adapter"))
    for method, alpha, output_format in arms:
        name = arm_name(method, alpha, output_format)
        if name in results["curves"]:
            continue
        log(f"seed {seed}: {name}: nexttools extrapolate, then {protocol.resume} GRPO steps")
        out = seed_dir / "extrapolated" / name
        if not out.exists():
            pipeline.extrapolate(workdir, alpha=alpha, method=method, output_format=output_format, out=out)
        if output_format == "merged":
            resume_arm(name, out, None)
        else:
            resume_arm(name, sft_dir, out)
    return results


def _tokenizer(model_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _merge_checkpoint(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """PEFT's own ``merge_and_unload`` of one checkpoint, saved with its tokenizer: the restart control."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def seeds_done(root: Path, seeds: Sequence[int]) -> list[dict]:
    """The results documents of ``seeds`` under ``root`` (``seed-N/results.json``) that exist."""
    found = []
    for seed in seeds:
        path = root / f"seed-{seed}" / "results.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    return found
