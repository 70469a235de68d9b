"""What the local backends share: :class:`ModelSlot`, the loaded model that ``close`` drops (every
later call then refuses, naming the model); :class:`TowerSlots`, what the two tower backends
(open_clip, transformers) add as :class:`~clipserve.models.base.TowerBackend`\\ s: the tower
modules, the forward each encoder calls (a runtime's once :meth:`TowerSlots.use_tower` swapped it
in), the notes a runtime leaves in ``info.extra`` and the warm-up examples.

Threading: the runtimes call ``towers`` / ``use_tower`` / ``note_runtime`` once, at load, before
the backend is shared; the encoders then only read ``_forwards`` (on the device thread).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from clipserve.models.base import (
    BackendInfo,
    TokenizedTexts,
    Tower,
    TowerForward,
    TowerName,
    example_texts,
)
from clipserve.models.loader import release_device_memory


class ModelSlot:
    """A mixin: the backend sets ``_model``, ``_info`` (with ``extra['model_name']``) and
    ``_device``."""

    _model: Any
    _info: BackendInfo
    _device: torch.device

    def _live_model(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"backend for {self._info.extra['model_name']} was closed")
        return self._model

    def close(self) -> None:
        self._model = None
        release_device_memory(self._device)


class TowerSlots(ModelSlot):
    """A mixin: the backend also sets ``_dtype`` and ``_context_length``, calls
    :meth:`_init_towers` with its modules and implements ``preprocess``, ``tokenize`` and
    ``_text_inputs``."""

    _dtype: torch.dtype
    _context_length: int

    def _init_towers(self, modules: dict[TowerName, torch.nn.Module]) -> None:
        self._tower_modules = {name: module.eval() for name, module in modules.items()}
        self._forwards: dict[TowerName, TowerForward] = dict(modules)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        raise NotImplementedError

    def _text_inputs(self, tokens: TokenizedTexts) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _image_tower(self, input_name: str) -> Tower:
        """The image tower with a grey image of the model's size as batches of 1 and 3."""
        side = self._info.image_size or 224
        pixels = self.preprocess(Image.new("RGB", (side, side), (127, 127, 127)))
        pixels = pixels.to(self._device, self._dtype)
        return Tower(
            self._tower_modules["image"],
            (input_name,),
            examples=tuple((pixels.expand(n, *pixels.shape).contiguous(),) for n in (1, 3)),
        )

    def _text_tower(self, input_names: tuple[str, ...], length_inputs: frozenset[str]) -> Tower:
        """The text tower with :func:`example_texts` tokenized as the encoder would."""
        return Tower(
            self._tower_modules["text"],
            input_names,
            length_inputs=length_inputs,
            max_length=self._context_length,
            examples=tuple(
                self._text_inputs(self.tokenize(texts))
                for texts in example_texts(self._context_length)
            ),
        )

    def use_tower(self, name: TowerName, forward: TowerForward) -> None:
        self._live_model()
        self._forwards[name] = forward

    def note_runtime(self, fields: Mapping[str, str]) -> None:
        self._info = dataclasses.replace(self._info, extra={**self._info.extra, **fields})

    def _forward(self, name: TowerName) -> TowerForward:
        self._live_model()
        return self._forwards[name]

    def close(self) -> None:
        self._tower_modules.clear()
        self._forwards.clear()
        super().close()
