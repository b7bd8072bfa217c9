"""The language model of a multimodal HF checkpoint as a checkpoint of its own (`--language-model`):
its tensors renamed to the text model's names, its config the text config, the other parts (vision
tower, projector) left out with a note. Pure renaming: no tensor bytes are read."""

from __future__ import annotations

from dataclasses import replace

from pyconv.catalog import Catalog
from pyconv.errors import LayoutError


def language_model_view(catalog: Catalog) -> Catalog:
    from pyconv.families import multimodal_entry

    entry = multimodal_entry(catalog.architecture)
    if entry is None:
        raise LayoutError(f"{catalog.path}: --language-model takes a multimodal checkpoint pyconv knows; this one is "
                          f"{catalog.architecture or 'of no known architecture'}")
    config = catalog.config or {}
    text = config.get(entry.config_key)
    if not isinstance(text, dict):
        raise LayoutError(f"{catalog.path}: config.json has no '{entry.config_key}' object for the language model")
    tensors, left_out = {}, {}
    for name, tensor in catalog.tensors.items():
        new = next((to + name[len(prefix):] for prefix, to in entry.renames if name.startswith(prefix)), None)
        if new is not None:
            if new in tensors:
                raise LayoutError(f"{catalog.path}: '{name}' and another tensor are both the language model's '{new}'")
            tensors[new] = replace(tensor, name=new)
            continue
        part = next((prefix for prefix in entry.other_parts if name.startswith(prefix)), None)
        if part is None:
            raise LayoutError(f"{catalog.path}: tensor '{name}' is neither the language model's nor a part "
                              f"--language-model leaves out ({', '.join(p + '*' for p in entry.other_parts)})")
        left_out[part] = left_out.get(part, 0) + 1
    # The text config as transformers' text model saves it: its own architecture, the checkpoint's dtype.
    text_config = {**{k: config[k] for k in ("dtype", "torch_dtype", "transformers_version") if k in config},
                   **text, "architectures": [entry.text_architecture]}
    if "tie_word_embeddings" in config and "tie_word_embeddings" not in text:
        text_config["tie_word_embeddings"] = config["tie_word_embeddings"]
    parts = ", ".join(f"{count} '{prefix}*'" for prefix, count in left_out.items())
    note = (f"--language-model: the language model of {catalog.architecture} converted as {entry.text_architecture}; "
            f"left out: {parts or 'nothing'} tensors")
    return replace(catalog, tensors=tensors, config=text_config, architecture=entry.text_architecture,
                   notes=catalog.notes + (note,))
