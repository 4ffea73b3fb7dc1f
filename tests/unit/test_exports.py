"""What an export directory holds: the LoRA baseline in PEFT's own format, and a model card beside every export
that says what composition.json records (bases with revisions, layer pairs, data fingerprint, final metrics, MLflow
run)."""
import json

import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.files import replace_directory
from calm_dist.model.baselines import LoRAAnchor
from tests.helpers.reference import merged_lora_anchor
from tests.helpers import tiny
from tests.helpers.tiny import VOCAB, ids, randomize_composition, tiny_model

TRAINING = {"steps": 7, "data_fingerprint": "0123abcd", "final_metrics": {"train/loss": 1.25, "eval/loss": 1.5},
            "mlflow": {"run_id": "f00dcafe", "experiment": "kv_demo", "tracking_uri": "http://127.0.0.1:5000"}}


def random_lora(seed: int = 0) -> LoRAAnchor:
    return tiny.random_lora(tiny_model("llama", seed=1, hidden=48, layers=4), rank=3, seed=seed)


def test_the_lora_export_is_a_peft_adapter_that_peft_loads(tmp_path):
    """save_composition writes PEFT's save_pretrained files; PeftModel.from_pretrained on a fresh anchor gives the
    logits of the trained model and of B A folded into the anchor by hand; so does LoRAAnchor.from_export."""
    from peft import PeftModel

    lora = random_lora()
    lora.save_composition(tmp_path / "lora", training=TRAINING)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "composition.json"]
    x = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    peft = PeftModel.from_pretrained(tiny_model("llama", seed=1, hidden=48, layers=4), str(tmp_path / "lora"))
    reference = merged_lora_anchor(tiny_model("llama", seed=1, hidden=48, layers=4), lora.composition_state_dict())
    torch.testing.assert_close(peft(input_ids=x).logits, lora(x).logits, atol=0, rtol=0)
    torch.testing.assert_close(peft(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=0)
    reloaded = LoRAAnchor.from_export(tmp_path / "lora", tiny_model("llama", seed=1, hidden=48, layers=4))
    torch.testing.assert_close(reloaded(x).logits, lora(x).logits, atol=0, rtol=0)
    config = json.loads((tmp_path / "lora" / "composition.json").read_text())
    assert config["method"] == "lora" and config["lora_alpha"] == 6 and config["training"] == TRAINING
    card = (tmp_path / "lora" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "PeftModel.from_pretrained" in card


def test_every_composition_export_carries_a_model_card_of_what_composition_json_records(tmp_path):
    anchor, aug = tiny_model("llama", seed=1, hidden=48, layers=6), tiny_model("gpt2", seed=2, hidden=32, layers=8)
    anchor.save_pretrained(tmp_path / "anchor")
    aug.save_pretrained(tmp_path / "aug")
    model = ComposedModel.from_pretrained(tmp_path / "anchor", [tmp_path / "aug"], revision="v1.0",
                                          augmenting_revisions=["abc123"])
    randomize_composition(model)
    model.save_composition(tmp_path / "comp", training=TRAINING)
    config = json.loads((tmp_path / "comp" / "composition.json").read_text())
    assert config["training"] == TRAINING and config["layer_pairs"] == [[[3, 2], [7, 5]]]
    card = (tmp_path / "comp" / "README.md").read_text()
    assert f"| anchor | {tmp_path / 'anchor'} | v1.0 | llama | 6 | 48 |" in card
    assert f"| augmenting 0 | {tmp_path / 'aug'} | abc123 | gpt2 | 8 | 32 |" in card
    assert "- augmenting 0 → anchor: 3 → 2, 7 → 5" in card
    assert "`0123abcd`" in card and "`f00dcafe` (experiment kv_demo, store http://127.0.0.1:5000)" in card
    assert "| train/loss | 1.25 |" in card and "| eval/loss | 1.5 |" in card
    assert "base_model:" not in card  # a local path is no Hub id
    loaded = ComposedModel.from_composition(tmp_path / "comp", anchor=tmp_path / "anchor",
                                            augmenting=[tmp_path / "aug"])
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, atol=0, rtol=0)


def test_an_export_that_fails_half_way_leaves_the_previous_one(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "composition.json").write_text("old")

    def fill(tmp):
        (tmp / "composition.json").write_text("new")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        replace_directory(tmp_path / "final", fill)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (tmp_path / "final" / "composition.json").read_text() == "old"


def test_a_lora_export_of_an_earlier_calm_dist_still_loads(tmp_path):
    """Before PEFT's format, a LoRA export held its weights as composition.safetensors: it loads as it did."""
    from calm_dist.model.composition import write_composition

    lora = random_lora()
    config = lora.composition_config()
    del config["lora_alpha"]  # not recorded then
    write_composition(tmp_path / "old", lora.composition_state_dict(), config)
    reloaded = LoRAAnchor.from_export(tmp_path / "old", tiny_model("llama", seed=1, hidden=48, layers=4))
    x = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reloaded(x).logits, lora(x).logits, atol=0, rtol=0)
