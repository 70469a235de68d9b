"""Tiny family builders: the XLM-R tokenizer trained at build time, the open_clip xlm-roberta
folder's layout, seeding. (Their parity with each family's code path: tests/unit/models.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipserve.testing.tiny_families import (
    XLM_ROBERTA_TEXT_CFG,
    build_tiny_open_clip_xlm_roberta,
    tinyclip_config,
    xlm_roberta_tokenizer,
)


def test_xlm_roberta_tokenizer_has_xlm_rs_specials_and_is_deterministic() -> None:
    tokenizer = xlm_roberta_tokenizer()
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "pad", "eos", "unk")}
    assert ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3}
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    assert 100 < len(tokenizer) < 400
    assert tokenizer.model_max_length == 512
    texts = ["ein Foto einer Katze", "一只猫的照片", "a photo of a cat"]
    encoded = tokenizer(texts)["input_ids"]
    assert all(row[0] == 0 and row[-1] == 2 and 3 not in row for row in encoded)
    assert 3 in tokenizer("ψ")["input_ids"]  # unseen characters: <unk>
    assert xlm_roberta_tokenizer()(texts)["input_ids"] == encoded
    assert xlm_roberta_tokenizer(None).model_max_length > 10**9  # no limit set


def test_open_clip_xlm_roberta_folder_layout_and_seeding(tmp_path: Path) -> None:
    folder = build_tiny_open_clip_xlm_roberta(tmp_path / "a", seed=3)
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"] == dict(XLM_ROBERTA_TEXT_CFG)  # as the hub's config
    tower = json.loads((folder / "xlm-roberta-base" / "config.json").read_text())
    assert (tower["model_type"], tower["max_position_embeddings"]) == ("xlm-roberta", 514)
    assert (folder / "tokenizer.json").is_file()
    weights = load_file(folder / "open_clip_model.safetensors")
    assert any(key.startswith("text.transformer.") for key in weights)
    again = build_tiny_open_clip_xlm_roberta(tmp_path / "b", seed=3)
    same = load_file(again / "open_clip_model.safetensors")
    assert all(torch.equal(same[key], weights[key]) for key in weights)


def test_tinyclip_config_is_a_fresh_copy() -> None:
    config = tinyclip_config()
    config["vision_cfg"]["layers"] = 1
    assert tinyclip_config()["vision_cfg"]["layers"] == 10
