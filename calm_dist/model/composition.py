"""`ComposedModel`: a frozen anchor LM + frozen augmenting LMs, joined by trainable cross-attention blocks.

The anchor runs unchanged; a forward hook on each composed anchor block adds the cross-attention
update to that block's output. The augmenting models run as bare decoders, truncated after their deepest composed
block and held without an untied LM head, and hooks on their blocks capture the states the composition reads.
Both read the same token ids at the same positions (position ids come from the attention mask, so
left padding changes nothing), or, given `augmenting_inputs`, each model its own tokens of the same text,
aligned by character spans (token_alignment.py).
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.utils import ModelOutput

from calm_dist.config import ConfigError
from calm_dist.files import replace_directory, save_safetensors
from calm_dist.model import backbones
from calm_dist.model.cross_attention import CrossAttentionBlock, block_parameter_count, cross_attention_mask
from calm_dist.model.io import load_causal_lm
from calm_dist.model.layer_pairs import LayerPairs, default_layer_pairs, used_augmenting_layers, validate_layer_pairs
from calm_dist.model.lm_loss import head_loss, loss_from_logits
from calm_dist.model.model_card import CARD_FILE, model_card
from calm_dist.model.token_alignment import AugmentingInputs

WEIGHTS_FILE = "composition.safetensors"
CONFIG_FILE = "composition.json"
FORMAT_VERSION = 1

# augmenting states: one dict per augmenting model, {augmenting block index: [B, T, D_A] tensor}
AugmentingStates = list[dict[int, torch.Tensor]]


class CompositionError(ValueError):
    """A composition that cannot be built or loaded as asked (shapes, vocabularies, layers)."""


@dataclass
class ComposedOutput(ModelOutput):
    """Like transformers' CausalLMOutput (a dict too, so DeepSpeed's ZeRO-3 hooks see the tensors)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class _Context:
    """What the anchor hooks need during one anchor forward."""

    keys_values: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [augmenting model][pair] -> (K, V)
    mask: torch.Tensor | list[torch.Tensor] | None  # cross_attention_mask result, or one per augmenting model
    captured: dict = field(default_factory=dict)


def position_ids_from_mask(attention_mask: torch.Tensor, past_length: int = 0,
                           past_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions counting real tokens only, as transformers' generate does for left padding."""
    full = attention_mask if past_mask is None else torch.cat([past_mask, attention_mask], dim=1)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_length:] if past_mask is not None else positions


def backbone_inputs(attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None):
    """(attention_mask, position_ids) as the transformers decoders take them.

    Padded rows (`position_ids` None): the mask, and positions counting real tokens. Packed rows (`position_ids`
    restarting at 0 at each document, no padding): no mask and those positions, from which transformers builds a
    block-diagonal causal mask (masking_utils.find_packed_sequence_indices; varlen kernels under flash
    attention), so a document sees nothing of the others, in every family calm_dist supports."""
    if position_ids is None:
        return attention_mask, position_ids_from_mask(attention_mask)
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("packed rows (position_ids given) must carry no padding")
    return None, position_ids


def documents_of(position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's document index within its packed row: a new document wherever the position restarts at 0."""
    return (position_ids == 0).cumsum(-1)


def same_tokenizer_mask(mask: torch.Tensor, augmenting_key_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The cross-attention mask when every model reads the same tokens (None: plain causal, SDPA's fast path)."""
    t = mask.shape[1]
    # Right padding needs no mask: causality already hides later (pad) keys from every real query.
    left_padded = bool((mask[:, 1:] > mask[:, :-1]).any())
    key_mask = mask if augmenting_key_mask is None else mask * augmenting_key_mask
    documents = documents_of(position_ids) if position_ids is not None else None
    if left_padded or augmenting_key_mask is not None or documents is not None:
        return cross_attention_mask(torch.arange(t, device=mask.device), key_mask, t, documents)
    return None


def _config_of(model_or_config):
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


def _describe(model_or_config, revision: str | None) -> dict:
    config = _config_of(model_or_config)
    b = backbones.Backbone.from_config(config)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": revision,
        "model_type": b.model_type,
        "hidden_size": b.hidden_size,
        "num_layers": b.num_layers,
        "num_heads": b.num_heads,
        "vocab_size": b.vocab_size,
    }


def drop_output_layer(model: nn.Module) -> None:
    """Drop an augmenting model's LM head: the blocks read its hidden states, and the head never runs (545M
    parameters for Qwen2.5-7B). A head tied to the input embeddings stays, as the embedding table."""
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return
    for name, child in model.named_children():
        if child is head:
            setattr(model, name, None)
            return


def truncate_after(model: nn.Module, last_block: int) -> None:
    """Drop the blocks above `last_block`: the composition never reads them."""
    blocks = backbones.decoder_blocks(model)
    if last_block + 1 >= len(blocks):
        return
    decoder = backbones.decoder(model)
    setattr(decoder, backbones.BLOCK_LISTS[model.config.model_type], nn.ModuleList(list(blocks)[: last_block + 1]))
    # A config object may be shared with another model (the anchor built from the same config): edit a copy
    copies = {id(c): copy.deepcopy(c) for c in (model.config, decoder.config)}
    model.config, decoder.config = copies[id(model.config)], copies[id(decoder.config)]
    for config in copies.values():
        config.num_hidden_layers = last_block + 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: last_block + 1]


@torch.no_grad()
def capture_block_outputs(model: nn.Module, layers: list[int], input_ids, attention_mask, position_ids) -> dict:
    """Outputs of the given decoder blocks of one model (its bare decoder, no LM head): what the cache stores."""
    blocks, captured = backbones.decoder_blocks(model), {}

    def keep(i):
        return lambda module, args, output: captured.__setitem__(i, output[0] if isinstance(output, tuple) else output)
    handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
    try:
        backbones.decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


class _AnchorHook:
    """After anchor block j: add the cross-attention of each block paired with it to the residual stream.

    An object rather than a closure, so that copy.deepcopy of the composition gives a copy whose hooks hold the copy:
    a closure over the original would compose the copy's anchor with the original's blocks and context."""

    def __init__(self, owner: "ComposedModel", j: int):
        self.owner, self.j = owner, j

    def __call__(self, module, args, output):
        owner = self.owner
        ctx = owner._context
        if ctx is None:  # the anchor called on its own: no composition
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        for a, p in owner._anchor_targets[self.j]:
            keys, values = ctx.keys_values[a][p]
            mask = ctx.mask[a] if isinstance(ctx.mask, list) else ctx.mask
            hidden = hidden + owner.blocks[a][p](hidden, keys, values, mask)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _CaptureHook:
    """After augmenting model a's block i: keep its output for the blocks (an object for the reason above)."""

    def __init__(self, owner: "ComposedModel", a: int, i: int):
        self.owner, self.a, self.i = owner, a, i

    def __call__(self, module, args, output):
        ctx = self.owner._context
        if ctx is not None:
            ctx.captured[(self.a, self.i)] = output[0] if isinstance(output, tuple) else output


class ComposedModel(nn.Module):
    """Augmenting models may be given as configs only: then the composition reads their states from
    `augmenting_states` (the disk cache) and never holds their weights."""

    def __init__(self, anchor: nn.Module, augmenting: list, layer_pairs: list[LayerPairs] | None = None,
                 every: int = 4, num_heads: int | None = None, truncate_augmenting: bool = True,
                 sources: dict | None = None, loss_kernel: str = "chunked"):
        super().__init__()
        self.loss_kernel = loss_kernel  # lm_loss.head_loss's kernel: chunked, or liger (train.loss_kernel)
        if not augmenting:
            raise CompositionError("at least one augmenting model is required")
        models = [m for m in augmenting if isinstance(m, nn.Module)]
        if models and len(models) != len(augmenting):
            raise CompositionError("give every augmenting model as a model, or every one as a config (cached states)")
        self.anchor = anchor
        self.augmenting = nn.ModuleList(models)
        self.augmenting_configs = [_config_of(m) for m in augmenting]
        anchor_bb = backbones.Backbone.from_config(anchor.config)
        aug_bbs = [backbones.Backbone.from_config(c) for c in self.augmenting_configs]
        # No vocabulary check here: configs cannot decide it (equal vocab_size is no proof of one tokenizer, and
        # one tokenizer may come with padded tables of other sizes). The tokenizers decide, in preflight
        # (calm_dist/data/tokenizer.py: check_same_vocabulary); the caller of this class answers for the ids. What
        # the configs do decide, that no decoded id passes the smallest table, generation.py keeps.

        if layer_pairs is None:
            layer_pairs = [default_layer_pairs(bb.num_layers, anchor_bb.num_layers, every) for bb in aug_bbs]
        if len(layer_pairs) != len(augmenting):
            raise CompositionError(f"{len(layer_pairs)} lists of layer pairs for {len(augmenting)} augmenting models")
        self.layer_pairs = [validate_layer_pairs(p, bb.num_layers, anchor_bb.num_layers, f"augmenting model {i}")
                            for i, (p, bb) in enumerate(zip(layer_pairs, aug_bbs))]
        self.num_heads = num_heads or anchor_bb.num_heads
        self.blocks = nn.ModuleList(
            nn.ModuleList(CrossAttentionBlock(bb.hidden_size, anchor_bb.hidden_size, self.num_heads) for _ in pairs)
            for pairs, bb in zip(self.layer_pairs, aug_bbs)
        )
        sources = sources or {}
        revisions = sources.get("augmenting_revisions", [None] * len(augmenting))
        self.description = {
            "anchor": _describe(anchor, sources.get("anchor_revision")),
            "augmenting": [_describe(m, r) for m, r in zip(augmenting, revisions)],
        }
        for model in [anchor, *models]:
            model.requires_grad_(False)
            model.eval()
        if truncate_augmenting:
            for model, pairs in zip(models, self.layer_pairs):
                truncate_after(model, max(i for i, _ in pairs))
                drop_output_layer(model)
        self._context: _Context | None = None
        self._install_hooks()

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, anchor, augmenting: list, *, layer_pairs: list[LayerPairs] | None = None,
                        every: int = 4, num_heads: int | None = None, revision: str | None = None,
                        augmenting_revisions: list[str | None] | None = None, dtype=None,
                        trust_remote_code: bool = False, truncate_augmenting: bool = True) -> "ComposedModel":
        """Compose models given as paths / hub ids or as already-built transformers models."""
        augmenting_revisions = augmenting_revisions or [None] * len(augmenting)
        if isinstance(anchor, (str, Path)):
            anchor = load_causal_lm(str(anchor), revision, dtype, trust_remote_code)
        augmenting = [load_causal_lm(str(m), r, dtype, trust_remote_code) if isinstance(m, (str, Path)) else m
                      for m, r in zip(augmenting, augmenting_revisions)]
        return cls(anchor, augmenting, layer_pairs=layer_pairs, every=every, num_heads=num_heads,
                   truncate_augmenting=truncate_augmenting,
                   sources={"anchor_revision": revision, "augmenting_revisions": augmenting_revisions})

    def _install_hooks(self) -> None:
        # anchor block j -> [(augmenting model a, pair p)]
        self._anchor_targets: dict[int, list[tuple[int, int]]] = {}
        for a, pairs in enumerate(self.layer_pairs):
            for p, (_, j) in enumerate(pairs):
                self._anchor_targets.setdefault(j, []).append((a, p))
        anchor_blocks = backbones.decoder_blocks(self.anchor)
        for j in self._anchor_targets:
            anchor_blocks[j].register_forward_hook(self._anchor_hook(j))
        for a, (model, layers) in enumerate(zip(self.augmenting, self.augmenting_layers)):
            blocks = backbones.decoder_blocks(model)
            for i in layers:
                blocks[i].register_forward_hook(self._capture_hook(a, i))

    def _anchor_hook(self, j: int):
        return _AnchorHook(self, j)

    def _capture_hook(self, a: int, i: int):
        return _CaptureHook(self, a, i)

    @contextmanager
    def _composing(self, context: _Context):
        self._context = context
        try:
            yield context
        finally:
            self._context = None

    def train(self, mode: bool = True):
        """Only the blocks train; the frozen models stay in eval mode (no dropout)."""
        super().train(mode)
        self.anchor.eval()
        self.augmenting.eval()
        return self

    # ---- introspection ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.blocks.parameters())

    def expected_trainable_count(self) -> int:
        d_anchor = self.description["anchor"]["hidden_size"]
        return sum(block_parameter_count(aug["hidden_size"], d_anchor) * len(pairs)
                   for aug, pairs in zip(self.description["augmenting"], self.layer_pairs))

    @property
    def augmenting_layers(self) -> list[list[int]]:
        """Per augmenting model, the distinct blocks whose outputs the composition reads (what a cache stores)."""
        return used_augmenting_layers(self.layer_pairs)

    # ---- forward ------------------------------------------------------------------------------------
    def run_augmenting(self, input_ids, attention_mask, position_ids, caches=None) -> AugmentingStates:
        """Hidden states of the composed augmenting blocks (no LM head, no gradients), every model reading the
        same tokens."""
        return self.run_augmenting_each([(input_ids, attention_mask, position_ids)] * len(self.augmenting), caches)

    def run_augmenting_each(self, inputs: list[tuple | None], caches=None) -> AugmentingStates:
        """run_augmenting, each model reading its own (input_ids, attention_mask, position_ids); a [B, 1, S, S]
        boolean attention mask (True: attend) replaces the model's causal one. A model given None is not run (its
        states: {})."""
        if not len(self.augmenting):
            raise CompositionError(
                "this composition holds no augmenting weights (cached states): pass augmenting_states")
        if len(inputs) != len(self.augmenting):
            raise CompositionError(f"inputs for {len(inputs)} augmenting models, the composition has "
                                   f"{len(self.augmenting)}")
        ctx = _Context(keys_values=[], mask=None)
        with torch.no_grad(), self._composing(ctx):
            for a, (model, given) in enumerate(zip(self.augmenting, inputs)):
                if given is None:
                    continue
                input_ids, attention_mask, position_ids = given
                if attention_mask is not None and attention_mask.dim() == 4:
                    attention_mask = backbones.custom_attention_mask(model, attention_mask)
                decoder = backbones.decoder(model)
                kwargs = ({backbones.cache_kwarg(decoder): caches[a], "use_cache": True} if caches is not None
                          else {"use_cache": False})
                decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return [{i: ctx.captured[(a, i)] for i in layers} if given is not None else {}
                for a, (layers, given) in enumerate(zip(self.augmenting_layers, inputs))]

    def keys_values(self, states: AugmentingStates) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        return [[self.blocks[a][p].keys_values(states[a][i]) for p, (i, _) in enumerate(pairs)]
                for a, pairs in enumerate(self.layer_pairs)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, augmenting_states: AugmentingStates | None = None,
                augmenting_key_mask: torch.Tensor | None = None, loss_reduction: str = "mean",
                return_logits: bool | None = None, position_ids: torch.Tensor | None = None,
                augmenting_inputs: list[AugmentingInputs] | None = None) -> ComposedOutput:
        """Composed logits, or the loss (labels aligned with input_ids, -100 ignored).

        `position_ids` marks packed rows (positions restarting at each document, as TokenRows gives them): every
        model and the cross-attention then keep the documents apart (backbone_inputs).

        With labels the logits are not built unless `return_logits=True`: the loss goes from the anchor's final
        hidden states through its frozen head in chunks (lm_loss.head_loss). `loss_reduction="sum"` gives the
        summed loss (the trainer scales by the global token count). `augmenting_states` (e.g. from the disk
        cache) skips the augmenting models; `augmenting_key_mask` narrows which augmenting positions the
        blocks may read (the prefix-encoder ablation: the prompt only).

        `augmenting_inputs` (one per augmenting model, from token_alignment.align): each augmenting model reads its
        own tokens of the same text, and each anchor token reads the augmenting tokens of the text up to its end.
        """
        return_logits = labels is None or bool(return_logits)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        model_mask, positions = backbone_inputs(mask, position_ids)
        if augmenting_inputs is not None:
            if augmenting_key_mask is not None or position_ids is not None:
                raise ValueError("augmenting_inputs take neither augmenting_key_mask nor packed rows (position_ids)")
            if augmenting_states is None:
                augmenting_states = self.run_augmenting_each([a.model_inputs() for a in augmenting_inputs])
            cross_mask = [a.cross_attention_mask(mask) for a in augmenting_inputs]
        else:
            if augmenting_states is None:
                augmenting_states = self.run_augmenting(input_ids, model_mask, positions)
            cross_mask = same_tokenizer_mask(mask, augmenting_key_mask, position_ids)
        inputs = dict(input_ids=input_ids, attention_mask=model_mask, position_ids=positions, use_cache=False)
        with self._composing(_Context(self.keys_values(augmenting_states), cross_mask)):
            if return_logits:
                logits = self.anchor(**inputs).logits
            else:
                hidden = backbones.decoder(self.anchor)(**inputs).last_hidden_state
        if labels is None:
            return ComposedOutput(logits=logits)
        if return_logits:
            return ComposedOutput(logits=logits, loss=loss_from_logits(logits, labels, loss_reduction))
        return ComposedOutput(loss=head_loss(hidden, self.anchor.get_output_embeddings(), labels, loss_reduction,
                                             self.loss_kernel))

    def anchor_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The anchor alone (hooks idle), with the same position and document handling as the composed forward."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        model_mask, positions = backbone_inputs(mask, position_ids)
        return self.anchor(input_ids=input_ids, attention_mask=model_mask, position_ids=positions,
                           use_cache=False).logits

    def run_anchor(self, keys_values: list[list[tuple[torch.Tensor, torch.Tensor]]],
                   cross_mask: torch.Tensor | None, **inputs):
        """The anchor's forward on `inputs` (its transformers arguments, a KV cache included), each composed
        block adding its cross-attention over `keys_values` (from `keys_values()`) under `cross_mask`
        (None: every key visible). Decoding runs the anchor this way, one step at a time."""
        with self._composing(_Context(keys_values, cross_mask)):
            return self.anchor(**inputs)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Decode; the arguments are `calm_dist.model.generation.generate`'s."""
        # Imported here: generation builds on this module (ComposedModel, position_ids_from_mask), so a
        # module-level import would make the two import each other.
        from calm_dist.model.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- save / load --------------------------------------------------------------------------------
    def composition_config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "anchor": self.description["anchor"],
            "augmenting": self.description["augmenting"],
            "layer_pairs": [[list(p) for p in pairs] for pairs in self.layer_pairs],
            "num_heads": self.num_heads,
        }

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.blocks.state_dict().items()}

    def save_composition(self, directory, state_dict: dict[str, torch.Tensor] | None = None,
                         training: dict | None = None) -> Path:
        """Composition weights only (safetensors), composition.json and its model card (README.md), written
        atomically. `training`: how it was trained (data fingerprint, steps, final metrics, MLflow run), recorded
        in composition.json under "training" and shown in the card."""
        config = self.composition_config() | ({"training": training} if training else {})
        return write_composition(directory, state_dict or self.composition_state_dict(), config)

    def load_composition_weights(self, directory) -> None:
        config = read_composition_config(directory)
        check_compatible(config, self)
        self.blocks.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)

    @classmethod
    def from_composition(cls, directory, anchor=None, augmenting=None, *, dtype=None,
                         trust_remote_code: bool = False) -> "ComposedModel":
        """Rebuild a saved composition; `anchor` / `augmenting` (paths or models) override the recorded ones."""
        config = read_composition_config(directory)
        anchor = anchor if anchor is not None else _recorded_source(config["anchor"], "anchor")
        augmenting = augmenting if augmenting is not None else [
            _recorded_source(d, f"augmenting model {i}") for i, d in enumerate(config["augmenting"])]
        if len(augmenting) != len(config["augmenting"]):
            raise CompositionError(f"the composition has {len(config['augmenting'])} augmenting models, "
                                   f"{len(augmenting)} were given")
        model = cls.from_pretrained(
            anchor, augmenting, layer_pairs=config["layer_pairs"], num_heads=config["num_heads"],
            revision=config["anchor"].get("revision"),
            augmenting_revisions=[d.get("revision") for d in config["augmenting"]],
            dtype=dtype, trust_remote_code=trust_remote_code)
        model.load_composition_weights(directory)
        return model


def _recorded_source(description: dict, who: str) -> str:
    if not description.get("name_or_path"):
        raise CompositionError(f"the composition does not record where the {who} came from; pass it explicitly")
    return description["name_or_path"]


def export_config(directory) -> dict:
    """An export's composition.json, a composition's or a LoRA baseline's (its "method"), before any weight loads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"composition={directory}: no {CONFIG_FILE} there (not an export of calm_dist)")
    return json.loads(path.read_text())


def read_composition_config(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        raise CompositionError(f"{directory} is not a saved composition (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise CompositionError(f"{path}: unknown format_version {config.get('format_version')!r}")
    return config


def check_compatible(saved: dict, model: ComposedModel) -> None:
    """Refuse weights saved for models of other shapes, with the differences named."""
    problems = []
    keys = ("model_type", "hidden_size", "num_layers", "vocab_size")
    current = model.description
    for k in keys:
        if saved["anchor"][k] != current["anchor"][k]:
            problems.append(f"anchor {k}: saved {saved['anchor'][k]}, given {current['anchor'][k]}")
    for i, (s, c) in enumerate(zip(saved["augmenting"], current["augmenting"])):
        for k in keys:
            if s[k] != c[k]:
                problems.append(f"augmenting model {i} {k}: saved {s[k]}, given {c[k]}")
    if [[tuple(p) for p in pairs] for pairs in saved["layer_pairs"]] != model.layer_pairs:
        problems.append(f"layer pairs: saved {saved['layer_pairs']}, given {model.layer_pairs}")
    if problems:
        raise CompositionError("the saved composition does not fit these models: " + "; ".join(problems))


def write_composition_files(directory, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """composition.safetensors + composition.json into an existing directory."""
    save_safetensors(state_dict, Path(directory) / WEIGHTS_FILE)
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_composition(directory, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Weights, config and model card, published as one directory (files.replace_directory)."""
    def fill(tmp: Path) -> None:
        write_composition_files(tmp, state_dict, config)
        (tmp / CARD_FILE).write_text(model_card(config))
    return replace_directory(directory, fill)
