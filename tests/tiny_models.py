"""Tiny random models shared by the multi-process tests (FSDP2, DeepSpeed): built in each worker from a seed."""
import torch


def tiny_bert(seed: int = 0, hidden_size: int = 16, intermediate_size: int = 24):
    """A 2-layer BertForSequenceClassification without dropout (vocabulary 40, 16 positions), seeded."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=hidden_size, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=intermediate_size,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def tiny_llama(seed: int = 0, hidden_size: int = 16, intermediate_size: int = 24):
    """A 2-layer LlamaForCausalLM (vocabulary 40, 16 positions, 2 heads, 1 key-value head), seeded."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)
