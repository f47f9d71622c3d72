"""A model soup published by model-soups: an encoder, the mean of its last hidden states over real tokens, and a
linear head. Load with AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).

This file is copied as it is into every published Hugging Face folder of a mean-pooling text soup, so it imports
nothing from model_soups. Its weights have the names of model_soups.recipes.text.MeanPoolClassifier's.
"""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolForSequenceClassification(PreTrainedModel):
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(getattr(config, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **inputs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head(self.dropout((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
