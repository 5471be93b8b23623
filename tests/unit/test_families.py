"""The facts in lorakit/families.py hold for the real transformers classes they name."""
import pytest
import transformers as tf
from torch import nn

from lorakit.families import FAMILIES
from lorakit.train.prepare import default_modules_to_save

SMALL = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
CLASSIFIER_CONFIGS = {  # model_type: a small config of it
    "bert": tf.BertConfig(hidden_size=32, **SMALL),
    "albert": tf.AlbertConfig(hidden_size=32, embedding_size=16, **SMALL),
    "mobilebert": tf.MobileBertConfig(hidden_size=32, embedding_size=16, intra_bottleneck_size=32,
                                      true_hidden_size=32, num_feedforward_networks=1, **SMALL),
    "distilbert": tf.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=99),
    "deberta": tf.DebertaConfig(hidden_size=32, **SMALL),
    "deberta-v2": tf.DebertaV2Config(hidden_size=32, **SMALL),
}


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.cls_pooler))
def test_each_classifier_pooler_is_a_dense_layer_of_that_classifier(model_type):
    model = tf.AutoModelForSequenceClassification.from_config(CLASSIFIER_CONFIGS[model_type])
    assert model.config.model_type == model_type
    name = FAMILIES[model_type].cls_pooler
    found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == name]
    assert len(found) == 1 and any(isinstance(m, nn.Linear) for m in found[0].modules())


def test_adapters_train_a_classifiers_pooler_in_full_by_default():
    assert default_modules_to_save("lora", "seq_cls", "bert") == ["pooler"]
    assert default_modules_to_save("qlora", "seq_cls", "distilbert") == ["pre_classifier"]
    assert default_modules_to_save("full", "seq_cls", "bert") == []  # everything trains anyway
    assert default_modules_to_save("lora", "causal_lm", "bert") == []
    assert default_modules_to_save("dora", "seq_cls", "roberta") == []  # its head holds its dense layer
    assert default_modules_to_save("lora", "seq_cls", None) == []  # an architecture lorakit has no facts on
