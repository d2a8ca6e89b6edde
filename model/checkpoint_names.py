"""Which checkpoint tensor fills which model parameter, decided the way transformers decides it.

transformers renames checkpoint keys as it loads them (GPT-NeoX's ``embed_out.weight`` becomes
``lm_head.weight``; old checkpoints' ``gamma``/``beta`` become ``weight``/``bias``; a checkpoint
saved from the base model gains or loses the ``model.`` prefix). The offload runtime reads the
checkpoint itself, so it asks transformers' own loader for the renaming — the same
``get_model_conversion_mapping`` and ``rename_source_key`` that ``from_pretrained`` calls — and
never keeps a table of its own.

A conversion that changes tensors, not just names (fused q/k/v split, experts stacked), cannot
be streamed from the file as it is: ``NotStreamable`` says so, and the engine falls back
to accelerate's runtime, which loads through transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .mapped import OffloadError


class NotStreamable(OffloadError):
    """The glmchat runtime cannot stream this model as it is stored (a tensor that needs
    converting, no decoder layer list); accelerate's runtime can."""


def checkpoint_names(model: nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Model parameter/buffer name → the checkpoint key transformers would load into it.

    Keys transformers would drop (not in the model) are left out; a key that needs more than a
    rename raises NotStreamable."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError as exc:  # another transformers: its loader API moved
        raise NotStreamable(f"this transformers has no key-renaming API ({exc})") from None

    from transformers import PreTrainedModel

    transforms = (get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel)
                  else [])
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    model_names = model.state_dict(keep_vars=True)  # meta tensors: only the names are used
    names: dict[str, str] = {}
    for key in sorted(checkpoint_keys):
        # As convert_and_load_state_dict_in_model does: renamings, then at most one converter,
        # then the base-model prefix added or dropped; an exact name wins over a renamed one.
        renamed, converter = rename_source_key(key, renamings, converters, prefix, model_names)
        if renamed not in model_names and key in model_names:
            renamed, converter = rename_source_key(key, [], [], prefix, model_names)
        if renamed not in model_names:
            continue
        if converter is not None:
            raise NotStreamable(
                f"transformers converts checkpoint tensor {key} into {renamed} ({converter}); "
                "the glmchat runtime streams tensors only as they are stored")
        names.setdefault(renamed, key)
    return names
