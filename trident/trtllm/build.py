"""HF checkpoint -> TensorRT-LLM engines -> filled trtllm repository, with progress and clear errors.

Steps (``plan_steps``): compat view of the checkpoint, ``convert_checkpoint.py``, a check of what
it wrote, ``trtllm-build``, a check of the engines, the model repository. ``run_build`` runs them;
with ``dry_run`` it prints every command exactly as it would run and writes only the configs
(compat view and repository), so it needs neither a GPU nor tensorrt_llm.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import TRITON_IMAGE, TRTLLM_VERSION
from .checkpoint import attention_window, check_converted, read_model_shape, write_compat_view
from .checks import (GpuSetupError, check_engine_version, explain_failure, list_gpus, require_pinned_version,
                     tensorrt_llm_version)
from .commands import build_command, convert_command, shell_line
from .converter import CONVERT_SCRIPT_ENV, find_convert_script, in_repo
from .plan import BuildLayout, EngineSettings, ServingSettings, check_plan
from .repository import write_trtllm_repository


class BuildError(RuntimeError):
    """A build step failed; the message carries the reason and what to try."""


@dataclasses.dataclass(frozen=True)
class Commands:
    convert: list[str]
    build: list[str]


def plan_commands(*, layout: BuildLayout, engine: EngineSettings, convert_script: Path,
                  python: str = sys.executable, trtllm_build: str = "trtllm-build") -> Commands:
    return Commands(
        convert=convert_command(python=python, convert_script=convert_script, model_dir=layout.hf_dir,
                                checkpoint_dir=layout.checkpoint_dir, engine=engine),
        build=build_command(checkpoint_dir=layout.checkpoint_dir, engine_dir=layout.engine_dir, engine=engine,
                            trtllm_build=trtllm_build),
    )


def model_fingerprint(model_dir: Path) -> str:
    """Changes when the checkpoint does: config, tokenizer files, and weight file sizes/mtimes."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file():
            continue
        stat = path.stat()
        digest.update(path.name.encode())
        if stat.st_size < 16 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_stamp(*, model_dir: Path, engine: EngineSettings, gpu_names: Sequence[str], trtllm_version: str) -> dict:
    return {
        "tensorrt_llm": trtllm_version,
        "image": TRITON_IMAGE,
        "gpus": list(gpu_names),
        "model_dir": str(Path(model_dir).resolve()),
        "model_fingerprint": model_fingerprint(model_dir),
        "engine": dataclasses.asdict(engine) | {"max_input_len": engine.input_len},
    }


def engines_complete(*, layout: BuildLayout, engine: EngineSettings) -> bool:
    return (layout.engine_dir / "config.json").is_file() and all(
        (layout.engine_dir / f"rank{r}.engine").is_file() for r in range(engine.world_size))


def run_step(*, name: str, argv: Sequence[str], log: Callable[[str], None],
             popen: Callable = subprocess.Popen) -> None:
    """Run one command, echoing its output indented; BuildError with the diagnosis on failure."""
    log(f"$ {shell_line(argv)}")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    try:
        proc = popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise BuildError(f"{name}: could not start {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        print(f"    {line}", flush=True)
    returncode = proc.wait()
    if returncode != 0:
        raise BuildError(explain_failure(step=name, returncode=returncode, output_tail=list(tail)))


def run_build(*, model_dir: Path, out_dir: Path, engine: EngineSettings, serving: ServingSettings,
              dry_run: bool = False, skip_existing: bool = False, convert_script: str | None = None,
              python: str = sys.executable, trtllm_build: str = "trtllm-build",
              log: Callable[[str], None] = print, popen: Callable = subprocess.Popen,
              gpus: Callable = list_gpus, trtllm_version: Callable = tensorrt_llm_version) -> BuildLayout:
    layout = BuildLayout.under(out_dir)
    model_dir = Path(model_dir).resolve()
    shape = read_model_shape(model_dir)
    for warning in check_plan(engine=engine, serving=serving, shape=shape):
        log(f"warning: {warning}")
    window = attention_window(shape, engine.max_seq_len)
    total = 5
    log(f"TensorRT-LLM {TRTLLM_VERSION} build of {model_dir.name}: {engine.dtype}, tp={engine.tp_size} "
        f"pp={engine.pp_size}, max_batch_size={engine.max_batch_size}, max_seq_len={engine.max_seq_len}, "
        f"max_input_len={engine.input_len}, max_num_tokens={engine.max_num_tokens} -> {layout.root}")
    if window is not None:
        log(f"sliding window: the model attends to the last {window} positions; the tensorrt_llm model "
            f"gets max_attention_window_size {window}")

    if dry_run:
        script = find_convert_script(explicit=convert_script, family=shape.family)
        if script is None:
            script = Path(f"<{in_repo(shape.family)} of TensorRT-LLM {TRTLLM_VERSION}>")
            log("note: no convert_checkpoint.py found here; in Dockerfile.triton's image it is the image's "
                "own copy or a downloaded one (or pass --convert-script)")
        commands = plan_commands(layout=layout, engine=engine, convert_script=script, python=python,
                                 trtllm_build=trtllm_build)
        log(f"[1/{total}] compat view of the checkpoint -> {layout.hf_dir}")
        write_compat_view(model_dir=model_dir, out_dir=layout.hf_dir)
        log(f"[2/{total}] convert (dry run, not run):")
        log(f"$ {shell_line(commands.convert)}")
        log(f"[3/{total}] check {layout.checkpoint_dir}/config.json (dry run: skipped)")
        log(f"[4/{total}] build engines (dry run, not run):")
        log(f"$ {shell_line(commands.build)}")
        log(f"[5/{total}] model repository -> {layout.repository_dir}")
        write_trtllm_repository(out_dir=layout.repository_dir, tokenizer_dir=layout.hf_dir,
                                engine_dir=layout.engine_dir, engine=engine, serving=serving,
                                attention_window=window)
        log("dry run done: nothing was converted or built")
        return layout

    try:
        visible = gpus()
        version = trtllm_version(python=python)
        require_pinned_version(version)
    except GpuSetupError as exc:
        raise BuildError(str(exc)) from exc
    log(f"GPUs: {', '.join(f'{g.index}: {g.name} ({g.memory_mib} MiB, driver {g.driver})' for g in visible)}")
    if len(visible) < engine.world_size:
        log(f"warning: {len(visible)} GPU(s) here, tp x pp = {engine.world_size}: the engines can be built "
            f"one rank at a time, but serving them needs {engine.world_size} GPUs")
    stamp = build_stamp(model_dir=model_dir, engine=engine, gpu_names=[g.name for g in visible],
                        trtllm_version=version)
    up_to_date = (skip_existing and layout.stamp.is_file() and engines_complete(layout=layout, engine=engine)
                  and json.loads(layout.stamp.read_text()) == stamp)

    if up_to_date:
        log(f"engines in {layout.engine_dir} match this build (build.json): not rebuilding")
        write_compat_view(model_dir=model_dir, out_dir=layout.hf_dir)
    else:
        script = find_convert_script(explicit=convert_script, family=shape.family)
        if script is None or not script.is_file():
            raise BuildError(
                f"{in_repo(shape.family)} of TensorRT-LLM {TRTLLM_VERSION} not found "
                f"({script or 'no candidate path exists'}): pass --convert-script or set "
                f"{CONVERT_SCRIPT_ENV} (Dockerfile.triton finds the image's copy or downloads one: "
                "python3 -m trident.trtllm.converter)")
        commands = plan_commands(layout=layout, engine=engine, convert_script=script, python=python,
                                 trtllm_build=trtllm_build)
        layout.stamp.unlink(missing_ok=True)  # a half-done build must never look finished
        log(f"[1/{total}] compat view of the checkpoint -> {layout.hf_dir}")
        write_compat_view(model_dir=model_dir, out_dir=layout.hf_dir)
        log(f"[2/{total}] convert to a TensorRT-LLM checkpoint -> {layout.checkpoint_dir}")
        shutil.rmtree(layout.checkpoint_dir, ignore_errors=True)
        run_step(name="convert_checkpoint.py", argv=commands.convert, log=log, popen=popen)
        log(f"[3/{total}] check the converted checkpoint")
        try:
            check_converted(checkpoint_dir=layout.checkpoint_dir, shape=shape, tp_size=engine.tp_size,
                            pp_size=engine.pp_size, dtype=engine.dtype)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        log(f"[4/{total}] build engines -> {layout.engine_dir}")
        shutil.rmtree(layout.engine_dir, ignore_errors=True)
        run_step(name="trtllm-build", argv=commands.build, log=log, popen=popen)
        if not engines_complete(layout=layout, engine=engine):
            raise BuildError(f"trtllm-build exited 0 but {layout.engine_dir} lacks config.json or "
                             f"rank0..{engine.world_size - 1}.engine")
        shutil.rmtree(layout.checkpoint_dir, ignore_errors=True)
    try:
        check_engine_version(engine_dir=layout.engine_dir, runtime_version=version)
    except GpuSetupError as exc:
        raise BuildError(str(exc)) from exc
    log(f"[5/{total}] model repository -> {layout.repository_dir}")
    write_trtllm_repository(out_dir=layout.repository_dir, tokenizer_dir=layout.hf_dir,
                            engine_dir=layout.engine_dir, engine=engine, serving=serving,
                            attention_window=window)
    layout.stamp.write_text(json.dumps(stamp, indent=2) + "\n")
    log("done")
    return layout
