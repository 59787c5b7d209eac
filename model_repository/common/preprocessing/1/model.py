"""Triton adapter of the ``preprocessing`` model: prompt -> token ids (TensorRT-LLM names)."""
import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from trident.contract import SERVER_ERROR, InvalidRequest, TaggedError, tag_error
from trident.engine_tensors import words_list
from trident.text.hf_tokenizer import load_tokenizer

log = logging.getLogger("trident.preprocessing")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])  # without torch
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except TaggedError as exc:  # the client's mistake: a 400 naming it
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.tagged())))
            except Exception:  # a bug: a 500, never hidden as a client error; execute never raises
                log.exception("preprocessing failed for request %r", request.request_id())
                message = tag_error(SERVER_ERROR, f"internal error in preprocessing (request {request.request_id()!r})")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def _one(self, request):
        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        queries = get("QUERY")
        if queries is None or queries.size != 1:
            raise InvalidRequest("send one QUERY per request", param="prompt")
        if get("REQUEST_OUTPUT_LEN") is None:
            raise InvalidRequest("REQUEST_OUTPUT_LEN is required", param="max_new_tokens")
        query = queries.reshape(-1)[0]
        try:
            query = query.decode("utf-8") if isinstance(query, bytes) else str(query)
        except UnicodeDecodeError:
            raise InvalidRequest("QUERY is not valid UTF-8", param="prompt") from None
        ids = self.tokenizer(query).input_ids
        end_id = get("END_ID")
        pad_id = get("PAD_ID")
        outputs = {
            "INPUT_ID": np.array([ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": get("REQUEST_OUTPUT_LEN").reshape(1, 1).astype(np.int32),
            "BAD_WORDS_IDS": words_list(self._words(get("BAD_WORDS_DICT"))),
            "STOP_WORDS_IDS": words_list(self._words(get("STOP_WORDS_DICT"))),
            "OUT_END_ID": np.array([[self.end_id if end_id is None else int(end_id.reshape(-1)[0])]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[self.pad_id if pad_id is None else int(pad_id.reshape(-1)[0])]], dtype=np.int32),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])

    def _words(self, value):
        if value is None:
            return []
        words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in value.reshape(-1)]
        return [self.tokenizer(w, add_special_tokens=False).input_ids for w in words if w]
