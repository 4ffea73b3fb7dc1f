"""The baselines' building blocks against references written another way: LoRA folded into the weights by hand,
the prefix-encoder ablation's key mask."""
import torch

from calm_dist import ComposedModel
from calm_dist.model.baselines import LoRAAnchor, prompt_key_mask
from calm_dist.model.lm_loss import IGNORE
from tests.helpers.reference import merged_lora_anchor
from tests.helpers.tiny import VOCAB, randomize_composition, tiny_model


def test_lora_equals_its_weights_folded_into_the_anchor():
    anchor = tiny_model("llama", seed=1, hidden=48, layers=4)
    lora = LoRAAnchor(anchor, rank=3, targets=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    reference = merged_lora_anchor(tiny_model("llama", seed=1, hidden=48, layers=4), lora.composition_state_dict())
    x = torch.randint(3, VOCAB, (2, 10), generator=g)
    ours = lora(x).logits
    torch.testing.assert_close(ours, reference(input_ids=x).logits, atol=1e-5, rtol=0)
    assert (ours - tiny_model("llama", seed=1, hidden=48, layers=4)(input_ids=x).logits).abs().max() > 1e-2


def test_prompt_key_mask_marks_the_prompt_of_each_row():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE],     # a right-padded row
                           [IGNORE, IGNORE, IGNORE, IGNORE, 7],
                           [IGNORE, 8, IGNORE, 9, 9]])          # an unlabelled token inside the completion
    assert prompt_key_mask(labels).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]


def test_prompt_key_mask_marks_the_prompt_of_each_document_of_a_packed_row():
    I = IGNORE  # noqa: E741
    labels = torch.tensor([[I, 5, 6, I, I, 7, I, I, I, 8]])   # documents at 0, 3, 6 (one without labels) and 8
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 0, 1]])
    assert prompt_key_mask(labels, positions).tolist() == [[1, 0, 0, 1, 1, 0, 1, 1, 1, 0]]


def perturbed(states, where: torch.Tensor, seed: int):
    """The augmenting states with noise added at the positions `where` [B, T] marks."""
    g = torch.Generator().manual_seed(seed)
    return [{i: s + torch.randn(s.shape, generator=g) * where[..., None] for i, s in per_model.items()}
            for per_model in states]


def test_augmenting_sees_prompt_hides_the_completion_states():
    """`augmenting_sees=prompt`: with prompt_key_mask, noise in the augmenting states at completion positions
    changes no logit; at prompt positions it does. Without the mask the same noise shows (the test can fail)."""
    anchor = tiny_model("llama", seed=1, hidden=48, layers=4)
    model = ComposedModel.from_pretrained(anchor, [tiny_model("gpt2", seed=2, hidden=32, layers=4)],
                                          layer_pairs=[[(1, 1), (3, 3)]])
    randomize_composition(model, scale=1.0)
    x = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    labels = torch.full_like(x, IGNORE)
    for row, prompt_len in enumerate((3, 5, 7)):  # prompts of different lengths
        labels[row, prompt_len:] = x[row, prompt_len:]
    key_mask = prompt_key_mask(labels)
    states = model.run_augmenting(x, mask, torch.arange(9).expand(3, 9))

    def logits(s, key_mask=key_mask):
        return model(x, attention_mask=mask, augmenting_states=s, augmenting_key_mask=key_mask).logits

    base = logits(states)
    completion = (labels != IGNORE).float()
    assert torch.equal(logits(perturbed(states, completion, 0)), base)
    assert (logits(perturbed(states, 1 - completion, 0)) - base).abs().amax(dim=(1, 2)).min() > 1e-3
    assert (logits(perturbed(states, completion, 0), key_mask=None) - logits(states, key_mask=None)).abs().max() > 1e-3


def test_lora_generate_takes_the_sampling_arguments():
    """LoRAAnchor decodes with every argument ComposedModel.generate takes: at init it IS the anchor, so sampling
    with a seed equals transformers' sampling of the anchor under that seed; unknown arguments are refused."""
    import pytest

    anchor = tiny_model("llama", seed=2, hidden=32, layers=2)
    lora = LoRAAnchor(tiny_model("llama", seed=2, hidden=32, layers=2), rank=2, targets=None)
    ids = torch.tensor([[1, 7, 11, 19]])
    sampled = lora.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20,
                            generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    expected = anchor.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                               temperature=1.5, top_k=20, eos_token_id=None, pad_token_id=0)
    assert torch.equal(sampled, expected)
    greedy = lora.generate(ids, max_new_tokens=12)
    assert not torch.equal(sampled, greedy)  # the sampling arguments were not dropped
    with pytest.raises(TypeError):
        lora.generate(ids, max_new_tokens=2, num_beams=4)
