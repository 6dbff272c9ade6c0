"""`toy_bert`: a toy independent-embedding model (kind "indep") with a transformers BERT
text encoder, for the interface tests. One model file plus `toy_bert.yaml` beside it,
found through the environment variable ITM_PIPELINE_MODELS.

Text: its tokenizer is an `HFTokenizer` (pipeline.data.tokens) read from the folder named
by the model option `text_encoder`; the encoder is a `BertModel` of that folder's
config.json, mean-pooled over the attention mask -> Linear -> L2 norm.
Image: FC(img_dim -> D) of the mean of the valid regions (the same affine map as the
mean of the FC'd regions) -> L2 norm.

Checkpoints: a new model copies the folder's BERT config into its own config
(`bert_config`), and loads the folder's weights when it has any. A model rebuilt from a
saved config (`model_from_config`) builds the BERT from `bert_config` alone (its weights
come from the checkpoint's state dict, its tokenizer from <checkpoint>/tokenizer), so a
checkpoint reloads without the original folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data.tokens import HFTokenizer
from pipeline.errors import InputError
from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.layers import l2norm, length_mask, xavier_linear_
from pipeline.models.registry import register_model

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# what a BERT config records of the run rather than of the architecture
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "architectures", "dtype",
                     "torch_dtype")


def _folder_config(folder) -> dict[str, Any]:
    """The architecture entries of the BERT config.json in `folder` (JSON-ready)."""
    from transformers import BertConfig

    if not folder:
        raise InputError(None, "toy_bert needs model option text_encoder (a folder with a "
                               "BERT config.json and its tokenizer)")
    try:
        cfg = BertConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(folder, f"no usable BERT config.json ({str(e).splitlines()[0]})") from None
    out = json.loads(cfg.to_json_string(use_diff=False))
    for key in _NOT_ARCHITECTURE:
        out.pop(key, None)
    return out


@register_model("toy_bert")
class ToyBert(ITMModel):
    kind = "indep"
    tokenizer_class = HFTokenizer

    def __init__(self, config: dict[str, Any]):
        from transformers import BertConfig, BertModel

        super().__init__(config)
        c = self.config
        fresh = c.get("bert_config") is None
        if fresh:
            c["bert_config"] = _folder_config(c.get("text_encoder"))
        bert_cfg = BertConfig.from_dict(c["bert_config"])
        if int(c["vocab_size"]) > bert_cfg.vocab_size:
            raise InputError(c.get("text_encoder"), f"the tokenizer has {c['vocab_size']} ids, "
                             f"the BERT config {bert_cfg.vocab_size}")
        folder = Path(c["text_encoder"]) if c.get("text_encoder") else None
        if fresh and folder is not None and any((folder / f).is_file() for f in _WEIGHT_FILES):
            self.bert = BertModel.from_pretrained(str(folder), local_files_only=True,
                                                  add_pooling_layer=False)
        else:
            self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.max_positions = int(bert_cfg.max_position_embeddings)
        embed = int(c["embed_size"])
        self.txt_fc = nn.Linear(bert_cfg.hidden_size, embed)
        self.img_fc = xavier_linear_(nn.Linear(int(c["img_dim"]), embed))

    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        width = int(lengths.max())
        mask = length_mask(lengths, width).unsqueeze(-1).to(images.dtype)
        mean = (images[:, :width] * mask).sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(images.dtype)
        return Encoded(l2norm(self.img_fc(mean)))

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        lengths = lengths.to(device=tokens.device, dtype=torch.long).clamp(max=self.max_positions)
        width = int(lengths.max())
        mask = length_mask(lengths, width)
        hidden = self.bert(input_ids=tokens[:, :width], attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return Encoded(l2norm(self.txt_fc(pooled)))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        bert = [p for p in self.bert.parameters() if p.requires_grad]
        ids = {id(p) for p in bert}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        scale = float(self.config["text_lr_scale"])
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": bert, "lr": lr * scale, "weight_decay": weight_decay}]
