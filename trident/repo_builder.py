"""Fill the templates in ``model_repository/`` into a runnable Triton model repository.

Templates are ``*.in`` files with ``${name}`` placeholders; every other file is copied as is.
The output folder is written whole into a temporary folder and then swapped in, and tracked
template files are never modified. A placeholder with no value, or a value no template uses,
is an error: a half-filled config must never reach Triton. Each of NVIDIA's names asked for
(``NVIDIA_NAMES``) is written as a copy of the ``llm`` model under that name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .fsutil import replace_dir

TEMPLATE_ROOT = Path(__file__).resolve().parents[1] / "model_repository"
#: Where the build writes XGrammar's description of the tokenizer (trident.grammar), inside the
#: repository: the engine model's parameter xgrammar_tokenizer_info_path names it.
TOKENIZER_INFO = "tensorrt_llm/xgrammar_tokenizer_info.json"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Template folders per flavour; later folders may add models, never replace them.
FLAVOURS = {
    "cpu": ("common", "cpu"),
    "trtllm": ("common", "trtllm"),
}
#: The names NVIDIA's TensorRT-LLM examples and clients give the text-level model: ``ensemble``
#: (its ensemble pipeline) and ``tensorrt_llm_bls`` (its BLS model). Each one asked for is the
#: ``llm`` model under that name (its code and config, ``ALIAS_SOURCE``), not Triton's ensemble
#: scheduler: that scheduler passes a client's cancellation only to steps it has not started yet
#: (Triton core's EnsembleContext::ScheduleSteps, r24.10 to core's main of 2026-06), so a direct
#: gRPC client of an ``ensemble`` -> ``llm`` pipeline that hung up left its generation running to
#: max_tokens (docs/architecture.md). Each costs a stub process (about 300 MB): ``ensemble`` by
#: default, the build's ``--nvidia-names`` chooses (none for a gateway-only deployment).
NVIDIA_NAMES = ("ensemble", "tensorrt_llm_bls")
DEFAULT_NVIDIA_NAMES = ("ensemble",)
ALIAS_SOURCE = "llm"


class TemplateError(ValueError):
    pass


def fill_template(text: str, values: Mapping[str, object], *, source: str = "<template>") -> str:
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise TemplateError(f"{source}: no value for placeholder(s) {', '.join(missing)}")
    filled = PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
    if "${" in filled:
        raise TemplateError(f"{source}: unfilled or malformed placeholder left: "
                            f"{filled[filled.index('${'):][:40]!r}")
    return filled


def model_vocab_size(model_dir: str | Path) -> int:
    """The model's vocabulary (its logits' width) from the checkpoint's config.json; 0 when it has
    none (the llm model then checks token ids against the tokenizer alone)."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0


def placeholders_in(paths) -> set[str]:
    names: set[str] = set()
    for path in paths:
        names |= {m.group(1) for m in PLACEHOLDER.finditer(Path(path).read_text())}
    return names


def parse_nvidia_names(text: str) -> tuple[str, ...]:
    """``--nvidia-names`` of both builds: comma-separated names of ``NVIDIA_NAMES`` (empty: none)."""
    return check_nvidia_names(text.split(","))


def check_nvidia_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names``, each of ``NVIDIA_NAMES``: stripped, without empty ones, in order, once each."""
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in NVIDIA_NAMES]
    if unknown:
        raise TemplateError(f"unknown NVIDIA model name(s) {', '.join(unknown)}; choose from {', '.join(NVIDIA_NAMES)} "
                            "(comma-separated, or nothing for none)")
    return names


def build_repository(*, flavour: str, values: Mapping[str, object], out_dir: Path,
                     template_root: Path = TEMPLATE_ROOT, nvidia_names: Sequence[str] = DEFAULT_NVIDIA_NAMES) -> Path:
    """Write the repository for ``flavour`` into ``out_dir`` (replacing what was there), with
    ``nvidia_names`` (of ``NVIDIA_NAMES``) as copies of the ``llm`` model."""
    if flavour not in FLAVOURS:
        raise TemplateError(f"unknown flavour {flavour!r}; choose one of {sorted(FLAVOURS)}")
    nvidia_names = check_nvidia_names(nvidia_names)
    sources = [Path(template_root) / part for part in FLAVOURS[flavour]]
    for src in sources:
        if not src.is_dir():
            raise TemplateError(f"template folder {src} is missing")
    templates = [p for src in sources for p in src.rglob("*.in")]
    unused = sorted(set(values) - placeholders_in(templates))
    if unused:
        raise TemplateError(f"value(s) used by no template of flavour {flavour}: {', '.join(unused)}")

    out_dir = Path(out_dir).resolve()
    with replace_dir(out_dir) as tmp:
        for src in sources:
            for path in sorted(src.rglob("*")):
                if path.is_dir() or "__pycache__" in path.parts:
                    continue
                rel = path.relative_to(src)
                dest = tmp / (rel.with_suffix("") if path.suffix == ".in" else rel)
                if dest.exists():
                    raise TemplateError(f"{rel} is defined twice in the templates")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".in":
                    dest.write_text(fill_template(path.read_text(), values, source=str(path)))
                elif path.name != ".keep":
                    shutil.copy2(path, dest)
        for alias in nvidia_names:
            _write_alias(tmp, alias, ALIAS_SOURCE)
    return out_dir


def _write_alias(repo: Path, alias: str, source: str) -> None:
    """``repo/alias``: a copy of ``repo/source`` whose config names it ``alias``."""
    if (repo / alias).exists():
        raise TemplateError(f"{alias} is defined in the templates and as an alias of {source}")
    if not (repo / source).is_dir():
        raise TemplateError(f"{alias} is an alias of {source}, which no template defines")
    shutil.copytree(repo / source, repo / alias, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / alias / "config.pbtxt"
    text, count = re.subn(rf'^name: "{re.escape(source)}"$', f'name: "{alias}"', config.read_text(), flags=re.M)
    if count != 1:
        raise TemplateError(f"{source}/config.pbtxt must have exactly one top-level line name: \"{source}\"")
    config.write_text(f"# {alias}: the {source} model under NVIDIA's name (trident.repo_builder.NVIDIA_NAMES)\n" + text)
