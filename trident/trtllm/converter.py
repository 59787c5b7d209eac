"""Where ``convert_checkpoint.py``, TensorRT-LLM's checkpoint converter, comes from.

Each model family has its own (``examples/models/core/<family>/convert_checkpoint.py``: ``llama``
for LlamaForCausalLM, ``qwen`` for Qwen2ForCausalLM and Qwen3ForCausalLM; checkpoint.FAMILIES).
A converter is one of TensorRT-LLM's examples, not part of the tensorrt_llm wheel, and it has
to be the one of the installed release (its flags and weight mapping change between releases).
``find_convert_script`` takes, for the family being built, in order:

1. ``--convert-script`` or ``$TRIDENT_TRTLLM_CONVERT_SCRIPT``: the operator's choice;
2. a copy inside the image: tensorrtllm_backend's image build copies the release's ``examples/``
   to ``/app/examples``, which match the installed wheel by construction;
3. the copy that Dockerfile.triton downloads at image build (``python3 -m
   trident.trtllm.converter``) when the image has none.

The download tries the ``release/1.2.1`` ref first (tensorrtllm_backend PR #853 moved to it and
calls it the release's ref) and the ``v1.2.1`` tag second, which may not exist. A file that does
not look like the converter (an HTML error page, a moved file) is refused, not saved.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import TRTLLM_GIT_REFS, TRTLLM_VERSION
from .checkpoint import FAMILIES as ARCHITECTURE_FAMILIES

CONVERT_SCRIPT_ENV = "TRIDENT_TRTLLM_CONVERT_SCRIPT"
FAMILIES = tuple(sorted(set(ARCHITECTURE_FAMILIES.values())))  # llama, qwen


def in_repo(family: str = "llama") -> str:
    """The family's converter inside TensorRT-LLM's source tree (1.x layout)."""
    if family not in FAMILIES:
        raise ValueError(f"no converter family {family!r} (known: {', '.join(FAMILIES)})")
    return f"examples/models/core/{family}/convert_checkpoint.py"


def image_paths(family: str = "llama") -> tuple[Path, ...]:
    """Where NVIDIA's Triton + TensorRT-LLM images put TensorRT-LLM's examples/ (/app/examples first)."""
    return tuple(root / in_repo(family) for root in (Path("/app"), Path("/app/tensorrt_llm"), Path("/opt/tensorrt_llm")))


def download_path(family: str = "llama") -> Path:
    """Where ``ensure_converter`` saves a downloaded copy (Dockerfile.triton runs it at image build)."""
    root = Path("/opt/trident/third_party/tensorrt_llm") / TRTLLM_VERSION
    return root / "convert_checkpoint.py" if family == "llama" else root / family / "convert_checkpoint.py"


def candidate_paths(family: str = "llama") -> tuple[Path, ...]:
    """The image's own copy first, the downloaded one otherwise."""
    return image_paths(family) + (download_path(family),)


RAW_URL = "https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/{ref}/{path}"


class ConverterNotFound(RuntimeError):
    """No converter in the image and none could be downloaded; the message lists what was tried."""


def find_convert_script(*, explicit: str | None = None, env: dict | None = None,
                        candidates: Sequence[Path] | None = None, family: str = "llama") -> Path | None:
    """The converter to run: --convert-script, else $TRIDENT_TRTLLM_CONVERT_SCRIPT, else a known
    path of the family's converter."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(CONVERT_SCRIPT_ENV):
        return Path(env[CONVERT_SCRIPT_ENV])
    paths = candidate_paths(family) if candidates is None else candidates
    return next((path for path in paths if path.is_file()), None)


def converter_urls(refs: Iterable[str] = TRTLLM_GIT_REFS, family: str = "llama") -> list[str]:
    return [RAW_URL.format(ref=ref, path=in_repo(family)) for ref in refs]


def looks_like_converter(text: str) -> bool:
    """True for TensorRT-LLM's convert_checkpoint.py (its CLI and its import), not an error page."""
    return all(marker in text for marker in ("--model_dir", "--output_dir", "--tp_size", "tensorrt_llm"))


def http_get(url: str, *, timeout: float = 60.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (a fixed https URL)
        return resp.read().decode("utf-8")


def download_converter(*, dest: Path, urls: Sequence[str], fetch: Callable[[str], str] = http_get,
                       log: Callable[[str], None] = print) -> str:
    """Save the first URL that serves the converter to ``dest``; return that URL."""
    failures = []
    for url in urls:
        try:
            text = fetch(url)
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code}")
            continue
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            failures.append(f"{url}: {exc}")
            continue
        if not looks_like_converter(text):
            failures.append(f"{url}: not TensorRT-LLM's convert_checkpoint.py")
            continue
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        partial.write_text(text)
        os.replace(partial, dest)  # never a half-written converter under the final name
        log(f"[converter] {url} -> {dest}")
        return url
    raise ConverterNotFound(
        f"could not download convert_checkpoint.py of TensorRT-LLM {TRTLLM_VERSION}:\n  "
        + "\n  ".join(failures)
        + f"\nPass --convert-script or set {CONVERT_SCRIPT_ENV} to a copy of the file above from that release.")


def ensure_converter(*, family: str = "llama", dest: Path | None = None,
                     image_candidates: Sequence[Path] | None = None, urls: Sequence[str] | None = None,
                     fetch: Callable[[str], str] = http_get, log: Callable[[str], None] = print) -> Path:
    """The image's own converter of ``family`` when it has one; otherwise a downloaded copy (at
    ``dest``; the image's paths, the destination and the URLs are the family's unless given)."""
    own = next((path for path in (image_paths(family) if image_candidates is None else image_candidates)
                if path.is_file()), None)
    if own is not None:
        log(f"[converter] the image has TensorRT-LLM's converter: {own} (nothing downloaded)")
        return own
    dest = Path(download_path(family) if dest is None else dest)
    if dest.is_file() and looks_like_converter(dest.read_text(errors="replace")):
        log(f"[converter] already downloaded: {dest}")
        return dest
    download_converter(dest=dest, urls=converter_urls(family=family) if urls is None else urls, fetch=fetch, log=log)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m trident.trtllm.converter",
        description=f"Make TensorRT-LLM {TRTLLM_VERSION}'s convert_checkpoint.py available: the image's "
                    "own copy if it has one, else download it (Dockerfile.triton runs this).")
    parser.add_argument("--family", action="append", dest="families", choices=FAMILIES, default=None,
                        help=f"converter family, repeatable (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--dest", type=Path, default=None,
                        help="where a downloaded copy goes (one --family only; default: per family under "
                             f"{download_path().parent})")
    parser.add_argument("--ref", action="append", dest="refs", default=None,
                        help=f"git ref of NVIDIA/TensorRT-LLM to try, repeatable (default: "
                             f"{' then '.join(TRTLLM_GIT_REFS)})")
    args = parser.parse_args(argv)
    families = args.families or list(FAMILIES)
    if args.dest is not None and len(families) != 1:
        parser.error("--dest needs exactly one --family")
    for family in families:
        try:
            ensure_converter(family=family, dest=args.dest,
                             urls=converter_urls(args.refs or TRTLLM_GIT_REFS, family=family))
        except ConverterNotFound as exc:
            print(f"[converter] error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
