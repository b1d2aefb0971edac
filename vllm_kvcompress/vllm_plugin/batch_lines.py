"""Lines of an OpenAI batch file checked as `vllm run-batch` will parse them: it stops the
whole batch at the first line its `BatchRequestInput` model refuses, so
`vllm-kvcompress batch` answers such lines itself, with their line numbers."""

from __future__ import annotations

import json
import uuid

import pydantic
from vllm.entrypoints.launchers.run_batch import BatchRequestInput


def line_error(line: str) -> str | None:
    """Why vLLM's run-batch would refuse this line (None: it parses)."""
    try:
        BatchRequestInput.model_validate_json(line)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "line"
        return f"{where}: {first.get('msg', 'invalid')}"
    return None


def error_output(line: str, number: int, message: str) -> str:
    """An output line in run-batch's format for a refused input line."""
    try:
        custom_id = json.loads(line).get("custom_id")
    except (json.JSONDecodeError, AttributeError):
        custom_id = None
    return json.dumps({"id": f"vllm-{uuid.uuid4().hex}", "custom_id": custom_id,
                       "response": {"status_code": 400, "request_id": None, "body": None},
                       "error": f"line {number}: {message}"})
