"""Helpers shared by the python-backend models; imported only inside the Triton stub."""
from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils


class BadRequest(ValueError):
    """A request that must be answered with INVALID_ARGUMENT; the message names the tensor."""


class ModelContext:
    """What a model needs from Triton's `initialize` args: its config, parameters and files."""

    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.parameters = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}

    def param(self, key: str, default: str | None = None) -> str:
        if key in self.parameters:
            return self.parameters[key]
        if default is None:
            raise KeyError(f"model {self.name}: parameter {key!r} missing from config.pbtxt")
        return default

    def invalid(self, err: BadRequest) -> "pb_utils.InferenceResponse":
        # The model name tells the caller which pipeline step refused the request.
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(f"{self.name}: {err}", pb_utils.TritonError.INVALID_ARG))


def input_array(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def name_list(param: str) -> list[str]:
    """The names in a comma-separated config parameter ("" for none)."""
    return [name.strip() for name in param.split(",") if name.strip()]
