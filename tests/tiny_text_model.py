"""A tiny Llama with its own byte-level BPE tokenizer, trained on offline text (the Python help topics), saved
to a folder: what the command-line, PEFT and lm-eval tests load like a real model. Nothing is downloaded."""

import torch


def help_topic_texts():
    """Two disjoint offline texts: (training text, evaluation text)."""
    from pydoc_data.topics import topics

    train = "\n\n".join(topics[name] for name in ("lambda", "del", "for", "while", "if"))
    held_out = "\n\n".join(topics[name] for name in ("assert", "pass", "return"))
    return train, held_out


def save_tiny_text_model(folder, text, seed=0, tie=False, hidden=64):
    """A 2-layer Llama (random weights) and a 300-token BPE tokenizer trained on ``text``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [text], vocab_size=300, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
