"""transformers captioning and visual question answering models behind
:class:`~clipserve.models.base.CaptionBackend`: BLIP (``BlipForConditionalGeneration`` captions,
``BlipForQuestionAnswering`` answers) and BLIP-2 (``Blip2ForConditionalGeneration``: both), from a
Hub id or a local directory with their processor.

:meth:`HfCaptionBackend.generate` runs on the device thread. It runs each group of inputs that
share a task, a prompt and decoding options (:attr:`CaptionInput.group`) as one ``generate`` call
over their stacked pixels: one prompt per call, so nothing is padded and each image decodes
exactly what it would alone (greedy or beam search). A prompt that does not leave room for
``max_new_tokens`` in the text model's context fails its inputs alone, as a
:class:`~clipserve.models.base.FailedGeneration`.

A conditional prompt is continued, and the caption includes it ("a photography of a dog on a
beach"), as BLIP's own examples return it; an answer is only the generated text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from PIL import Image

from clipserve.errors import InvalidInputError, ModelLoadError
from clipserve.models.base import (
    BackendInfo,
    CaptionBackend,
    CaptionInput,
    FailedGeneration,
    GenerativeTask,
    Modality,
)
from clipserve.models.hf_backend import load_processor
from clipserve.models.hf_preprocessing import image_pipeline
from clipserve.models.loader import (
    describe_model,
    dtype_name,
    module_footprint,
)
from clipserve.models.quantize import compute_dtype, is_int8, quantization_info
from clipserve.models.slots import ModelSlot

CaptionArchitecture = Literal["blip", "blip-vqa", "blip-2"]
_MODALITIES: dict[CaptionArchitecture, frozenset[Modality]] = {
    "blip": frozenset({"caption"}),
    "blip-vqa": frozenset({"answer"}),
    "blip-2": frozenset({"caption", "answer"}),
}
_BLIP2_QUESTION = "Question: {} Answer:"


def _architecture(config: Any, model_name: str) -> CaptionArchitecture:
    model_type = str(getattr(config, "model_type", ""))
    architectures = [str(a) for a in getattr(config, "architectures", None) or ()]
    if model_type == "blip":
        return "blip-vqa" if "BlipForQuestionAnswering" in architectures else "blip"
    if model_type == "blip-2":
        return "blip-2"
    raise ModelLoadError(
        f"{describe_model('hf', model_name)} has model_type '{model_type}'; caption models "
        "(task 'caption') support 'blip' (BlipForConditionalGeneration, "
        "BlipForQuestionAnswering) and 'blip-2' (Blip2ForConditionalGeneration), or backend "
        "'openai-vision' for a remote model",
        technical=f"model_type {model_type!r} in the config of {model_name!r}",
    )


class HfCaptionBackend(ModelSlot, CaptionBackend):
    """A transformers BLIP or BLIP-2 model on one device. Build it with :meth:`load`."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        architecture: CaptionArchitecture,
        device: str,
        dtype: torch.dtype,
        name: str,
        default_prompt: str | None = None,
    ) -> None:
        self._model: Any = model.eval()
        self._tokenizer: Any = processor.tokenizer
        self._tokenizer_lock = threading.Lock()
        self._preprocess_image: Callable[[Image.Image], torch.Tensor]
        self._preprocess_image, preprocessing = image_pipeline(processor.image_processor, name)
        self._architecture: CaptionArchitecture = architecture
        self._device = torch.device(device)
        self._dtype = compute_dtype(dtype)
        self._default_prompt = default_prompt
        config = model.config
        text_config = config.text_config
        self._context_length = int(getattr(text_config, "max_position_embeddings", 512))
        self._image_tokens: list[int] = []
        if architecture == "blip-2":
            token = getattr(config, "image_token_id", None)
            if token is None:
                token = getattr(config, "image_token_index", None)
            if token is not None:
                self._image_tokens = [int(token)] * int(config.num_query_tokens)
        params, memory = module_footprint(model)
        self._info = BackendInfo(
            backend="hf",
            architecture=architecture,
            embed_dim=0,
            context_length=self._context_length,
            modalities=_MODALITIES[architecture],
            device=str(self._device),
            dtype=dtype_name(dtype),
            image_size=int(config.vision_config.image_size),
            parameter_count=params,
            memory_bytes=memory,
            extra={
                "model_name": name,
                "model_type": str(config.model_type),
                "image_preprocessing": preprocessing,
                **quantization_info(dtype),
            },
        )

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        device: str,
        dtype: torch.dtype,
        default_prompt: str | None = None,
    ) -> HfCaptionBackend:
        """Load a BLIP or BLIP-2 model and its processor from ``model_name`` (Hub id or
        directory); the class comes from the config (``model_type``, ``architectures``).
        ``default_prompt``: the conditional prompt of a caption request that sends none.
        Library errors propagate (the loader explains them)."""
        from transformers import (
            AutoConfig,
            Blip2ForConditionalGeneration,
            BlipForConditionalGeneration,
            BlipForQuestionAnswering,
        )

        config = AutoConfig.from_pretrained(model_name)
        architecture = _architecture(config, model_name)
        if is_int8(dtype):
            raise ModelLoadError(
                f"{describe_model('hf', model_name)}: precision 'int8' is not supported for "
                "caption models; use fp32 or bf16 on the CPU",
            )
        model_cls: Any = {
            "blip": BlipForConditionalGeneration,
            "blip-vqa": BlipForQuestionAnswering,
            "blip-2": Blip2ForConditionalGeneration,
        }[architecture]
        weights = compute_dtype(dtype)
        model = model_cls.from_pretrained(model_name, dtype=weights)
        model.to(device=device, dtype=weights)
        processor = load_processor(model_name)
        return cls(
            model,
            processor,
            architecture=architecture,
            device=device,
            dtype=dtype,
            name=model_name,
            default_prompt=default_prompt,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess_image(image)

    def generate(self, inputs: Sequence[CaptionInput]) -> list[str | FailedGeneration]:
        out: dict[int, str | FailedGeneration] = {}
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, item in enumerate(inputs):
            groups.setdefault(item.group, []).append(index)
        for indices in groups.values():
            first = inputs[indices[0]]
            try:
                texts: Sequence[str | FailedGeneration] = self._generate_group(
                    first.task,
                    first.prompt,
                    [inputs[i] for i in indices],
                )
            except InvalidInputError as exc:  # the group's prompt: its inputs fail alone
                texts = [FailedGeneration(exc)] * len(indices)
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
        return [out[i] for i in range(len(inputs))]

    def _generate_group(
        self, task: GenerativeTask, prompt: str | None, inputs: Sequence[CaptionInput]
    ) -> list[str]:
        model = self._live_model()
        options = inputs[0].options
        if task == "caption" and prompt is None:
            prompt = self._default_prompt
        if task == "answer" and not prompt:
            raise InvalidInputError("a question is required")
        prompt_ids = self._prompt_ids(task, prompt, options.max_new_tokens)
        pixels = torch.stack([item.pixels for item in inputs]).to(self._device, self._dtype)
        kwargs: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens,
            "num_beams": options.num_beams,
            "do_sample": False,
        }
        if prompt_ids is not None:
            ids = torch.tensor([prompt_ids] * len(inputs), dtype=torch.long, device=self._device)
            kwargs["input_ids"] = ids
            kwargs["attention_mask"] = torch.ones_like(ids)
        with torch.inference_mode():
            generated = model.generate(pixel_values=pixels, **kwargs)
        if self._architecture == "blip-2" and prompt_ids is not None:
            # A decoder-only language model returns its prompt first: keep the caption's
            # prompt (without the image tokens), drop the question.
            skip = len(self._image_tokens) if task == "caption" else len(prompt_ids)
            generated = generated[:, skip:]
        with self._tokenizer_lock:
            texts = self._tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [str(text).strip() for text in texts]

    def _prompt_ids(
        self, task: GenerativeTask, prompt: str | None, max_new_tokens: int
    ) -> list[int] | None:
        """The token ids of a prompt or question (None: no prompt), checked against the
        context."""
        if prompt is None:
            return None
        if self._architecture == "blip-2" and task == "answer":
            prompt = _BLIP2_QUESTION.format(prompt)
        with self._tokenizer_lock:
            ids = [int(i) for i in self._tokenizer(prompt, verbose=False)["input_ids"]]
        ids = self._image_tokens + ids
        room = self._context_length - max_new_tokens
        if len(ids) > room:
            what = "question" if task == "answer" else "prompt"
            raise InvalidInputError(
                f"the {what} is {len(ids)} tokens; with max_new_tokens {max_new_tokens} the "
                f"model's context of {self._context_length} tokens leaves room for {room}",
                detail={"prompt_tokens": len(ids), "context_length": self._context_length},
            )
        return ids
