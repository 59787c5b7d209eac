"""Triton adapter of the text-level ``llm`` model; the request loop is trident.llm_service.

``execute`` validates and queues (it never waits for the engine); worker threads stream tokens
from the engine model over Triton's gRPC endpoint (trident.engine_grpc: BLS has a lock-order
deadlock in this stub) and send text responses through each request's response sender.
"""
import json
import logging
import os
import socket
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

from trident.contract import (ADD_SPECIAL_TOKENS_PARAMETER, ADMISSION_PARAMETER, CANCEL_PARAMETER, CANCEL_TOKEN_PARAMETER,
                              DETOKENIZE_PARAMETER, PING_PARAMETER, SERVER_ID_ENV, TOKEN_STRS_PARAMETER,
                              TOKENIZE_PARAMETER)
from trident.engine_tensors import ENGINE_OUTPUTS, OUTPUT_IDS, read_response, stop_inputs
from trident.llm_io import EngineChunk, LlmSettings, output_tensors
from trident.cancel_board import CancelBoard, default_directory, remove_stale
from trident.llm_service import EARLY_CANCEL_SECONDS, LlmService, model_end_ids
from trident.stub_objects import Retirement, requested_only
from trident.text.hf_tokenizer import load_tokenizer

log = logging.getLogger("trident.llm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SERVER_ID = os.environ.get(SERVER_ID_ENV) or socket.gethostname()  # which Triton: in admissions
INSTANCE = {"name": "?"}  # which instance of llm this stub serves (initialize): in a ping's answer


class TritonPythonModel:
    def initialize(self, args):
        _configure_logging()
        INSTANCE["name"] = args.get("model_instance_name") or "?"
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        settings = LlmSettings.from_parameters(params)
        tokenizer = load_tokenizer(params["tokenizer_dir"])  # without torch (XGrammar's, at the first guide)
        self.engine = _engine(settings.engine_model)
        self.service = LlmService(settings, tokenizer, self.engine, board=_cancel_board(config),
                                  end_ids=model_end_ids(params["tokenizer_dir"]))
        self.service.start()
        log.info("llm ready: %s", settings)

    def execute(self, requests):
        for request in requests:
            self.service.accept(TritonRequest(request))
        return None

    def finalize(self):
        self.service.stop()
        self.engine.close()


def _engine(model_name):
    """The engine over gRPC; over BLS only where grpcio or tritonclient is missing (NVIDIA's
    TensorRT-LLM image may lack tritonclient: docs/gpu.md), with a warning."""
    try:
        from trident.engine_grpc import GrpcEngine, engine_url
    except ImportError as exc:
        log.warning("llm: no gRPC client (%s): streaming from %s over BLS, which can deadlock under "
                    "load (docs/architecture.md); install tritonclient[grpc]", exc, model_name)
        return BlsEngine(model_name, Retirement())
    url = engine_url()
    log.info("llm: streaming from %s over gRPC at %s", model_name, url)
    return GrpcEngine(model_name, url)


def _cancel_board(config):
    """With more than one instance of this model, the board they share cancel requests on
    (trident.cancel_board); None with one."""
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
    if instances <= 1:
        return None
    directory = default_directory(config["name"])
    try:
        board = CancelBoard(directory, keep=EARLY_CANCEL_SECONDS)
    except OSError as exc:  # served anyway: a cancel request at another instance then waits for
        # the gateway's safety net (it cancels the call 3 s later)
        log.warning("llm: %d instances but no cancel board in %s (%s): a cancel request that reaches "
                    "another instance ends its request only seconds later", instances, directory, exc)
        return None
    log.info("llm: %d instances share cancel requests in %s", instances, board.directory)
    for stale in remove_stale(board.directory):
        log.info("llm: removed %s, the cancel board of a Triton that is gone", stale)
    return board


def _configure_logging():
    # The stub's stderr ends up in Triton's log; without a handler INFO lines (cancellations) vanish.
    logger = logging.getLogger("trident.llm")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _text_tensor(text):
    """A [1, 1] BYTES output (``server``, ``instance``)."""
    return np.array([[text.encode()]], dtype=np.object_)


class TritonRequest:
    """trident.llm_io.Request over a Triton request and its decoupled response sender."""

    def __init__(self, request):
        """The request's inputs are read in ``execute`` only (the service's accept), never from
        the workers: a decoupled request's input tensors must not be touched once execute has
        returned."""
        self._request = request
        self._sender = request.get_response_sender()
        # Only these outputs are sent: the stub would drop the others without the GIL.
        self._outputs = frozenset(request.requested_output_names())
        # Its parameters (admission, cancel token, cancel request), read once.
        try:
            parameters = json.loads(request.parameters() or "{}")
        except (ValueError, AttributeError):
            parameters = {}
        self._parameters = parameters if isinstance(parameters, dict) else {}

    def input(self, name):
        tensor = pb_utils.get_input_tensor_by_name(self._request, name)
        return None if tensor is None else tensor.as_numpy()

    def _parameter(self, name):
        return self._parameters.get(name)

    def wants_admission(self):
        return bool(self._parameter(ADMISSION_PARAMETER))

    def cancel_token(self):
        token = self._parameter(CANCEL_TOKEN_PARAMETER)
        return token if isinstance(token, str) and token else None

    def cancels(self):
        token = self._parameter(CANCEL_PARAMETER)
        return token if isinstance(token, str) and token else None

    def pings(self):
        return self._parameter(PING_PARAMETER) is True

    def tokenizer_call(self):
        if self._parameter(TOKENIZE_PARAMETER) is True:
            return "tokenize"
        return "detokenize" if self._parameter(DETOKENIZE_PARAMETER) is True else None

    def adds_special_tokens(self):
        return self._parameter(ADD_SPECIAL_TOKENS_PARAMETER) is not False

    def wants_token_strs(self):
        return self._parameter(TOKEN_STRS_PARAMETER) is True

    def is_cancelled(self):
        return self._sender.is_cancelled()

    def send_admission(self, prompt_tokens, prompt_ids=None):
        outputs = {"server": _text_tensor(SERVER_ID), "prompt_tokens": np.array([[prompt_tokens]], dtype=np.int32)}
        if prompt_ids is not None:
            outputs["prompt_token_ids"] = np.array([list(prompt_ids)], dtype=np.int32).reshape(1, len(prompt_ids))
        self._sender.send(self._response(outputs))

    def send_pong(self):
        self._sender.send(self._response({"server": _text_tensor(SERVER_ID), "instance": _text_tensor(INSTANCE["name"])}),
                          flags=FINAL)

    def send_text(self, text, *, index=0, n=1, tokens=None, counts=None):
        self._sender.send(self._response(output_tensors(text, index=index, tokens=tokens, n=n, counts=counts)))

    def send_final(self, text, gen, *, tokens=None, final=True, counts=None):
        response = self._response(output_tensors(text, index=gen.index, tokens=tokens, gen=gen, n=gen.req.sampling.n,
                                                 counts=counts))
        self._sender.send(response, flags=FINAL if final else 0)

    def _response(self, arrays):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, value) for name, value in requested_only(arrays, self._outputs).items()])

    def send_outputs(self, arrays, *, final=True):
        self._sender.send(self._response(arrays), flags=FINAL if final else 0)

    def send_error(self, message):
        self._sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def close(self):
        self._sender.send(flags=FINAL)


class BlsEngine:
    """trident.llm_io.EngineClient: the engine model over decoupled BLS (the fallback: see
    ``_engine``)."""

    def __init__(self, model_name, retired):
        self.model_name = model_name
        # Finished BLS response iterators, let go only seconds later on a Python thread: the stub
        # of Triton 2.51 could otherwise free them, NumPy arrays and all, without the GIL
        # (trident.stub_objects).
        self.retired = retired

    def close(self):
        self.retired.stop()

    def stream(self, tensors, engine_id, outputs=ENGINE_OUTPUTS):
        infer = pb_utils.InferenceRequest(
            model_name=self.model_name,
            inputs=[pb_utils.Tensor(name, value) for name, value in tensors.items()],
            requested_output_names=list(outputs),
            request_id=engine_id,
        )
        # Iterating drains the stream to its final response, also after a stop.
        responses = infer.exec(decoupled=True)
        try:
            yield from self._chunks(responses)
        finally:
            self.retired.keep(responses)

    @staticmethod
    def _chunks(responses):
        for response in responses:
            if response.has_error():
                yield EngineChunk(error=response.error().message())
                continue

            def get(name, response=response):
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                return None if tensor is None else tensor.as_numpy()

            yield EngineChunk.of(read_response(get))

    def stop(self, engine_id):
        stop = pb_utils.InferenceRequest(
            model_name=self.model_name,
            inputs=[pb_utils.Tensor(name, value) for name, value in stop_inputs().items()],
            requested_output_names=[OUTPUT_IDS],
            request_id=engine_id,
        )
        responses = stop.exec(decoupled=True)
        for _ in responses:
            pass
        self.retired.keep(responses)

