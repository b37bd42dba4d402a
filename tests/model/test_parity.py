"""Parity on the real embedded model: with nothing evicted, generation through the paged cache equals
transformers' own dense (sdpa) generation token for token, and the last-step logits agree in fp32."""

import pytest
import torch

from kvcompress.generate import generate
from kvcompress.model import ModelNotFoundError, load_model

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def test_single_long_prompt_matches_hf_dense(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    needle = "The pass key is 71432. "
    text = "A pass key is hidden here. " + FILLER * 40 + needle + FILLER * 30 + "What is the pass key?"
    ids = chat_ids(tok, text)
    assert len(ids) >= 1000
    model.set_attn_implementation("sdpa")
    ref = model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    want = ref.sequences[0, len(ids) :].tolist()
    got = generate(model, [ids], max_new_tokens=12)[0]
    assert got.tokens == want
    assert "71432" in tok.decode(got.tokens)
    torch.testing.assert_close(got.last_logits, ref.logits[-1][0].float(), atol=2e-4, rtol=1e-4)


def test_batch_of_different_lengths_matches_hf_dense(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    texts = ["What is the capital of France?", FILLER * 8 + "What colour is the sky?", "Name a primary colour."]
    prompts = [chat_ids(tok, t) for t in texts]
    model.set_attn_implementation("sdpa")
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    ref = model.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    got = generate(model, prompts, max_new_tokens=8)
    width = batch["input_ids"].shape[1]
    for i, g in enumerate(got):
        assert g.tokens == ref.sequences[i, width:].tolist()
        torch.testing.assert_close(g.last_logits, ref.logits[-1][i].float(), atol=2e-4, rtol=1e-4)


def test_missing_model_error_names_path_and_fix(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="tried .*nowhere"):
        load_model(str(tmp_path / "nowhere"))
