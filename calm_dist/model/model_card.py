"""The model card (README.md) of an exported composition or LoRA baseline, rendered from its composition.json.

The card says what a person needs to use and judge the export without calm_dist's source: the base models
with their revisions, the layer pairs, how it was trained (data fingerprint, steps, MLflow run) and its final
metrics, and the lines that load it. Everything it shows is in composition.json, the file programs read; the
card is a view of it, written beside it.

Pure Python over a dict: no torch, so it renders wherever composition.json can be read.
"""
from __future__ import annotations

from pathlib import Path

CARD_FILE = "README.md"


def _cell(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _is_local(name: str | None) -> bool:
    return bool(name) and (Path(name).is_absolute() or Path(name).exists() or name.startswith("."))


def _front_matter(config: dict) -> list[str]:
    """The Hub's metadata block: a Hub id as base_model (a local path is no Hub model, so it is left out)."""
    lora = config.get("method") == "lora"
    lines = ["---", f"library_name: {'peft' if lora else 'calm_dist'}"]
    anchor = config["anchor"].get("name_or_path")
    if anchor and not _is_local(anchor):
        lines.append(f"base_model: {anchor}")
    lines += ["tags:", "- calm_dist", "- lora" if lora else "- calm", "---", ""]
    return lines


def _models(config: dict) -> list[str]:
    rows = [("anchor", config["anchor"])] + [(f"augmenting {i}", d) for i, d in enumerate(config.get("augmenting", []))]
    lines = ["## Base models (frozen)", "", "| role | model | revision | family | layers | hidden size |",
             "|---|---|---|---|---|---|"]
    for role, d in rows:
        lines.append(f"| {role} | {_cell(d.get('name_or_path'))} | {_cell(d.get('revision'))} | "
                     f"{_cell(d.get('model_type'))} | {_cell(d.get('num_layers'))} | {_cell(d.get('hidden_size'))} |")
    return lines + [""]


def _trained_part(config: dict) -> list[str]:
    if config.get("method") == "lora":
        return ["## What was trained", "",
                f"LoRA on the anchor alone (the CALM paper's baseline): rank {config.get('lora_rank')}, alpha "
                f"{_cell(config.get('lora_alpha'))}, on the modules {', '.join(config.get('lora_targets') or [])}. "
                "The adapter is PEFT's format (adapter_config.json, adapter_model.safetensors).", ""]
    lines = ["## Layer pairs", "",
             "Each pair (augmenting block i → anchor block j) adds one cross-attention block, "
             f"{_cell(config.get('num_heads'))} heads, whose output is added to anchor block j's.", ""]
    for i, pairs in enumerate(config.get("layer_pairs", [])):
        lines.append(f"- augmenting {i} → anchor: " + ", ".join(f"{a} → {b}" for a, b in pairs))
    return lines + [""]


def _training(training: dict) -> list[str]:
    if not training:
        return ["## Training", "", "Not recorded (saved outside a training job).", ""]
    mlflow = training.get("mlflow") or {}
    lines = ["## Training", "", f"- steps: {_cell(training.get('steps'))}",
             f"- data fingerprint: `{_cell(training.get('data_fingerprint'))}` (the token shards' content hash)",
             f"- MLflow run: `{_cell(mlflow.get('run_id'))}` (experiment {_cell(mlflow.get('experiment'))}, "
             f"store {_cell(mlflow.get('tracking_uri'))})", ""]
    metrics = training.get("final_metrics") or {}
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in metrics.items()]
        lines.append("")
    return lines


def _usage(config: dict) -> list[str]:
    if config.get("method") == "lora":
        return ["## Use", "", "```python", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM", "",
                f"anchor = AutoModelForCausalLM.from_pretrained({config['anchor'].get('name_or_path')!r})",
                "model = PeftModel.from_pretrained(anchor, \"THIS_DIRECTORY\")", "```", ""]
    return ["## Use", "", "```python", "from calm_dist import ComposedModel", "",
            "model = ComposedModel.from_composition(\"THIS_DIRECTORY\")  # anchor=..., augmenting=[...] override",
            "```", "", "```bash",
            "calm-dist lm-eval --model calm --model_args composition=THIS_DIRECTORY --tasks TASK",
            "calm-dist generate THIS_DIRECTORY --prompt \"...\"", "```", ""]


def model_card(config: dict, title: str | None = None) -> str:
    """README.md for the export whose composition.json is `config`."""
    lora = config.get("method") == "lora"
    title = title or ("LoRA baseline on a frozen anchor" if lora else "CALM composition of frozen language models")
    intro = ("LoRA weights for the anchor below, trained with calm_dist as the CALM paper's baseline."
             if lora else
             "Cross-attention blocks joining a frozen anchor and frozen augmenting models (CALM, Bansal et al. "
             "2024, *LLM Augmented LLMs*), trained with calm_dist. Only the blocks are here "
             "(composition.safetensors); the base models load from where they are recorded below.")
    lines = _front_matter(config) + [f"# {title}", "", intro, ""]
    lines += _models(config) + _trained_part(config) + _training(config.get("training") or {}) + _usage(config)
    return "\n".join(lines)
