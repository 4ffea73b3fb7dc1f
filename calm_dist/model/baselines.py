"""The paper's baselines, trained through the same entry point as the composition.

- `LoRAAnchor`: LoRA (PEFT) on the anchor alone, its rank chosen so that it trains as many parameters as
  the composition would (`model.method=lora`).
- `random_augmenting`: an augmenting model of the same architecture with random weights
  (`model.augmenting_init=random`): does the composition use what the augmenting model knows?
- The prefix-encoder ablation (`model.augmenting_sees=prompt`) is a mask on the composition itself
  (`ComposedModel.forward(augmenting_key_mask=...)`, `generate(refresh_augmenting=False)`).

`LoRAAnchor` offers the trainer the same surface as `ComposedModel` (forward, trainable_parameters,
composition_state_dict / composition_config, generate, save_composition). Its export is PEFT's adapter format
(`save_pretrained`: adapter_config.json + adapter_model.safetensors, loadable with `PeftModel.from_pretrained`),
with composition.json (`"method": "lora"`) and the model card beside it.

peft is imported where a LoRA model is built: nothing else needs it, and it is a slow import.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from calm_dist.files import replace_directory
from calm_dist.model import backbones
from calm_dist.model.composition import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, ComposedOutput, backbone_inputs
from calm_dist.model.lm_loss import loss_from_logits
from calm_dist.model.model_card import CARD_FILE, model_card


def default_lora_targets(anchor_config) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return list(DEFAULTS[anchor_config.model_type])


def lora_parameters_per_rank(anchor: nn.Module, targets: list[str]) -> int:
    """LoRA adds r * (in + out) per targeted Linear (or GPT-2 Conv1D)."""
    total = 0
    for name, module in anchor.named_modules():
        if name.split(".")[-1] in targets:
            if hasattr(module, "in_features"):
                total += module.in_features + module.out_features
            elif hasattr(module, "nf"):  # transformers' Conv1D: weight [in, out]
                total += getattr(module.weight, "ds_shape", module.weight.shape)[0] + module.nf
    if total == 0:
        raise ValueError(f"no module of the anchor is named {targets}")
    return total


def matched_lora_rank(anchor: nn.Module, targets: list[str], budget: int) -> int:
    """The rank whose LoRA parameter count is closest to `budget` (the composition's)."""
    return max(1, round(budget / lora_parameters_per_rank(anchor, targets)))


class LoRAAnchor(nn.Module):
    """LoRA on `anchor`: B = 0 at the start (the anchor itself), or the adapter PEFT saved in `adapter_dir`."""

    def __init__(self, anchor: nn.Module, rank: int, targets: list[str], alpha: float | None = None,
                 adapter_dir: str | Path | None = None, revision: str | None = None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model

        self.rank, self.targets, self.alpha = rank, targets, alpha or 2 * rank
        anchor.requires_grad_(False)
        if adapter_dir is None:  # revision: the anchor's, which PEFT records for PeftModel.from_pretrained's users
            config = LoraConfig(r=rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0,
                                bias="none", init_lora_weights=True, revision=revision)  # B = 0: the anchor at step 0
            self.model = get_peft_model(anchor, config)
        else:  # PEFT reads the adapter (safetensors) and refuses one whose modules the anchor lacks
            self.model = PeftModel.from_pretrained(anchor, str(adapter_dir), is_trainable=False)
        self.model.eval()
        revision = revision or getattr(self.model.peft_config["default"], "revision", None)
        self.description = {"anchor": {"name_or_path": getattr(anchor.config, "_name_or_path", None),
                                       "revision": revision, "model_type": anchor.config.model_type,
                                       "num_layers": anchor.config.num_hidden_layers,
                                       "hidden_size": anchor.config.hidden_size}}

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # no dropout in the frozen model
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask=None, labels=None, augmenting_states=None, augmenting_key_mask=None,
                loss_reduction="mean", return_logits=None, position_ids=None):
        # the logits path: LoRA may adapt the head, which lm_loss.head_loss does not differentiate
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        model_mask, positions = backbone_inputs(mask, position_ids)  # packed rows: documents kept apart
        logits = self.model(input_ids=input_ids, attention_mask=model_mask, position_ids=positions,
                            use_cache=False).logits
        return ComposedOutput(logits=logits,
                              loss=loss_from_logits(logits, labels, loss_reduction) if labels is not None else None)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens=32, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None,
                 refresh_augmenting=True):
        """ComposedModel.generate's arguments, decoded by transformers (`refresh_augmenting` has no augmenting
        model to act on). transformers samples from torch's global generator: a given `generator` seeds it
        inside a forked RNG state, so the caller's random stream is left as it was."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                      do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k if top_k is not None else 0, top_p=top_p)
        if generator is None:
            return self.model.generate(**kwargs)
        with torch.random.fork_rng(devices=[input_ids.device] if input_ids.is_cuda else []):
            torch.manual_seed(generator.initial_seed())
            return self.model.generate(**kwargs)

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def composition_config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "method": "lora", "anchor": self.description["anchor"],
                "lora_rank": self.rank, "lora_alpha": self.alpha, "lora_targets": self.targets}

    def save_composition(self, directory, state_dict: dict[str, torch.Tensor] | None = None,
                         training: dict | None = None) -> Path:
        """PEFT's adapter files (`save_pretrained`), composition.json and the model card, published as one
        directory. `state_dict`: the LoRA weights gathered from ZeRO-3 shards (default: this model's own)."""
        config = self.composition_config() | ({"training": training} if training else {})

        def fill(tmp: Path) -> None:
            # save_embedding_layers=False: no embedding trains, and "auto" would ask the Hub about the base model
            self.model.save_pretrained(str(tmp), state_dict=state_dict or self.composition_state_dict(),
                                       safe_serialization=True, save_embedding_layers=False)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            (tmp / CARD_FILE).write_text(model_card(config))  # over the generic card PEFT writes
        return replace_directory(directory, fill)

    @classmethod
    def from_export(cls, directory, anchor: nn.Module) -> "LoRAAnchor":
        """The export `save_composition` wrote, on `anchor` (the model it was trained on). An export of an earlier
        calm_dist (the LoRA weights as composition.safetensors, no PEFT files) still loads."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        rank, targets, alpha = config["lora_rank"], config["lora_targets"], config.get("lora_alpha")
        if (directory / "adapter_config.json").is_file() or not (directory / WEIGHTS_FILE).is_file():
            return cls(anchor, rank, targets, alpha, adapter_dir=directory)
        model = cls(anchor, rank, targets, alpha)
        weights = load_file(str(directory / WEIGHTS_FILE))
        if set(weights) != set(model.composition_state_dict()):
            raise ValueError(f"{directory}: LoRA weights do not fit this anchor ({sorted(weights)[:3]} ...)")
        model.model.load_state_dict(weights, strict=False)
        return model


def random_augmenting(config, seed: int, dtype=None) -> nn.Module:
    """The same architecture with freshly initialised weights (built outside ZeRO, then saved and loaded)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    backbones.Backbone.from_config(model.config)
    return model


def prompt_key_mask(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """1 on the positions before the first labelled token (the prompt), 0 from the completion on; in packed rows
    (`position_ids` restarting at each document) the same within each document."""
    labelled = (labels != -100).long()
    seen = labelled.cumsum(dim=1)  # labelled tokens up to each position
    if position_ids is not None:  # less those of the earlier documents (seen is non-decreasing: cummax carries it)
        seen = seen - torch.where(position_ids == 0, seen - labelled, 0).cummax(dim=1).values
    return (seen == 0).long()
