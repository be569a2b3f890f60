"""Sub-word to word mapping on a WordPiece tokenizer trained on the fly, against hand-checked cases;
sentence embeddings and retrieval accuracy against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from train.modeling import build_tiny_model, encode_words, layer_states, load_encoder, word_embeddings
from train.retrieval import evaluate_retrieval, retrieval_accuracy, sentence_embeddings

# Trained on this text, "mat", "sat", "on", "the", "cat" are whole tokens; "qxz" and "xzq" were never
# seen, so they split into characters: q ##x ##z and x ##z ##q.
TEXT = ["the cat sat on the mat"] * 50 + ["zqx qz xq"]
SENTENCES = [["mat", "qxz", "sat", "on"], ["the", "xzq", "cat"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(TEXT, tmp_path_factory.mktemp("tiny") / "model", vocab_size=60, hidden_size=8,
                            num_hidden_layers=2, num_attention_heads=1, intermediate_size=16,
                            max_position_embeddings=16)
    model, tok = load_encoder(path)
    return path, model.eval(), tok


def test_trained_tokenizer_splits_as_hand_checked(tiny):
    _, _, tok = tiny
    assert tok.tokenize(" ".join(SENTENCES[0])) == ["mat", "q", "##x", "##z", "sat", "on"]
    assert tok.tokenize(" ".join(SENTENCES[1])) == ["the", "x", "##z", "##q", "cat"]


def test_word_ids_exclude_special_tokens_and_padding(tiny):
    _, _, tok = tiny
    batch = encode_words(tok, SENTENCES)
    tokens = [tok.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    assert tokens[0] == ["[CLS]", "mat", "q", "##x", "##z", "sat", "on", "[SEP]"]
    assert tokens[1] == ["[CLS]", "the", "x", "##z", "##q", "cat", "[SEP]", "[PAD]"]
    assert batch["word_ids"].tolist() == [[-1, 0, 1, 1, 1, 2, 3, -1], [-1, 0, 1, 1, 1, 2, -1, -1]]


@pytest.mark.parametrize("mode, positions, counts", [
    ("last", [[1, 4, 5, 6], [1, 4, 5]], [4, 3]),
    ("first", [[1, 2, 5, 6], [1, 2, 5]], [4, 3]),
    ("mean", [[1, 3, 5, 6], [1, 3, 5]], [4, 3]),
    ("subword", [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5]], [6, 5]),
])
def test_word_representations_pick_the_hand_checked_subwords(tiny, mode, positions, counts):
    _, _, tok = tiny
    batch = encode_words(tok, SENTENCES)
    B, T = batch["input_ids"].shape
    # Token t of sentence b carries the feature (t, 100 b): the output says which tokens were used.
    hidden = torch.stack([torch.arange(T, dtype=torch.float64).expand(B, T),
                          100 * torch.arange(B, dtype=torch.float64).unsqueeze(1).expand(B, T)], -1)
    x, mask = word_embeddings(hidden, batch["word_ids"], mode)
    assert x.shape == (B, max(counts), 2) and mask.tolist() == [[i < c for i in range(max(counts))] for c in counts]
    for b in range(B):
        assert x[b, :counts[b], 0].tolist() == positions[b]
        assert x[b, :counts[b], 1].tolist() == [100.0 * b] * counts[b]
        assert x[b, counts[b]:].abs().sum() == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_word_states_are_each_sentences_own_whichever_side_the_tokenizer_pads(tiny, side):
    """A tokenizer that pads on the left shifted BERT's positions (0..T-1 whatever the padding): every word of a
    shorter sentence got the states of other positions. Against each sentence alone, with no padding at all."""
    path, model, _ = tiny
    tok = AutoTokenizer.from_pretrained(path, padding_side=side)
    batch = encode_words(tok, SENTENCES)
    with torch.no_grad():
        x, mask = word_embeddings(layer_states(model, batch), batch["word_ids"], "last")
    for b, words in enumerate(SENTENCES):
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        last = [max(t for t, w in enumerate(enc.word_ids(0)) if w == k) for k in range(len(words))]
        assert mask[b].tolist() == [i < len(words) for i in range(mask.shape[1])]
        torch.testing.assert_close(x[b, :len(words)], h[last], rtol=1e-5, atol=1e-6)


def test_truncation_drops_whole_words_only(tiny):
    _, _, tok = tiny
    six = encode_words(tok, SENTENCES, max_length=6)      # 4 tokens of budget: "mat qxz" / "the xzq"
    assert six["word_ids"].tolist() == [[-1, 0, 1, 1, 1, -1], [-1, 0, 1, 1, 1, -1]]
    four = encode_words(tok, SENTENCES, max_length=4)     # 2 tokens: "qxz" (3 pieces) no longer fits
    assert four["word_ids"].tolist() == [[-1, 0, -1], [-1, 0, -1]]


def test_bad_mode_and_shapes_raise(tiny):
    with pytest.raises(ValueError, match="mode"):
        word_embeddings(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), "middle")
    with pytest.raises(ValueError, match="word_ids"):
        word_embeddings(torch.zeros(1, 3, 2), torch.zeros(1, 4, dtype=torch.long), "last")


def test_tiny_model_reloads_with_transformers_directly(tiny):
    path, model, tok = tiny
    again = AutoModel.from_pretrained(path).eval()
    tok2 = AutoTokenizer.from_pretrained(path)
    enc = tok2(["the cat qxz"], return_tensors="pt")
    assert enc["input_ids"].tolist() == tok(["the cat qxz"], return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(again(**enc).last_hidden_state, model(**enc).last_hidden_state)


@pytest.mark.parametrize("layer,side", [(0, "right"), (-1, "right"), (-1, "left")])
def test_sentence_embeddings_average_non_special_tokens(tiny, layer, side):
    """Against each sentence alone, whichever side the tokenizer pads (left padding shifted BERT's positions)."""
    path, model, _ = tiny
    tok = AutoTokenizer.from_pretrained(path, padding_side=side)
    sentences = ["the cat sat", "on the mat qxz", "cat"]
    emb = sentence_embeddings(model, tok, sentences, layer=layer, batch_size=2)
    special = set(tok.all_special_ids)
    for i, s in enumerate(sentences):   # one sentence at a time: no padding at all
        ids = tok(s, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
        keep = torch.tensor([t not in special for t in ids[0].tolist()])
        torch.testing.assert_close(emb[i], h[keep].mean(0), rtol=1e-5, atol=1e-6)


def test_retrieval_accuracy_hand_computed():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.9]])
    tgt = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -0.5]])
    # src2: cos with tgt0 .806 > tgt1 .740 > tgt2 -.964 -> wrong; tgt2: nearest src1 (-.447) -> wrong.
    assert retrieval_accuracy(src, tgt) == pytest.approx({"src2tgt": 2 / 3, "tgt2src": 2 / 3, "mean": 2 / 3})
    scaled = retrieval_accuracy(src * torch.tensor([[2.0], [0.1], [7.0]]), tgt)
    assert scaled == retrieval_accuracy(src, tgt)          # cosine: the norm never matters
    assert retrieval_accuracy(tgt, tgt)["mean"] == 1.0
    with pytest.raises(ValueError, match="S, D"):
        retrieval_accuracy(src, tgt[:2])


def test_evaluate_retrieval_on_identical_sides_is_perfect(tiny):
    _, model, tok = tiny
    sentences = ["the cat sat", "on the mat", "qxz sat on the cat"]
    assert evaluate_retrieval(model, tok, sentences, sentences)["mean"] == 1.0
    with pytest.raises(ValueError, match="as many"):
        evaluate_retrieval(model, tok, sentences, sentences[:2])
