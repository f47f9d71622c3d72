"""A model soup published by model-soups: an encoder, the mean of its last hidden states over real tokens, and a
linear head. Load with AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).

Mean pooling is no architecture of transformers, so the folder's config.json has a model_type of its own
(MeanPoolSoupConfig's): loaded without trust_remote_code, it is refused with an error that says so, never read
into a built-in class with its weights missing. The encoder's own config rides inside it, under `encoder`.

This file is copied as it is into every published Hugging Face folder of a mean-pooling text soup, so it imports
nothing from model_soups. Its weights have the names of model_soups.recipes.text.MeanPoolClassifier's.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolSoupConfig(PretrainedConfig):
    model_type = "model-soup-mean-pool"

    def __init__(self, encoder=None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder or {}  # the encoder's config.json, model_type included

    def encoder_config(self):
        return AutoConfig.for_model(**self.encoder)


class MeanPoolForSequenceClassification(PreTrainedModel):
    config_class = MeanPoolSoupConfig
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        encoder = config.encoder_config()
        try:  # the pipeline leaves the unused pooler out; an encoder without that option has none
            self.encoder = AutoModel.from_config(encoder, add_pooling_layer=False)
        except TypeError:
            self.encoder = AutoModel.from_config(encoder)
        self.dropout = nn.Dropout(getattr(encoder, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(encoder.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **inputs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head(self.dropout((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
