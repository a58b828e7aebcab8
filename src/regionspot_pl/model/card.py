"""The model card (README.md) of a head folder, and the facts it shows: the frozen backbones, how
the head was trained, what it scored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the frozen models each published variant was trained with (RegionSpot paper, Table 1)
VARIANT_BACKBONES = {
    "BB": {"sam": "vit_b", "clip": "openai/clip-vit-base-patch16", "clip_image_size": 224},
    "BL": {"sam": "vit_b", "clip": "openai/clip-vit-large-patch14", "clip_image_size": 224},
    "BL@336": {"sam": "vit_b", "clip": "openai/clip-vit-large-patch14-336", "clip_image_size": 336},
}
LIBRARY_NAME = "regionspot_pl"
TAGS = ["regionspot", "open-vocabulary", "region-recognition", "segment-anything", "clip"]

_CARD = """---
library_name: {library}
tags:
{tags}
---

# RegionSpot head ({variant})

The trained part of RegionSpot ("Recognize Any Regions", Yang et al., NeurIPS 2024): region tokens
of a frozen SAM cross-attend to the feature map of a frozen CLIP and are projected into CLIP's
text space, where any class name can be scored. The frozen SAM and CLIP are not in this folder;
use the ones below.

| | |
|---|---|
{table}

## Results

{results}
## Use

```python
from regionspot_pl import load_head
head = load_head("THIS_FOLDER")  # a local folder or a Hugging Face Hub id
```

```bash
python -m regionspot_pl.predict --head THIS_FOLDER --image IMG --boxes "x1,y1,x2,y2" \\
    --vocab "cat,dog" --sam_type SAM_TYPE --sam_checkpoint SAM.pth --clip_model CLIP_DIR --out OUT.png
```

Files: `config.json` (sizes and the facts above), `model.safetensors` (weights, the official
RegionSpot parameter names), this card.
"""


def model_card(config: dict[str, Any], size_keys: list[str]) -> str:
    """README.md text for a folder's config.json: what the head is, what it needs, how it was made.

    ``size_keys``: the config's keys that are head sizes (HeadConfig's fields), in their order.
    """
    sizes = ", ".join(f"{key} {config[key]}" for key in size_keys)
    backbones = config.get("backbones") or {}
    training = config.get("training") or {}
    metrics = config.get("metrics") or {}
    rows = [
        ("variant", config["variant"]),
        ("SAM (frozen)", backbones.get("sam", "not recorded")),
        ("CLIP (frozen)", backbones.get("clip", "not recorded")),
        ("CLIP input size", backbones.get("clip_image_size", "not recorded")),
        ("training data", ", ".join(map(str, training.get("data", []))) or "not recorded"),
        ("training steps", training.get("steps", "not recorded")),
        ("made from", training.get("source", "not recorded")),
        ("head sizes", sizes),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if metrics:
        scores = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in sorted(metrics.items()))
        results = f"| metric | value |\n|---|---|\n{scores}\n"
    else:
        results = (
            "Not evaluated when this folder was written; measure it with "
            "`python -m regionspot_pl.test --head THIS_FOLDER ...`.\n"
        )
    tags = "\n".join(f"- {tag}" for tag in TAGS)
    return _CARD.format(library=LIBRARY_NAME, tags=tags, variant=config["variant"], table=table, results=results)


def fit_card(manifests: list[dict[str, Any]], steps: int | None) -> dict[str, Any]:
    """``backbones`` and ``training`` for ``save_pretrained`` from the training caches' manifests
    (``fit``)."""
    first = manifests[0].get("backbones", {}) if manifests else {}
    clip = first.get("clip", {})
    backbones = {
        "sam": first.get("sam", {}).get("type"),
        "clip": Path(clip["model"]).name if clip.get("model") else None,
        "clip_id": clip.get("id"),
        "clip_image_size": clip.get("image_size"),
    }
    data = [m.get("dataset") or "unnamed cache" for m in manifests]
    training = {"data": data, "steps": steps, "source": "python -m regionspot_pl.fit"}
    return {"backbones": {k: v for k, v in backbones.items() if v is not None}, "training": training}


def official_card(variant: str, source: str | Path) -> dict[str, Any]:
    """``backbones`` and ``training`` for a head converted from an official checkpoint."""
    backbones = VARIANT_BACKBONES.get(variant)
    training = {
        "data": ["Objects365", "OpenImages", "V3Det"],
        "source": f"official RegionSpot checkpoint {Path(source).name} (python -m regionspot_pl.convert)",
    }
    return {"backbones": backbones, "training": training}
