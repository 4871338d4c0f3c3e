"""Models pgsim converts once into sentence-transformers directories: ``wordllama-l2-supercat``, the static
(token embeddings, mean, L2 norm) Matryoshka-trained model the ``wordllama`` wheel ships, 256 of its 1024
trained dimensions. The conversion is kept in pgsim's cache directory under a digest of the wheel's files,
made whole in a directory beside it and renamed into place, so another process sees all of it or none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pgsim.encoding.backends.base import CACHE_ENV, cache_dir
from pgsim.errors import ModelNotFound

log = logging.getLogger(__name__)

WORDLLAMA_NAME = "wordllama-l2-supercat"
WORDLLAMA_FILES = ("weights/l2_supercat_256.safetensors", "tokenizers/l2_supercat_tokenizer_config.json")
# wordllama's config/train/l2_supercat.toml trains 1024, 512, 256, 128 and 64; the wheel's weights are 256-d.
WORDLLAMA_MATRYOSHKA_DIMS = [64, 128, 256]
CONVERSION_FORMAT = 1  # bump when the converted directory changes, so older conversions are not used

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], str] = {}


def wordllama_l2_supercat_path() -> Path:
    """The directory of the sentence-transformers model equal to WordLlama's ``l2_supercat`` at 256
    dimensions (StaticEmbedding, then Normalize), converted from the installed ``wordllama`` wheel on first
    use; ModelNotFound when the wheel is not installed."""
    weights, tokenizer = _wordllama_files()
    target = cache_dir() / "models" / f"{WORDLLAMA_NAME}-{_digest(weights, tokenizer)}"
    if (target / "modules.json").is_file():
        return target
    with _lock:
        if not (target / "modules.json").is_file():
            try:
                _convert(weights, tokenizer, target)
            except OSError as exc:
                raise ModelNotFound(
                    f"Cannot write the converted model {WORDLLAMA_NAME!r} to {target.parent} ({exc}); "
                    f"set {CACHE_ENV} to a writable directory."
                ) from None
    return target


def _wordllama_files() -> tuple[Path, Path]:
    """The wheel's weights and tokenizer files, found without importing wordllama (its ``__init__`` imports
    pydantic and requests, and configures the root logger)."""
    from pgsim.encoding.models import PACKAGED_MODEL_WHEELS

    try:
        spec = importlib.util.find_spec("wordllama")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        weights, tokenizer = (Path(folder) / name for name in WORDLLAMA_FILES)
        if weights.is_file() and tokenizer.is_file():
            return weights, tokenizer
    wheel = PACKAGED_MODEL_WHEELS["wordllama"]
    raise ModelNotFound(
        f"Model {WORDLLAMA_NAME!r} ships in the {wheel} package, which is not installed (or lacks "
        f"{' and '.join(WORDLLAMA_FILES)}): pip install {wheel}"
    )


def _digest(*files: Path) -> str:
    """A digest of ``files``' contents and the conversion format, kept per file size and modification time
    (a process resolves the model's directory often)."""
    stats = [file.stat() for file in files]
    key = ("|".join(map(str, files)), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))
    known = _digests.get(key)
    if known is None:
        digest = hashlib.sha256(f"format {CONVERSION_FORMAT}\0".encode())
        for file in files:
            digest.update(file.read_bytes())
        known = _digests[key] = digest.hexdigest()[:16]
    return known


def _convert(weights: Path, tokenizer_file: Path, target: Path) -> None:
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    from pgsim.encoding.backends.auto import say

    say(f"converting {WORDLLAMA_NAME} from the wordllama package for sentence-transformers, once (a few seconds)")
    started = time.perf_counter()
    # wordllama tokenises without special tokens, padding or truncation, as StaticEmbedding does.
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    matrix = load_file(str(weights))["embedding.weight"].astype("float32")
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=matrix), Normalize()])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the model from others sharing the cache directory
        model.save(str(partial))
        config_file = partial / "config_sentence_transformers.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        config["matryoshka_dims"] = WORDLLAMA_MATRYOSHKA_DIMS
        config_file.write_text(json.dumps(config, indent=2))
        try:
            partial.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():
                raise  # not another process's finished conversion
            log.info("another process converted %s first; using its %s", WORDLLAMA_NAME, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("converted %s to %s in %.1fs", WORDLLAMA_NAME, target, time.perf_counter() - started)
