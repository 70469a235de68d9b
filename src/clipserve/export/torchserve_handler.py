"""The TorchServe handler of an exported clipserve model (``clipserve export torchserve``).

TorchServe calls the archive's ``handler.py``, which forwards to :class:`ClipServeHandler`: it
loads the archived spec with clipserve's own engine (:class:`clipserve.local.LocalModel`: the same
loading, preprocessing, batching and scoring as the service, so the scores are the service's)
and answers each request as the service's single evaluation does. clipserve must be installed
in the Python environment TorchServe runs its workers with.

A request body is ``{"image_input", "text_prompt"}`` (JSON; ``image_input`` a URL, a data URI or
a path), or raw image bytes with the prompt in the ``text_prompt`` form field or header; the
answer is ``{"clip_score", "model_used", "error", "text_truncated"}``. TorchServe's batch (its
``batch_size``) is scored as one engine batch; a pair that fails carries its error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "clipserve_model.json"
"""In the archive: ``{"name": config name, "spec": the model's spec, paths relative to the
archive for bundled weights}``."""
WEIGHTS = "weights"


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def parse_request(request: dict[str, Any]) -> tuple[Any, str]:
    """``(image input, prompt)`` of one TorchServe request (``body`` or ``data``)."""
    body = request.get("body", request.get("data"))
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes | bytearray):
        try:
            body = json.loads(body)
        except ValueError:  # not JSON: the image itself
            prompt = request.get("text_prompt", "")
            return bytes(body), _text(prompt)
    if isinstance(body, dict):
        return body.get("image_input", ""), _text(body.get("text_prompt", ""))
    raise ValueError("expected a JSON body {image_input, text_prompt} or image bytes")


def archived_spec(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with bundled weights' paths made absolute under the extracted archive."""
    out = dict(spec)
    for field in ("model_name", "pretrained"):
        value = out.get(field)
        if isinstance(value, str) and value.startswith(("local-dir:" + WEIGHTS, WEIGHTS)):
            prefix = "local-dir:" if value.startswith("local-dir:") else ""
            out[field] = prefix + str(model_dir / value.removeprefix("local-dir:"))
    return out


class ClipServeHandler:
    def __init__(self) -> None:
        self.initialized = False
        self._model: Any = None

    def initialize(self, context: Any) -> None:
        from clipserve.config import Settings
        from clipserve.local import LocalModel

        model_dir = Path(context.system_properties["model_dir"])
        manifest = json.loads((model_dir / MANIFEST).read_text())
        name = manifest["name"]
        config = model_dir / "models.json"
        spec = archived_spec(model_dir, manifest["spec"])
        config.write_text(json.dumps({"models": {name: spec}}))
        settings = Settings(
            config_path=config,
            default_model=name,
            config_reload_interval_s=0,
            media={"media_root": model_dir},
        )
        self._model = LocalModel(name, settings=settings)
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        images: list[Any] = []
        texts: list[str] = []
        problems: dict[int, str] = {}
        for i, request in enumerate(data):
            try:
                image, text = parse_request(request)
            except ValueError as exc:
                problems[i] = str(exc)
                image, text = b"", ""
            images.append(image)
            texts.append(text)
        results = self._model.evaluate(images, texts)
        return [
            {
                "clip_score": None if i in problems else result.score,
                "model_used": result.model,
                "error": problems.get(i) or (result.error.message if result.error else None),
                "text_truncated": result.text_truncated,
            }
            for i, result in enumerate(results)
        ]

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
